"""
Draw class-conditional images from a trained DiT run, with classifier-free guidance.

    python sample.py --label 3                     # 8 images of class 3 from runs/default
    python sample.py --label star heart --num 16   # labels by class folder name, several at once
    python sample.py --sampler ddpm --steps 250    # ancestral sampling instead of DDIM
    python sample.py --label 3 --show-steps        # also steps.png: watch noise become an image

The checkpoint describes itself (model preset, diffusion settings, class names), so no flags are
needed to rebuild the model; the EMA weights are used. Writes grid.png (one row per label) and one
PNG per sample into --out, and prints their paths. All flags: `python sample.py --help`.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision.utils
from tqdm import tqdm

import dit
from config import ConfigError, SampleConfig, parse_args
from train import CheckpointError, build_model, load_checkpoint, resolve_device


def resolve_labels(labels, classes):
    """Class indices or folder names -> indices; every class when labels is None."""
    if labels is None:
        return list(range(len(classes)))
    valid = ", ".join(f"{i} ({name})" for i, name in enumerate(classes))
    indices = []
    for label in labels:
        if label in classes:
            indices.append(classes.index(label))
        elif label.lstrip("-").isdigit() and 0 <= int(label) < len(classes):
            indices.append(int(label))
        else:
            raise ConfigError(f"unknown label {label!r}; valid labels: {valid}")
    return indices


def load_model(ckpt, device):
    """The EMA model and its diffusion process, rebuilt from the checkpoint alone."""
    state = load_checkpoint(ckpt)
    model = build_model(state["model_args"])
    model.load_state_dict(state["ema"])
    diffusion = dit.GaussianDiffusion(**state["diffusion_args"])
    return model.to(device).eval(), diffusion, state["classes"]


@torch.no_grad()
def generate(model, diffusion, labels, cfg, device, snapshots=0):
    """`cfg.num` images per label, label-major, in [0, 1]; plus `snapshots` evenly spaced x_t of
    the whole batch (a list, noisiest first, the last one the final images)."""
    gen = torch.Generator(device).manual_seed(cfg.seed)
    y = torch.tensor(labels, device=device).repeat_interleave(cfg.num)                   # (L*num,)
    s = model.input_size
    noise = torch.randn(len(y), model.in_channels, s, s, device=device, generator=gen)   # x_T
    steps = diffusion.denoise_steps(dit.guided_model_fn(model, y, cfg.cfg_scale), noise, steps=cfg.steps,
                                    sampler=cfg.sampler, eta=cfg.eta, generator=gen)
    keep = set(torch.linspace(0, cfg.steps - 1, snapshots).round().long().tolist()) if snapshots else set()
    trajectory = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        for i, (_, x, _) in enumerate(tqdm(steps, total=cfg.steps, desc="sampling", leave=False)):
            if i in keep:
                trajectory.append(to_unit(x))
    return to_unit(x), trajectory


def to_unit(x):
    return (x.float().clamp(-1, 1) + 1) / 2


def save_grid(images, path, nrow, zoom):
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1)
    torchvision.utils.save_image(grid.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2), path)


def main(argv=None):
    try:
        cfg = parse_args(SampleConfig, sys.argv[1:] if argv is None else argv)
        device = resolve_device(cfg.device)
        model, diffusion, classes = load_model(cfg.ckpt, device)
        labels = resolve_labels(cfg.label, classes)
        if cfg.cfg_scale != 1 and model.y_embedder.dropout_prob == 0:
            raise ConfigError("this model was trained without label dropout, so it has no null label "
                              "for guidance: use --cfg-scale 1")
        if not 1 <= cfg.steps <= diffusion.num_timesteps:
            raise ConfigError(f"--steps must be between 1 and {diffusion.num_timesteps}")
    except (ConfigError, CheckpointError) as err:
        raise SystemExit(f"sample.py: error: {err}") from None

    images, trajectory = generate(model, diffusion, labels, cfg, device, snapshots=10 if cfg.show_steps else 0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "grid.png"]
    save_grid(images, paths[0], cfg.num, cfg.zoom)
    for i, image in enumerate(images):
        name = classes[labels[i // cfg.num]]
        paths.append(out / f"{name}_{i % cfg.num:03d}.png")
        torchvision.utils.save_image(image, paths[-1])
    if trajectory:
        # One row per label (its first sample), one column per snapshot: x_T on the left, x_0 right.
        first = torch.arange(len(labels)) * cfg.num
        strip = torch.stack([frame[first] for frame in trajectory], dim=1).flatten(0, 1)  # (L*10, 3, H, W)
        paths.append(out / "steps.png")
        save_grid(strip, paths[-1], len(trajectory), cfg.zoom)
    print(f"{len(images)} samples of {', '.join(classes[i] for i in labels)} "
          f"({cfg.sampler}, {cfg.steps} steps, cfg {cfg.cfg_scale}):")
    for path in paths:
        print(f"  {path}")
    return images


if __name__ == "__main__":
    main()

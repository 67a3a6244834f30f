"""
Draw class-conditional images from a trained DiT run, with classifier-free guidance.

    python sample.py --label 3                     # 8 images of class 3 from runs/default
    python sample.py --label star heart --num 16   # labels by class folder name, several at once
    python sample.py --sampler ddpm --steps 250    # ancestral sampling instead of DDIM
    python sample.py --label 3 --show-steps        # also steps.png: watch noise become an image
    python sample.py --num 10000 --out big         # in batches of --batch-size, with a progress bar

The checkpoint describes itself (model preset, diffusion settings, class names), so no flags are
needed to rebuild the model; the EMA weights are used. Writes grid.png (one row per label, enlarged
to at least 512 px wide for people) and one PNG per sample at its own size (for programs) into
--out, and prints their paths. All flags: `python sample.py --help`.
"""

import hashlib
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torchvision.utils
from tqdm import tqdm

import dit
from config import ConfigError, SampleConfig, parse_args
from train import CheckpointError, build_model, enlarge, load_checkpoint, resolve_device


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


def prepare_out(out):
    """Create --out, or say in one line why it cannot be."""
    if not out:
        raise ConfigError("--out is empty: name a directory for the images, e.g. --out samples")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file: name a directory for the images")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"--out {out}: cannot write there (not writable)")
    return path


# -----------------------------------------------------------------------------
# Sampling, in batches
# -----------------------------------------------------------------------------

def seed_for(seed, what, index):
    """A 64-bit seed of its own for each (seed, purpose, index), with no overlaps between them."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{what}/{index}".encode()).digest()[:8], "little")


def initial_noise(seed, index, shape):
    """x_T of image `index`: drawn from its own generator, on the CPU, so an image is the same
    whatever the batch it lands in and whatever the device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(seed, "x_T", index)))


@torch.no_grad()
def generate(model, diffusion, labels, cfg, device, snapshots=0):
    """`cfg.num` images per label, label-major, in [0, 1] (on the CPU), denoised `cfg.batch_size`
    at a time; plus `snapshots` evenly spaced x_t of each label's first image (a list, noisiest
    first, of (L, C, H, W); the last one is the final image). With the default deterministic DDIM
    (eta 0) the images do not depend on the batch size; the per-step noise of DDPM or eta > 0 is
    drawn per batch, so there the same --seed needs the same --batch-size."""
    y_all = torch.tensor(labels).repeat_interleave(cfg.num)                                 # (L*num,)
    shape = (model.in_channels, model.input_size, model.input_size)
    kept = torch.linspace(0, cfg.steps - 1, snapshots).round().long().tolist() if snapshots else []
    keep = {k: j for j, k in enumerate(dict.fromkeys(kept))}  # step index -> snapshot number
    firsts = [i * cfg.num for i in range(len(labels))]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    images, frames = [], [[] for _ in keep]
    bar = tqdm(total=len(y_all), desc="sampling", unit="img", disable=len(y_all) <= cfg.batch_size)
    for start in range(0, len(y_all), cfg.batch_size):
        index = range(start, min(start + cfg.batch_size, len(y_all)))
        noise = torch.stack([initial_noise(cfg.seed, i, shape) for i in index]).to(device)    # x_T
        gen = torch.Generator(device).manual_seed(seed_for(cfg.seed, "steps", start))
        model_fn = dit.guided_model_fn(model, y_all[start:index.stop].to(device), cfg.cfg_scale, cfg.cfg_interval)
        steps = diffusion.denoise_steps(model_fn, noise, steps=cfg.steps, sampler=cfg.sampler, eta=cfg.eta,
                                        generator=gen)
        mine = [i - start for i in firsts if i in index]  # this batch's first images of a label
        with autocast:
            for k, (_, x, _) in enumerate(tqdm(steps, total=cfg.steps, desc="denoising", leave=False)):
                if k in keep:
                    frames[keep[k]].append(to_unit(x[mine]).cpu())
        images.append(to_unit(x).cpu())
        bar.update(len(index))
    bar.close()
    return torch.cat(images), [torch.cat(f) for f in frames]


def to_unit(x):
    return (x.float().clamp(-1, 1) + 1) / 2


def save_grid(images, path, nrow, zoom=None):
    """A grid enlarged by `zoom` (nearest pixel), by default to at least 512 px wide."""
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1)
    torchvision.utils.save_image(enlarge(grid, zoom), path)


def write_images(images, trajectory, labels, classes, cfg, out):
    paths = [out / "grid.png"]
    save_grid(images, paths[0], cfg.num, cfg.zoom)
    for i, image in enumerate(images):
        name = classes[labels[i // cfg.num]]
        paths.append(out / f"{name}_{i % cfg.num:03d}.png")
        torchvision.utils.save_image(image, paths[-1])
    if trajectory:
        # One row per label (its first sample), one column per snapshot: x_T on the left, x_0 right.
        strip = torch.stack(trajectory, dim=1).flatten(0, 1)                           # (L*10, 3, H, W)
        paths.append(out / "steps.png")
        save_grid(strip, paths[-1], len(trajectory), cfg.zoom)
    return paths


def main(argv=None):
    try:
        cfg = parse_args(SampleConfig, sys.argv[1:] if argv is None else argv)
        device = resolve_device(cfg.device)
        model, diffusion, classes = load_model(cfg.ckpt, device)
        labels = resolve_labels(cfg.label, classes)
        if cfg.cfg_scale != 1:
            try:  # dit owns the rule (guidance needs a null label); asked here, before any sampling
                dit.guided_model_fn(model, torch.zeros(1, dtype=torch.long), cfg.cfg_scale)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if cfg.steps > diffusion.num_timesteps:
            raise ConfigError(f"argument --steps: expected an integer in [1, {diffusion.num_timesteps}] "
                              f"(the trained steps), got '{cfg.steps}'")
        out = prepare_out(cfg.out)  # before sampling, which may take an hour
        images, trajectory = generate(model, diffusion, labels, cfg, device, snapshots=10 if cfg.show_steps else 0)
        paths = write_images(images, trajectory, labels, classes, cfg, out)
    except (ConfigError, CheckpointError) as err:
        raise SystemExit(f"sample.py: error: {err}") from None
    except OSError as err:  # e.g. the disk filled up while writing
        raise SystemExit(f"sample.py: error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    print(f"{len(images)} samples of {', '.join(classes[i] for i in labels)} "
          f"({cfg.sampler}, {cfg.steps} steps, cfg {cfg.cfg_scale}):")
    for path in paths:
        print(f"  {path}")
    return images


if __name__ == "__main__":
    main()

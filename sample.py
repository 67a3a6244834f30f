"""
Draw images from a trained DiT run, of classes or (a text run) of prompts, with classifier-free guidance.

    python sample.py --label 3                     # 8 images of class 3 from runs/default
    python sample.py --label star heart --num 16   # labels by class folder name, several at once
    python sample.py --sampler ddpm --steps 250    # ancestral sampling instead of DDIM
    python sample.py --label 3 --show-steps        # also steps.png: watch noise become an image
    python sample.py --ckpt runs/text --prompt "a blue heart" "a yellow moon"   # a text run
    python sample.py --num 10000 --out big         # in batches of --batch-size, with a progress bar

The checkpoint describes itself (model preset, diffusion settings, class names), so no flags are
needed to rebuild the model; the EMA weights are used. Sample j of a class depends on the weights,
--seed and the sampling flags alone: row c of a training grid (runs/NAME/samples) is `--label c`
with that run's --sample-steps, --cfg-scale, --cfg-interval and --precision. Writes grid.png (one row per label,
enlarged to at least 512 px wide for people) and one PNG per sample at its own size (for programs)
into --out, and prints their paths. All flags: `python sample.py --help`.
"""

import dataclasses
import re
import sys

import torch
import torchvision.utils
from tqdm import tqdm

import dit
from config import ConfigError, SampleConfig, parse_args
from train import (CheckpointError, autocast, build_model, load_checkpoint, load_weights, make_out_dir,
                   resolve_device, save_grid)


def load_model(ckpt, device):
    """The EMA model and its diffusion process, rebuilt from the checkpoint alone."""
    state = load_checkpoint(ckpt)
    model = build_model(state["model_args"])
    load_weights(model, state["ema"])
    diffusion = dit.make_diffusion(**state["diffusion_args"])
    return model.to(device).eval(), diffusion, state["classes"]


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


def resolve_conditions(cfg, model, classes):
    """What to draw, one grid row each: class indices (L,) and their names, or for a text run
    (trained with --preset text) the prompts as tokens (L, T) and the prompts themselves."""
    if model.conditions_on == "captions":
        if cfg.label is not None:
            raise ConfigError('--label is for class runs; this run was trained on captions: use --prompt "a blue heart"')
        if not cfg.prompt:
            raise ConfigError('this run was trained on captions: say what to draw, e.g. --prompt "a blue heart" '
                              '"a yellow moon"')
        try:
            return model.conditions(cfg.prompt), cfg.prompt
        except ValueError as err:
            raise ConfigError(f"--prompt: {err}") from None
    if cfg.prompt is not None:
        raise ConfigError("--prompt is for runs trained on captions (train.py --preset text); this one was "
                          "trained on class labels: use --label")
    labels = resolve_labels(cfg.label, classes)
    return torch.tensor(labels), [classes[i] for i in labels]


def generate(model, diffusion, y, cfg, device, snapshots=0):
    """`cfg.num` images of each condition in y (labels (L,) or caption tokens (L, T)), in order, in
    [0, 1] (on the CPU), denoised `cfg.batch_size` at a time by dit.draw; plus `snapshots` evenly
    spaced x_t of each label's first image (a list, noisiest first, of (L, C, H, W); the last one
    is the final image). With the default DDIM at eta 0 the images do not depend on the batch
    size; the per-step noise of DDPM or eta > 0 is drawn per batch, so there the same --seed needs
    the same --batch-size."""
    y_all = y.repeat_interleave(cfg.num, 0)                                 # (L*num,)
    j_all = list(range(cfg.num)) * len(y)                     # which sample of its label each is
    kept = torch.linspace(0, cfg.steps - 1, snapshots).round().long().tolist() if snapshots else []
    keep = {k: i for i, k in enumerate(dict.fromkeys(kept))}  # step index -> snapshot number
    images, frames = [], [[] for _ in keep]
    bar = tqdm(total=len(y_all), desc="sampling", unit="img", disable=len(y_all) <= cfg.batch_size)
    for start in range(0, len(y_all), cfg.batch_size):
        y, j = y_all[start:start + cfg.batch_size].to(device), j_all[start:start + cfg.batch_size]
        firsts = [i for i, k in enumerate(j) if k == 0]  # this batch's first images of a label
        steps = dit.draw(model, diffusion, y, j, cfg.seed, cfg.steps, cfg.cfg_scale, cfg.sampler, cfg.eta,
                         cfg.cfg_interval, cfg.cfg_colour_scale)
        with autocast(cfg, device):
            for k, x in enumerate(tqdm(steps, total=cfg.steps, desc="denoising", leave=False)):
                if k in keep:
                    frames[keep[k]].append(dit.to_unit(x[firsts]).cpu())
        images.append(dit.to_unit(x).cpu())
        bar.update(len(j))
    bar.close()
    return torch.cat(images), [torch.cat(f) for f in frames]


def write_images(images, trajectory, names, cfg, out):
    paths = [out / "grid.png"]
    save_grid(images, paths[0], cfg.num, cfg.zoom)
    for i, image in enumerate(images):
        name = re.sub(r"\W+", "_", names[i // cfg.num]).strip("_")  # "a blue heart" -> a_blue_heart
        paths.append(out / f"{name}_{i % cfg.num:03d}.png")
        torchvision.utils.save_image(image, paths[-1])
    if trajectory:
        # One row per label (its first sample), one column per snapshot: x_t after the first step on the
        # left, the sample on the right.
        strip = torch.stack(trajectory, dim=1).flatten(0, 1)                           # (L*10, 3, H, W)
        paths.append(out / "steps.png")
        save_grid(strip, paths[-1], len(trajectory), cfg.zoom)
    return paths


def main(argv=None):
    try:
        cfg = parse_args(SampleConfig, sys.argv[1:] if argv is None else argv)
        device = resolve_device(cfg.device)
        model, diffusion, classes = load_model(cfg.ckpt, device)
        y, names = resolve_conditions(cfg, model, classes)
        if cfg.sampler == "auto":
            cfg = dataclasses.replace(cfg, sampler=diffusion.samplers[0])
        if cfg.sampler not in diffusion.samplers:
            raise ConfigError(f"--sampler {cfg.sampler} does not fit this {diffusion.name} run: choose "
                              f"{' or '.join(diffusion.samplers)}")
        try:  # the process owns the rule: whether its samplers take DDIM's eta
            diffusion.check_sampler(cfg.sampler, cfg.eta)
        except ValueError as err:
            raise ConfigError(f"--eta: {err}") from None
        if cfg.cfg_scale != 1 or cfg.cfg_colour_scale not in (None, 1):
            try:  # dit owns the rule (guidance needs a null label); asked here, before any sampling
                dit.guided_model_fn(model, y[:1], cfg.cfg_scale, colour_scale=cfg.cfg_colour_scale)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if cfg.steps > diffusion.num_timesteps:
            raise ConfigError(f"argument --steps: expected an integer in [1, {diffusion.num_timesteps}] "
                              f"(the trained steps), got '{cfg.steps}'")
        out = make_out_dir(cfg.out, "the images, e.g. --out samples")  # before sampling, which may take an hour
        images, trajectory = generate(model, diffusion, y, cfg, device, 10 if cfg.show_steps else 0)
        paths = write_images(images, trajectory, names, cfg, out)
    except (ConfigError, CheckpointError, OSError) as err:  # OSError: the disk filled up while writing, say
        raise SystemExit(f"sample.py: error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    print(f"{len(images)} samples of {', '.join(names)} "
          f"({cfg.sampler}, {cfg.steps} steps, cfg {cfg.cfg_scale}):")
    for path in paths:
        print(f"  {path}")
    return images


if __name__ == "__main__":
    main()

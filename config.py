"""
Configuration: typed dataclasses for training and sampling, named presets, and the one command-line
parser that train.py and sample.py share.

    python train.py --batch-size 64 --lr=3e-4 --no-hflip     # --key value, --key=value, --no-flag
    python train.py --preset gpu                              # a named preset, then your overrides
    python train.py --help                                    # every field with its default

Every flag is a dataclass field, so a misspelled key is an error that lists the valid ones, and a
value is converted to the field's type or rejected with the key and the type it expected.
"""

import dataclasses
from dataclasses import dataclass, field


def option(default, help, choices=None):
    """A dataclass field with its help text (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices})


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

@dataclass
class TrainConfig:
    preset: str = option("cpu", "named preset applied before the other flags", ("cpu", "gpu", "paper"))
    # data and run directory
    data: str = option("", "class-per-folder image directory; empty: the built-in shapes set")
    out: str = option("runs/default", "run directory: checkpoints, TensorBoard, samples, metrics")
    image_size: int = option(16, "images are resized and centre-cropped to this size")
    hflip: bool = option(False, "random horizontal flips (off: flipping changes some classes' meaning)")
    workers: int = option(0, "DataLoader worker processes (0: load in the training process)")
    # model
    model: str = option("DiT-Ti/4", "a preset of dit.DiT_models")
    learn_sigma: bool = option(False, "also learn the reverse variance (Improved DDPM hybrid loss)")
    class_dropout: float = option(0.1, "probability of the null label in training (for guidance)")
    attn: str = option("auto", "attention backend", ("auto", "triton", "sdpa", "math"))
    grad_checkpointing: bool = option(False, "recompute each block in the backward pass to save memory")
    # diffusion
    schedule: str = option("cosine", "noise schedule", ("linear", "cosine"))
    prediction: str = option("v", "what the network predicts", ("eps", "v"))
    loss_weighting: str = option("min_snr", "per-timestep loss weights", ("uniform", "min_snr"))
    # optimisation
    steps: int = option(3600, "optimizer steps in total (a resumed run continues to this number)")
    batch_size: int = option(32, "images per optimizer step, over all processes")
    lr: float = option(2e-3, "peak AdamW learning rate")
    lr_schedule: str = option("cosine", "after warm-up: constant, or cosine decay to lr/10", ("constant", "cosine"))
    warmup_steps: int = option(100, "linear learning-rate warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay")
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (0: off)")
    ema_decay: float = option(0.999, "EMA decay of the weights used for sampling (warmed up)")
    # hardware
    device: str = option("auto", "where to train", ("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ("auto", "fp32", "bf16"))
    compile: bool = option(False, "torch.compile the model")
    seed: int = option(0, "seeds data order, noise and initialisation")
    # bookkeeping
    log_every: int = option(100, "steps between log lines and TensorBoard scalars")
    ckpt_every: int = option(500, "steps between checkpoints")
    keep_every: int = option(0, "also keep every checkpoint whose step is a multiple of this (0: none)")
    sample_every: int = option(1000, "steps between sample grids (0: only at the end)")
    sample_steps: int = option(50, "DDIM steps for the sample grids")
    cfg_scale: float = option(3.0, "classifier-free guidance scale for the sample grids")
    profile: bool = option(False, "write a torch.profiler trace of a few steps to <out>/profile")
    benchmark: bool = option(False, "time training steps on random data and print one line (no run directory)")


# The dataclass defaults are the "cpu" preset, measured to give recognisable shapes in under 15
# minutes on 2 CPU cores: 16 px images in 4 x 4 patches (16 tokens) keep a step cheap, so a small
# batch, a high learning rate, v-prediction and min-SNR weighting get 3600 steps in. Each line of
# the other presets says why it differs.
TRAIN_PRESETS = {
    "cpu": {},
    "gpu": {
        "image_size": 32,            # the data set's own resolution ...
        "model": "DiT-S/2",          # ... in 2 x 2 patches: 256 tokens, a GPU's worth of work per image
        "batch_size": 256,           # the paper's batch size
        "steps": 4000,
        "lr": 5e-4,                  # 4x the paper's, with warm-up: a short run (not yet tuned on a GPU)
        "workers": 4,
        "log_every": 100, "ckpt_every": 1000, "sample_every": 2000,
    },
    "paper": {                       # DiT as published: eps, linear betas, learned sigma, constant lr 1e-4
        "image_size": 32, "model": "DiT-S/2", "schedule": "linear", "prediction": "eps", "learn_sigma": True,
        "loss_weighting": "uniform", "lr": 1e-4, "lr_schedule": "constant", "warmup_steps": 0,
        "ema_decay": 0.9999, "batch_size": 256, "steps": 400_000, "hflip": True, "cfg_scale": 4.0,
    },
}


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------

@dataclass
class SampleConfig:
    ckpt: str = option("runs/default", "a run directory (its newest checkpoint) or a checkpoint file")
    label: list = option(None, "class indices or class folder names; none given: every class")
    num: int = option(8, "samples per label")
    cfg_scale: float = option(3.0, "classifier-free guidance scale (1: no guidance)")
    sampler: str = option("ddim", "reverse process", ("ddim", "ddpm"))
    steps: int = option(50, "denoising steps (respaced from the trained 1000)")
    eta: float = option(0.0, "DDIM noise: 0 deterministic, 1 matches DDPM")
    seed: int = option(0, "same seed, same images")
    device: str = option("auto", "where to sample", ("auto", "cpu", "cuda"))
    out: str = option("samples", "directory for grid.png and the single samples")
    show_steps: bool = option(False, "also write steps.png: x_t at evenly spaced timesteps")
    zoom: int = option(1, "enlarge grid.png and steps.png this many times (nearest pixel), for small images")


# -----------------------------------------------------------------------------
# The parser
# -----------------------------------------------------------------------------

class ConfigError(ValueError):
    pass


def _convert(name, kind, text, choices):
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            value = lowered in ("1", "true", "yes", "on")
        elif kind is int:
            number = float(text)  # so that --steps 2e4 works too
            if not number.is_integer():
                raise ValueError
            value = int(number)
        else:
            value = kind(text)
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')}: expected {kind.__name__}, got {text!r}") from None
    if choices and value not in choices:
        raise ConfigError(f"--{name.replace('_', '-')}: {value!r} is not one of {', '.join(choices)}")
    return value


def usage(cls):
    lines = [f"options ({cls.__name__}):"]
    for f in dataclasses.fields(cls):
        flag = f"--{f.name.replace('_', '-')}"
        flag += "/--no-" + f.name.replace("_", "-") if f.type is bool else f" {f.type.__name__.upper()}"
        choices = f.metadata["choices"]
        extra = f" [{'|'.join(choices)}]" if choices else ""
        lines.append(f"  {flag:<28} {f.metadata['help']}{extra} (default: {f.default!r})")
    return "\n".join(lines)


def parse_args(cls, argv, presets=None):
    """Build a `cls` from command-line words. With `presets`, a `--preset NAME` is applied first."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print(usage(cls))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are written --key value")
        key, has_value, text = arg[2:].partition("=")
        name = key.replace("-", "_")
        negated = name.startswith("no_") and name not in fields and name[3:] in fields
        if negated:
            name = name[3:]
        if name not in fields:
            valid = ", ".join("--" + n.replace("_", "-") for n in fields)
            raise ConfigError(f"unknown option --{key}; valid options: {valid}")
        f = fields[name]
        kind, choices = f.type, f.metadata["choices"]
        if negated and (kind is not bool or has_value):
            raise ConfigError(f"--no-{key[3:]} only works for on/off options")
        if kind is bool:
            values[name] = _convert(name, bool, text, None) if has_value else not negated
        elif kind is list:
            words = [text] if has_value else []
            while not has_value and i < len(argv) and not argv[i].startswith("--"):
                words.append(argv[i])
                i += 1
            if not words:
                raise ConfigError(f"--{key} needs at least one value")
            values[name] = words
        else:
            if not has_value:
                if i >= len(argv) or argv[i].startswith("--"):
                    raise ConfigError(f"--{key} needs a value ({kind.__name__})")
                text = argv[i]
                i += 1
            values[name] = _convert(name, kind, text, choices)
    base = cls()
    if presets is not None:
        base = dataclasses.replace(base, **presets[values.get("preset", base.preset)])
    return dataclasses.replace(base, **values)

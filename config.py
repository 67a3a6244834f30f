"""
Configuration: typed dataclasses for training and sampling, named presets, the one command-line
parser that train.py and sample.py share, and the checks of flags that need the machine.

    python train.py --batch-size 64 --lr=3e-4 --no-hflip     # --key value, --key=value, --no-flag
    python train.py --preset gpu                              # a named preset, then your overrides
    python train.py --help                                    # every field with its default

Every flag is a dataclass field: its type, default, help and valid range are declared once, below,
and `parse_args` turns them into an argparse parser. A misspelled key is an error that suggests the
closest valid one, and a value outside its range is refused with the flag and the range.
"""

import argparse
import dataclasses
import difflib
import importlib.util
import math
import os
from dataclasses import dataclass, field

import torch

import dit


def option(default, help, choices=None, at_least=None, above=None, below=None, at_most=None):
    """A dataclass field with its help text, allowed values and valid range attached."""
    bounds = dict(at_least=at_least, above=above, below=below, at_most=at_most)
    return field(default=default, metadata={"help": help, "choices": choices, **bounds})


# Guidance only for timesteps 100 <= t < 800 of 1000 (Kynkaanniemi et al. 2024): guided at every
# step, the colours drift to the commonest ones; unguided at t >= 800, where colours are chosen,
# they spread as the data's; guided at t < 100 too, thin shapes suffer (assets/results.md).
CFG_INTERVAL = (100.0, 800.0)


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

@dataclass
class TrainConfig:
    preset: str = option("cpu", "named preset applied before the other flags", ("cpu", "gpu", "text", "paper"))
    # data and run directory
    data: str = option("", "class-per-folder image directory; empty: the built-in shapes set")
    out: str = option("runs/default", "run directory: checkpoints, TensorBoard, samples, metrics")
    image_size: int = option(32, "images are resized and centre-cropped to this size", at_least=1)
    hflip: bool = option(False, "random horizontal flips (off: flipping changes some classes' meaning)")
    workers: int = option(0, "DataLoader worker processes (0: load in the training process)", at_least=0)
    # model
    model: str = option("DiT-Ti/8", "a preset of dit.DiT_models")
    learn_sigma: bool = option(False, "also learn the reverse variance (Improved DDPM hybrid loss)")
    class_dropout: float = option(0.1, "probability of the null label (text: the empty caption) in training",
                                  at_least=0, below=1)
    conditioning: str = option("adaln-zero", "how blocks see t and y (DiT Sec. 3.2, Table 4)",
                               ("adaln-zero", "adaln", "cross-attn", "in-context"))
    attn: str = option("auto", "attention backend", ("auto", "triton", "sdpa", "math"))
    grad_checkpointing: bool = option(False, "recompute each block in the backward pass to save memory")
    # diffusion
    schedule: str = option("cosine", "noise schedule", ("linear", "cosine"))
    noise_shift: float = option(2.0, "divide the schedule's SNR by this squared (simple diffusion: "
                                "about image_size / 16 here)", at_least=0.1, at_most=100)
    objective: str = option("ddpm", "ddpm: the DDPM chain (the paper's); flow: rectified flow (SiT, SD3)",
                            ("ddpm", "flow"))
    prediction: str = option("x0", "what the network predicts (flow: v or x0)", ("eps", "v", "x0"))
    loss_weighting: str = option("min_snr", "per-timestep loss weights (ddpm)",
                                 ("uniform", "min_snr", "min_snr_floor"))
    loss: str = option("l2", "elementwise distance of prediction and target", ("l2", "l1"))
    # optimisation
    steps: int = option(3000, "optimizer steps in total (a resumed run continues to this number)", at_least=1)
    batch_size: int = option(32, "images per optimizer step, over all processes and micro-batches", at_least=1)
    grad_accum: int = option(1, "micro-batches per optimizer step (each --batch-size / processes / this)",
                             at_least=1)
    lr: float = option(4e-3, "peak AdamW learning rate", above=0)
    lr_schedule: str = option("cosine", "after warm-up: constant, or cosine decay to lr/10", ("constant", "cosine"))
    warmup_steps: int = option(300, "linear learning-rate warm-up", at_least=0)
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0)
    adam_beta2: float = option(0.95, "AdamW's second-moment decay (beta1 is 0.9; PyTorch's default: 0.999)",
                               at_least=0, below=1)
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (0: off)", at_least=0)
    ema_decay: float = option(0.999, "EMA decay of the weights used for sampling (warmed up)", at_least=0, at_most=1)
    # hardware
    device: str = option("auto", "where to train", ("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto: bf16 autocast on CUDA, fp32 on CPU", ("auto", "fp32", "bf16"))
    compile: bool = option(False, "torch.compile the model")
    seed: int = option(0, "seeds data order, noise and initialisation", at_least=0, at_most=2**32 - 1)
    # bookkeeping
    log_every: int = option(100, "steps between log lines and TensorBoard scalars", at_least=1)
    ckpt_every: int = option(500, "steps between checkpoints", at_least=1)
    keep_every: int = option(0, "also keep every checkpoint whose step is a multiple of this (0: none)", at_least=0)
    sample_every: int = option(1000, "steps between sample grids (0: only at the end)", at_least=0)
    sample_steps: int = option(50, "DDIM steps for the sample grids", at_least=1, at_most=1000)
    cfg_scale: float = option(3.0, "classifier-free guidance scale for the sample grids", at_least=0)
    cfg_interval: tuple = option(CFG_INTERVAL, "guide the sample grids only at timesteps LO <= t < HI",
                                 at_least=0, at_most=1000)
    cfg_colour_scale: float = option(None, "the sample grids' guidance scale for colour (sample.py's flag; "
                                     "default: 1 for a text run, --cfg-scale for a class run)", at_least=0)
    profile: bool = option(False, "write a torch.profiler trace of a few steps to <out>/profile")
    benchmark: bool = option(False, "time training steps on random data and print one line (no run directory)")


# The dataclass defaults are the "cpu" preset: crisp 32 px shapes in minutes on a laptop CPU.
# 8 x 8 patches (16 tokens) keep a step cheap, so a small batch and a high learning rate get many
# steps in. A token then has no more dimensions (192) than its patch (8 * 8 * 3), so the network
# predicts the clean image, not the noise (x0; with v the samples were patchy blocks), and the
# noise schedule is shifted for 32 px (noise_shift 2); min-SNR weighting. AdamW's beta2 of 0.95
# (a second moment that forgets in about 20 steps, as in LLM training) reaches the 0.999 run's
# pictures in fewer steps, and with it a higher peak lr (4e-3, warmed up over 300 steps) is
# stable and reaches them in fewer steps still (assets/results.md).
# Each line of the other presets says why it differs.
TRAIN_PRESETS = {
    "cpu": {},
    "gpu": {
        "image_size": 32,            # the data set's own resolution ...
        "model": "DiT-S/2",          # ... in 2 x 2 patches: 256 tokens, a GPU's worth of work per image
        "prediction": "v", "noise_shift": 1.0,  # 12 values per patch: noise fits through (not yet tuned)
        "batch_size": 256,           # the paper's batch size
        "steps": 4000,
        "lr": 5e-4, "warmup_steps": 100,  # 4x the paper's, with warm-up: a short run (not yet tuned on a GPU)
        "workers": 4,
        "log_every": 100, "ckpt_every": 1000, "sample_every": 2000,
    },
    "text": {                        # captions, not labels: metadata.jsonl, PixArt-alpha's cross-attention
        "model": "TextDiT-Ti/8",     # the cpu preset's network plus a caption encoder (a bag of words)
        # A caption's colour is decided at high noise, where min-SNR's weight (SNR) is nearly 0:
        # with it the colour words were never learned; uniform weights learned them but drew rough
        # shapes. min-SNR with a floor of 1 keeps both (assets/text.md).
        "loss_weighting": "min_snr_floor",
        "steps": 6000,               # a caption encoder to learn too: more steps than the class run
        "adam_beta2": 0.999,         # as measured; 0.95 (4500 steps, one seed) missed held-out shapes
        "lr": 2e-3, "warmup_steps": 100,  # as measured (the class run's higher lr is not tried on text)
        "out": "runs/text",
    },
    "paper": {                       # DiT as published: eps, linear betas, learned sigma, constant lr 1e-4
        "image_size": 32, "model": "DiT-S/2", "schedule": "linear", "prediction": "eps", "learn_sigma": True,
        "loss_weighting": "uniform", "noise_shift": 1.0, "lr": 1e-4, "lr_schedule": "constant", "warmup_steps": 0,
        "adam_beta2": 0.999, "ema_decay": 0.9999, "batch_size": 256, "steps": 400_000, "hflip": True,
        "cfg_scale": 4.0,
    },
}


# -----------------------------------------------------------------------------
# Sampling
# -----------------------------------------------------------------------------

@dataclass
class SampleConfig:
    ckpt: str = option("runs/default", "a run directory (its newest checkpoint) or a checkpoint file")
    label: list = option(None, "class indices or class folder names; none given: every class")
    prompt: list = option(None, "a text run's captions, one grid row each, e.g. --prompt \"a blue heart\"")
    num: int = option(8, "samples per label", at_least=1)
    batch_size: int = option(256, "images denoised at once (with DDIM at eta 0 the images do not depend on it)",
                             at_least=1)
    cfg_scale: float = option(3.0, "classifier-free guidance scale (1: no guidance)", at_least=0)
    cfg_interval: tuple = option(CFG_INTERVAL, "guide only at timesteps LO <= t < HI of the trained 1000 "
                                 "(elsewhere the class alone, one pass: faster)", at_least=0, at_most=1000)
    cfg_colour_scale: float = option(None, "guidance scale for colour, each pixel's RGB offset from its grey "
                                     "(1: the condition's own colours; --cfg-scale's value: plain guidance); "
                                     "default: 1 for a text run, --cfg-scale for a class run", at_least=0)
    sampler: str = option("auto", "reverse process: ddim or ddpm for a DDPM run, euler or heun for a flow run; "
                          "auto: ddim or euler", ("auto", "ddim", "ddpm", "euler", "heun"))
    steps: int = option(50, "denoising steps (respaced from the trained 1000)", at_least=1)
    eta: float = option(0.0, "DDIM noise: 0 deterministic, 1 matches DDPM", at_least=0, at_most=1)
    seed: int = option(0, "same seed, same images", at_least=0, at_most=2**32 - 1)
    device: str = option("auto", "where to sample", ("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto: bf16 autocast on CUDA, fp32 on CPU (as train.py's)",
                            ("auto", "fp32", "bf16"))
    out: str = option("samples", "directory for grid.png and the single samples")
    show_steps: bool = option(False, "also write steps.png: x_t at evenly spaced timesteps")
    zoom: int = option(None, "enlarge grid.png and steps.png this many times (nearest pixel); "
                             "auto: to at least 512 px wide", at_least=1, at_most=64)


# -----------------------------------------------------------------------------
# The parser: argparse, built from the fields
# -----------------------------------------------------------------------------

class ConfigError(ValueError):
    pass


def flag(name):
    return "--" + name.replace("_", "-")


def describe_range(f):
    """'an integer >= 1', 'a number in [0, 1)': the valid values of a numeric field, in words."""
    m = f.metadata
    kind = "an integer" if f.type is int else "a number"
    low, closed_low = (m["at_least"], True) if m["at_least"] is not None else (m["above"], False)
    high, closed_high = (m["at_most"], True) if m["at_most"] is not None else (m["below"], False)
    low, high = (v if v is None or isinstance(v, int) else f"{v:g}" for v in (low, high))  # 1e-4, not 0.0001
    if low is not None and high is not None:
        return f"{kind} in {'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
    if low is not None:
        return f"{kind} {'>=' if closed_low else '>'} {low}"
    if high is not None:
        return f"{kind} {'<=' if closed_high else '<'} {high}"
    return kind


def in_range(f, value):
    m = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not ((m["at_least"] is not None and value < m["at_least"])
                or (m["above"] is not None and value <= m["above"])
                or (m["below"] is not None and value >= m["below"])
                or (m["at_most"] is not None and value > m["at_most"]))


def converter(f):
    """argparse `type=` for a numeric field: parse, then check the range, one message for both."""
    def convert(text):
        try:
            number = float(text)
            value = int(number) if f.type is int and number.is_integer() else number  # --steps 2e4
            if f.type is int and not isinstance(value, int):
                raise ValueError
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {describe_range(f)}, got {text!r}") from None
        if not in_range(f, value):
            raise argparse.ArgumentTypeError(f"expected {describe_range(f)}, got {text!r}")
        return value
    return convert


class Parser(argparse.ArgumentParser):
    """argparse, but an error raises ConfigError (one line, no usage dump) for the caller to print."""

    def error(self, message):
        if "ignored explicit argument" in message:
            message += " (on/off options are written --name or --no-name)"
        raise ConfigError(message)


def build_parser(cls, prog=None):
    parser = Parser(prog=prog, description=f"options of {cls.__name__} (config.py)", allow_abbrev=False)
    for f in dataclasses.fields(cls):
        kwargs = dict(default=argparse.SUPPRESS, dest=f.name)
        if f.type is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif f.type is list:
            kwargs.update(nargs="+", metavar="VALUE")
        elif f.type is tuple:  # an interval LO HI
            kwargs.update(nargs=2, type=converter(f), metavar=("LO", "HI"))
        elif f.type in (int, float):
            kwargs.update(type=converter(f), metavar=f.type.__name__.upper())
        else:
            kwargs.update(choices=f.metadata["choices"], metavar=None if f.metadata["choices"] else "TEXT")
        numeric = f.type in (int, float, tuple) and describe_range(f) not in ("an integer", "a number")
        extra = f"; {describe_range(f)}" if numeric else ""
        default = "auto" if f.default is None and f.type is int else f.default
        parser.add_argument(flag(f.name), help=f"{f.metadata['help']} (default: {default!r}{extra})", **kwargs)
    return parser


def unknown_option(word, cls):
    if not word.startswith("-"):
        return f"unexpected argument {word!r}: options are written --key value"
    key = word.split("=")[0]
    known = [flag(f.name) for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown option {key}{hint}; valid options: {', '.join(known)}"


def parse_args(cls, argv, presets=None):
    """Build a `cls` from command-line words. With `presets`, a `--preset NAME` is applied first."""
    parser = build_parser(cls)
    values, rest = parser.parse_known_args(argv)
    if rest:
        raise ConfigError(unknown_option(rest[0], cls))
    values = vars(values)
    for name in {f.name for f in dataclasses.fields(cls) if f.type is tuple} & values.keys():
        lo, hi = values[name]
        if not lo < hi:
            raise ConfigError(f"argument {flag(name)}: expected LO < HI, got {lo:g} {hi:g}")
        values[name] = (lo, hi)
    base = cls()
    if presets is not None:
        base = dataclasses.replace(base, **presets[values.get("preset", base.preset)])
    return dataclasses.replace(base, **values)


# -----------------------------------------------------------------------------
# Checks that need the machine: train.py calls them once it knows its processes and device
# -----------------------------------------------------------------------------

def check_flags(cfg, world, device):
    """What a field cannot check alone: flags against each other, the model presets and this machine."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by {world} process(es) x "
                          f"--grad-accum {cfg.grad_accum}: each micro-batch must be the same size")
    if cfg.objective == "flow" and (cfg.learn_sigma or cfg.prediction == "eps"):
        raise ConfigError(f"--objective flow predicts v or x0 with no learned variance; drop "
                          f"{'--learn-sigma' if cfg.learn_sigma else '--prediction eps'} (or use --objective ddpm)")
    if cfg.model not in dit.MODELS:
        raise ConfigError(f"--model {cfg.model!r} is not a preset; choose from {', '.join(dit.MODELS)}")
    patch = dit.MODELS[cfg.model].keywords["patch_size"]
    if cfg.image_size % patch:
        raise ConfigError(f"--image-size {cfg.image_size} is not a multiple of {cfg.model}'s patch size {patch}")
    if cfg.attn == "triton" and importlib.util.find_spec("triton") is None:
        raise ConfigError("--attn triton: Triton is not installed (pip install triton); use --attn sdpa")
    if cfg.attn == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("--attn triton on a CPU runs only in Triton's interpreter: start with "
                          "TRITON_INTERPRET=1 (slow), or use --attn sdpa")


def resolve_device(name):
    """--device: "auto" is CUDA when there is one; asking for a missing one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)

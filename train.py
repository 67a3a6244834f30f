"""
Train a DiT (DDPM or flow matching) on a folder of images, by class or by caption, on a CPU, one GPU or many.

    python train.py                                  # built-in shapes set, CPU-sized model, minutes
    python train.py --data my_images --out runs/mine # your own root/<class>/*.png folders
    python train.py --preset text                    # captions (metadata.jsonl) instead of classes
    torchrun --nproc_per_node=4 train.py --preset gpu    # data parallel over 4 GPUs (DDP)
    python train.py --benchmark --model DiT-XL/2 --image-size 32 --batch-size 32   # img/s, MFU

The same --out again resumes from its newest checkpoint: a run killed at any moment (even SIGKILL) ends with the
same weights as one never interrupted, on one process or several. SIGINT/SIGTERM save first and exit with 130/143.
One train.py at a time may use an --out (a lock file says which process). Watch it with `tensorboard --logdir runs`.
Read `train()` first, the table of contents; the step and the loop are the lesson, the appendix what keeps runs safe.
"""

import copy
import csv
import dataclasses
import json
import math
import os
import pickle
import re
import signal
import sys
import time
import warnings
from contextlib import ExitStack, closing, contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dit
from config import (ConfigError, SampleConfig, TrainConfig, TRAIN_PRESETS, check_flags, flag, parse_args,
                    resolve_device)
from dataset import (CaptionFolder, DatasetError, ImageFolder, ResumableBatchSampler, check_batch_size,
                     ensure_builtin_dataset, grid_prompts)

BUILTIN_DATA = "data/shapes"


# -----------------------------------------------------------------------------
# How a run ends early: an error of one line (main() prints it, no traceback), or a signal
# -----------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    pass


class Diverged(RuntimeError):
    """The loss or the gradient's norm became NaN or infinite: the run stops before anything non-finite is saved."""


class Stopped(Exception):
    """SIGINT or SIGTERM stopped the run after it saved a checkpoint."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


FAILURES = (ConfigError, DatasetError, CheckpointError, Diverged, OSError)  # OSError: a full disk writing the logs


# -----------------------------------------------------------------------------
# A run in four stages: set up, resume, loop, finish
# -----------------------------------------------------------------------------

def train(cfg):
    """The table of contents: each stage is a section below, in this order."""
    with distributed(cfg.device) as proc:
        check_flags(cfg, proc.world, proc.device)
        if cfg.benchmark:
            return benchmark(cfg, proc)
        dataset = load_data(cfg, proc)  # before --out is made: a bad --data leaves nothing behind
        with ExitStack() as run_dir:  # --out, held by rank 0 for the whole run; a refusal stops every rank
            on_rank0(proc, lambda: run_dir.enter_context(claimed(cfg.out)))
            state = build_state(cfg, dataset.classes, proc)
            state.prompts = grid_prompts(dataset) if dataset.classes is None else None
            resume(cfg, state, proc)
            if state.step >= cfg.steps:
                return already_finished(cfg, state, proc)
            start_step = state.step
            with closing(RunLog(cfg, state, len(dataset), proc)) as log:
                signum, loss = train_loop(cfg, state, dataset, proc, log)
                return finish(cfg, state, signum, loss, start_step, log, proc)


# -----------------------------------------------------------------------------
# The training step: DDPM's loss at random timesteps, AdamW, the EMA of the weights
# -----------------------------------------------------------------------------

def make_train_step(cfg, state, proc):
    """One optimizer step as a function of (x, y, lr), returning device tensors: the host never waits here. With
    --grad-accum K, K micro-batches' gradients add up to the whole batch's: one update in 1/K of the memory."""
    device = proc.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    net = torch.compile(state.model) if cfg.compile else state.model
    if proc.world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    net.train()
    params = [p for p in state.model.parameters() if p.requires_grad]

    def train_step(x, y, lr):
        for group in state.opt.param_groups:
            group["lr"] = lr
        # DDPM (Ho et al. 2020, Algorithm 1): a uniform timestep and fresh noise per image (flow matching draws
        # logit-normal times); training_losses noises x to x_t and regresses the prediction on its target. Drawn for
        # the whole batch first, so micro-batches see the very numbers one big batch would.
        t = state.diffusion.draw_timesteps(x.shape[0], device)                        # (B,)
        noise = torch.randn_like(x)                                                   # (B, C, H, W)
        state.opt.zero_grad(set_to_none=True)
        loss = mse = 0
        for i, chunk in enumerate(zip(*(v.chunk(cfg.grad_accum) for v in (x, t, y, noise)))):
            # DDP all-reduces the gradients once, in the last micro-batch's backward.
            with net.no_sync() if proc.world > 1 and i < cfg.grad_accum - 1 else nullcontext():
                with autocast(cfg, device):
                    losses = state.diffusion.training_losses(net, *chunk[:3], noise=chunk[3])  # (B/K,) each
                (losses["loss"].mean() / cfg.grad_accum).backward()
            loss = loss + losses["loss"].detach().mean() / cfg.grad_accum
            mse = mse + losses["mse"].detach().mean() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        state.opt.step()
        return loss, mse, grad_norm
    return train_step


def learning_rate(cfg, step):
    """Linear warm-up, then constant or a cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def ema_decay(cfg, step):
    """Warmed up, so that the average forgets the random start quickly: until the ceiling, step j weighs about
    (j / step) ** 18, a power-function EMA (Karras et al. 2024) as wide as a fixed share of the run."""
    return min(cfg.ema_decay, (1 + step) / (20 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    # One multi-tensor kernel for all parameters rather than one small kernel each.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def use_bf16(cfg, device):
    """--precision, train.py's and sample.py's: "auto" is bf16 autocast on CUDA, fp32 elsewhere."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg, device))


# -----------------------------------------------------------------------------
# The loop: batches, steps, and at log, sample and checkpoint steps: check, log, draw, save
# -----------------------------------------------------------------------------

def train_loop(cfg, state, dataset, proc, log):
    """Steps until --steps or a signal. Returns the signal that stopped it (or None) and the last loss."""
    train_step, batches = make_train_step(cfg, state, proc), make_batches(cfg, dataset, state.step, proc)
    window, saved, loss, signum = Window(state.step), state.step, None, None
    state.session_start = time.time()
    profiler = torch.profiler.profile(  # steps 5-8 (after 2 skipped, 2 warm-up) into <out>/profile
        schedule=torch.profiler.schedule(wait=2, warmup=2, active=4, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(Path(cfg.out, "profile"))),
        record_shapes=True, profile_memory=True) if cfg.profile and proc.is_main else nullcontext()
    with stop_flag() as stop, profiler:
        while state.step < cfg.steps and not (signum := agree_on_stop(stop["signum"], proc)):
            x, y = next_batch(batches, cfg, state, proc.device)
            lr = learning_rate(cfg, state.step)
            window.add(*train_step(x, y, lr))
            update_ema(state.ema, state.model, ema_decay(cfg, state.step))
            step = state.step = state.step + 1
            log.advance()
            if cfg.profile and proc.is_main:
                profiler.step()
            is_log = step % cfg.log_every == 0 or step == cfg.steps
            is_sample = cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps
            is_ckpt = step % cfg.ckpt_every == 0
            if is_log or is_sample or is_ckpt:
                loss = window.check(step, cfg)
            if is_log:
                log.write(window.row(step, loss, lr, cfg.batch_size, state.wall_time()))
                window = Window(step)
            if is_sample:
                log.samples(state, cfg, step)
            if is_ckpt:
                save(cfg, state, proc)
                saved = step
        if saved != state.step:  # the last step, or where a signal stopped us
            loss = window.check(state.step, cfg) if window.n else loss
            save(cfg, state, proc)
    return signum, loss


def next_batch(batches, cfg, state, device):
    x, y = (v.to(device, non_blocking=True) for v in next(batches))
    if cfg.hflip:
        # Flipped with a checkpointed generator, not in the data set: exact resume whatever the number of workers.
        flip = torch.rand(x.shape[0], generator=state.flip_gen) < 0.5
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
    return x, y


def make_batches(cfg, dataset, step, proc):
    sampler = ResumableBatchSampler(len(dataset), cfg.batch_size // proc.world, cfg.seed, proc.rank, proc.world,
                                    start_batch=step)
    # Its own generator: creating the iterator must not draw from the global RNG, or a resumed run would diverge.
    return iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=proc.device.type == "cuda",
        persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(cfg.seed)))


class Window:
    """Sums since the last log line, kept on the device: adding a step never waits; `check` is the one host sync."""

    def __init__(self, step):
        self.first, self.n, self.t = step + 1, 0, time.time()
        self.loss = self.mse = self.norm = 0.0

    def add(self, loss, mse, grad_norm):
        self.loss, self.mse, self.norm = self.loss + loss, self.mse + mse, self.norm + grad_norm
        self.n, self.last_norm = self.n + 1, grad_norm

    def check(self, step, cfg):
        """One NaN or inf poisons the window's sums, so one read covers every step since the last log line and
        nothing non-finite is saved. The norm too: a finite loss with a non-finite norm still leaves NaN weights."""
        loss, norm = torch.stack([self.loss / self.n, self.norm.float()]).tolist()
        if not math.isfinite(loss + norm):
            where = f"at step {step}" if self.first == step else f"between steps {self.first} and {step}"
            raise Diverged(f"training diverged {where} (mean loss {loss:.4g}, summed gradient norm {norm:.4g}): "
                           f"stopped before saving, the newest checkpoint is intact. Lower --lr (now "
                           f"{cfg.lr:g}) or keep --grad-clip on (now {cfg.grad_clip:g})")
        return loss

    def row(self, step, loss, lr, batch_size, elapsed):
        return {"step": step, "loss": loss, "mse": (self.mse / self.n).item(), "grad_norm": self.last_norm.item(),
                "lr": lr, "img_per_s": self.n * batch_size / (time.time() - self.t), "elapsed_s": elapsed}


@contextmanager
def stop_flag():
    """SIGINT/SIGTERM set flag["signum"]; the loop saves a checkpoint at the end of the step and exits."""
    flag = {"signum": None}
    previous = {sig: signal.signal(sig, lambda signum, frame: flag.update(signum=signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -----------------------------------------------------------------------------
# Set up: data, model, EMA and optimizer (the flags: config.check_flags)
# -----------------------------------------------------------------------------

def load_data(cfg, proc):
    """What the model's y is (DiT.conditions_on) picks the data: class folders, or the captions of metadata.jsonl
    without the built-in set's held-out (colour, shape) pairs, so that its samples of them test composition."""
    if not cfg.data:
        on_rank0(proc, prepare_builtin_data, BUILTIN_DATA)  # the other ranks wait for it
    folder = {"labels": ImageFolder, "captions": CaptionFolder}[dit.MODELS[cfg.model].func.conditions_on]
    dataset = folder(cfg.data or BUILTIN_DATA, cfg.image_size)
    check_batch_size(dataset, cfg.batch_size)
    return dataset


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds, in memory."""
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    diffusion: object             # dit.GaussianDiffusion or dit.RectifiedFlow
    flip_gen: torch.Generator
    model_args: dict
    diffusion_args: dict
    classes: list                 # class names; None for a text run
    step: int = 0
    wall_before: float = 0.0      # seconds trained before this session
    session_start: float = 0.0    # time.time() when this session's loop began
    prompts: list = None          # a text run's sample grid rows

    def wall_time(self):
        return self.wall_before + time.time() - self.session_start


# The flags that define the network (flag -> dit.DiT's argument) and its noise process (dit.make_diffusion's): the
# checkpoint keeps them, so sample.py needs no flags and a resumed run may not change them (the loss may change).
MODEL_ARGS = {"model": "name", "image_size": "input_size", "learn_sigma": "learn_sigma",
              "class_dropout": "class_dropout_prob", "conditioning": "conditioning"}
DIFFUSION_ARGS = ("objective", "schedule", "prediction", "learn_sigma", "noise_shift")


def build_state(cfg, classes, proc):
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args = {arg: getattr(cfg, key) for key, arg in MODEL_ARGS.items()}
    model_args.update(in_channels=3, num_classes=len(classes or ()))
    if dit.MODELS[cfg.model].func.conditions_on == "captions":  # no labels: the dropout is the empty caption's
        del model_args["num_classes"], model_args["conditioning"]
        model_args["caption_dropout_prob"] = model_args.pop("class_dropout_prob")
        model_args["caption_pool"] = "mlp_then_mean"  # stored: older text runs pooled the other way
    diffusion_args = {key: getattr(cfg, key) for key in (*DIFFUSION_ARGS, "loss_weighting", "loss")}
    model = build_model(model_args, attn_backend=cfg.attn, grad_checkpointing=cfg.grad_checkpointing).to(proc.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    # Fused: one kernel for every parameter, on a CPU too (where the default runs one small kernel per tensor).
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay, fused=True)
    flip_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * proc.rank)
    torch.manual_seed(cfg.seed + proc.rank)  # per-rank noise and timesteps
    return TrainState(model, ema, opt, dit.make_diffusion(**diffusion_args), flip_gen, model_args,
                      diffusion_args, classes)


def build_model(model_args, **options):
    """Rebuild a DiT from the arguments a checkpoint stores (options: attn_backend, grad_checkpointing)."""
    args = dict(model_args)
    return dit.MODELS[args.pop("name")](**args, **options)


def load_weights(model, weights):
    """model.load_state_dict(weights), but weights of another layout (an older dit.py's) are a one-line error."""
    ours, theirs = set(model.state_dict()), set(weights)
    if ours != theirs:
        odd = sorted(ours ^ theirs)
        raise CheckpointError(f"the checkpoint's weights do not fit the model its arguments build ({len(odd)} "
                              f"names differ, e.g. {odd[0]}): an older version of dit.py saved it; train again")
    model.load_state_dict(weights)


def num_params(model):
    """Every parameter, the frozen positions too: the count of the paper's Table 1."""
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Resume (every rank's random streams too), save, finish
# -----------------------------------------------------------------------------

def resume(cfg, state, proc):
    """Continue from the newest readable checkpoint in --out, if there is one."""
    if not checkpoint_files(cfg.out):
        return
    saved = load_checkpoint(cfg.out)
    saved_cfg = saved["config"]
    for key in dict.fromkeys((*MODEL_ARGS, *DIFFUSION_ARGS)):  # what defines the model may not change
        if getattr(cfg, key) != saved_cfg.get(key):
            raise ConfigError(f"{cfg.out} holds a run trained with {flag(key)} {saved_cfg.get(key)}, but this run "
                              f"asks for {getattr(cfg, key)}: pass the same value, or another --out")
    pools = saved["model_args"].get("caption_pool"), state.model_args.get("caption_pool")
    if pools[0] != pools[1]:  # no flag sets it: an older dit.py did
        raise ConfigError(f"{cfg.out} holds a text run whose caption encoder pools {pools[0]} (an older dit.py); "
                          f"this one pools {pools[1]}: sample it as it is, or train into another --out")
    if state.classes != saved["classes"]:
        raise ConfigError(f"{cfg.out} was trained on classes {saved['classes']}, but the data has {state.classes}")
    load_weights(state.model, saved["model"])
    load_weights(state.ema, saved["ema"])
    state.opt.load_state_dict(saved["opt"])
    state.step, state.wall_before = saved["step"], saved["wall_time"]
    rng = saved["rng"]
    if len(rng) == proc.world:
        torch.set_rng_state(rng[proc.rank]["cpu"])
        state.flip_gen.set_state(rng[proc.rank]["flip"])
        if proc.device.type == "cuda" and rng[proc.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(rng[proc.rank]["cuda"], proc.device)
    elif proc.is_main:
        warnings.warn(f"{cfg.out} was saved by {len(rng)} processes and this run has {proc.world}: "
                      f"the random streams restart from --seed (the data order still resumes exactly)")
    if proc.is_main and state.step < cfg.steps:
        print(f"resuming {cfg.out} from step {state.step}")


def save(cfg, state, proc):
    """Every rank sends its RNG states (each resumes its own stream); rank 0 writes, its error stops every rank."""
    mine = {"cpu": torch.get_rng_state(), "flip": state.flip_gen.get_state(),
            "cuda": torch.cuda.get_rng_state(proc.device) if proc.device.type == "cuda" else None}
    rng = [mine] * proc.world  # every rank's, in rank order, once gathered
    if proc.world > 1:
        dist.all_gather_object(rng, mine, group=proc.group)
    on_rank0(proc, lambda: save_checkpoint({
        "model": state.model.state_dict(), "ema": state.ema.state_dict(), "opt": state.opt.state_dict(),
        "step": state.step, "wall_time": state.wall_time(), "rng": rng, "config": dataclasses.asdict(cfg),
        "model_args": state.model_args, "diffusion_args": state.diffusion_args, "classes": state.classes},
        cfg.out, cfg.keep_every))


def already_finished(cfg, state, proc):
    """A finished run started again: say so and touch nothing."""
    if proc.is_main:
        print(f"{cfg.out} already finished at step {state.step} (--steps {cfg.steps}): pass a larger --steps to go on")
    try:
        return json.loads(Path(cfg.out, "summary.json").read_text())
    except (OSError, ValueError):
        return None


def finish(cfg, state, signum, loss, start_step, log, proc):
    """Final samples and summary.json (always valid JSON); a signal becomes `Stopped`."""
    summary = None
    if proc.is_main:
        if signum is None:
            log.samples(state, cfg, state.step)
        seconds = time.time() - state.session_start
        summary = {"steps": state.step, "final_loss": loss, "wall_time_s": round(state.wall_time(), 1),
                   "img_per_s": round((state.step - start_step) * cfg.batch_size / max(1e-9, seconds), 1),
                   "model": cfg.model, "params": num_params(state.model),
                   "device": str(proc.device), "interrupted": signum is not None}
        Path(cfg.out, "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        if signum is not None:
            print(f"stopped by {signal.Signals(signum).name} at step {state.step}; checkpoint saved, "
                  f"run again to resume")
    if signum is not None:
        if proc.world > 1:  # torchrun ends the others when one rank exits non-zero: rank 0 first
            dist.barrier(group=proc.group)
        raise Stopped(signum)
    return summary


# -----------------------------------------------------------------------------
# Logging and sample grids
# -----------------------------------------------------------------------------

METRIC_COLUMNS = ["step", "loss", "mse", "grad_norm", "lr", "img_per_s", "elapsed_s"]


def open_metrics(path, step):
    """Open metrics.csv to append, minus rows a killed run wrote past `step` and (warning) rows that don't parse."""
    rows, bad = [], 0
    if path.exists():
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    if int(row["step"]) <= step:
                        rows.append({k: row[k] for k in METRIC_COLUMNS})
                except (KeyError, TypeError, ValueError):
                    bad += 1
    if bad:
        warnings.warn(f"{path}: dropped {bad} row(s) that do not parse")
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, METRIC_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f


class RunLog:
    """Rank 0's progress bar, log lines, metrics.csv, TensorBoard, config.json and grids; on other ranks, nothing."""

    def __init__(self, cfg, state, num_images, proc):
        self.on, self.out, self.device = proc.is_main, Path(cfg.out), proc.device
        if not self.on:
            return
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(self.out, purge_step=state.step)  # drops events past the checkpoint
        self.metrics = open_metrics(self.out / "metrics.csv", state.step)
        (self.out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"{cfg.model}: {num_params(state.model) / 1e6:.2f}M parameters, {num_images} images "
              f"{f'in {len(state.classes)} classes' if state.classes else 'with captions'}, {proc.world} x "
              f"{proc.device.type}, {'bf16' if use_bf16(cfg, proc.device) else 'fp32'}")
        write_graph(self.writer, state.ema, state.prompts or state.classes)
        self.bar = tqdm(total=cfg.steps, initial=state.step, dynamic_ncols=True)

    def close(self):
        for part in (self.bar, self.writer, self.metrics) if self.on else ():
            part.close()

    def advance(self):
        if self.on:
            self.bar.update(1)

    def write(self, row):
        if not self.on:
            return
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
        self.bar.write(f"step {row['step']:6d} | loss {row['loss']:.4f} | lr {row['lr']:.1e} | "
                       f"norm {row['grad_norm']:.2f} | {row['img_per_s']:.0f} img/s")
        for key in ("loss", "mse", "grad_norm", "lr", "img_per_s"):
            self.writer.add_scalar(f"train/{key}", row[key], row["step"])
        csv.DictWriter(self.metrics, METRIC_COLUMNS).writerow(row)
        self.metrics.flush()

    def samples(self, state, cfg, step):
        if self.on:
            write_samples(state.ema, state.diffusion, cfg, state.prompts or state.classes, self.device,
                          self.out, self.writer, step)


def write_graph(writer, model, names):
    """The network in TensorBoard's Graphs tab, traced on zero images (no random draws: resume stays exact), or text."""
    s, device = model.input_size, next(model.parameters()).device
    x = torch.zeros(2, model.in_channels, s, s, device=device)
    t, y = torch.zeros(2, dtype=torch.long, device=device), model.conditions(names)[[0, 0]].to(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python control flow
            writer.add_graph(model, (x, t, y))
    except Exception as err:
        warnings.warn(f"the model graph could not be traced ({type(err).__name__}: {str(err).splitlines()[0]}); "
                      f"TensorBoard's Text tab shows the modules instead")
        writer.add_text("model", f"```\n{model}\n```")


def write_samples(ema, diffusion, cfg, classes, device, out, writer, step):
    """samples/step_N.png, enlarged for people, and step_N_raw.png at the images' own size: row c holds samples
    0-7 of class c (or of a text run's prompt c) exactly as `python sample.py --label c` (--prompt "...") draws
    them with this run's --sample-steps, --cfg-* and --precision (one path, dit.draw, sample.py's default seed)."""
    y = ema.conditions(classes).repeat_interleave(8, 0).to(device)  # (8 L,) labels or (8 L, T) tokens, row-major
    guided = cfg.class_dropout > 0  # no null condition, no guidance
    with autocast(cfg, device):
        for x in dit.draw(ema, diffusion, y, list(range(8)) * len(classes), SampleConfig.seed,
                          cfg.sample_steps, cfg.cfg_scale if guided else 1.0, interval=cfg.cfg_interval,
                          colour_scale=cfg.cfg_colour_scale if guided else 1.0):
            pass
    (out / "samples").mkdir(exist_ok=True)
    name = out / "samples" / f"step_{step:07d}"
    writer.add_image("samples/ema", save_grid(dit.to_unit(x), f"{name}.png", 8, raw=f"{name}_raw.png"), step)
    # The output for fresh noise at the noisiest timestep: a collapse to zero or a blow-up shows before the samples.
    noise = torch.randn(8, *x.shape[1:], device=device, generator=torch.Generator(device).manual_seed(step))
    t = torch.full((8,), diffusion.num_timesteps - 1, device=device)
    with torch.no_grad():
        prediction = ema(noise, t, y[torch.arange(8) * 8 % len(y)])                 # (8, C, H, W): rows 0-7
    writer.add_histogram("ema/prediction", prediction.float().cpu(), step)


def save_grid(images, path, nrow, zoom=None, raw=None):
    """A grid of images in [0, 1], `nrow` to a row, returned and saved enlarged by `zoom` (default: to 512 px wide or
    more) with nearest pixels, as a smooth filter blurs the very pixels one judges; also saved as it is to `raw`."""
    import torchvision.utils
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=1)
    if raw:
        torchvision.utils.save_image(grid, raw)
    zoom = zoom or max(1, math.ceil(512 / grid.shape[-1]))
    grid = grid.repeat_interleave(zoom, -1).repeat_interleave(zoom, -2)
    torchvision.utils.save_image(grid, path)
    return grid


# =============================================================================
# Appendix: what keeps runs safe (run directory lock, checkpoint files, DDP processes), benchmark, command line
# =============================================================================

# -----------------------------------------------------------------------------
# The run directory: one train.py at a time, and only in a run of ours
# -----------------------------------------------------------------------------

RUN_LOCK = "train.lock"  # also what marks a folder as a run of this project


@contextmanager
def claimed(out):
    """Refuse an --out that is not a run of ours; hold its lock while the run lasts."""
    path = Path(out)
    ours = (path / RUN_LOCK).exists() or (path / "checkpoints").is_dir()
    if out and path.is_dir() and any(path.iterdir()) and not ours:
        raise ConfigError(f"--out {out} holds files that are not a run of this project (no {RUN_LOCK} or "
                          f"checkpoints/): choose a new or empty directory")
    make_out_dir(out, "the run, e.g. --out runs/mine")
    with locked(path / RUN_LOCK, busy=lambda pid: f"--out {out} is in use by another train.py (pid {pid}): "
                                                  f"wait for it, stop it, or choose another --out"):
        for leftover in path.glob("checkpoints/step_*.pt.tmp"):  # a save that a kill interrupted
            if CHECKPOINT_NAME.fullmatch(leftover.name[:-4]):
                leftover.unlink()
        yield


def make_out_dir(out, what):
    """Create --out, a directory for `what` (train.py's run, sample.py's images), or say in one line why not."""
    path = Path(out)
    if not out:
        raise ConfigError(f"--out is empty: name a directory for {what}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file: name a directory for {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"--out {out}: cannot write there (not writable)")
    return path


@contextmanager
def locked(path, busy=None):
    """An exclusive flock() on `path`, which holds the owner's pid. The kernel drops it when its process dies,
    however it dies, so a killed run never blocks a restart. busy(pid) makes the error if it is taken, else wait."""
    import fcntl  # POSIX only, and only here: sample.py imports this file on any platform
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise ConfigError(busy(os.pread(fd, 32, 0).decode().strip() or "unknown")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file drops the lock


def prepare_builtin_data(root, **settings):
    """Generate the built-in set once, even if two first runs start together: the second waits, then finds it."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with locked(root.parent / f".{root.name}.lock"):
        return ensure_builtin_dataset(root, **settings)


# -----------------------------------------------------------------------------
# Checkpoint files: atomic writes, plain tensors, newest-first loading with fallback
# -----------------------------------------------------------------------------

CHECKPOINT_NAME = re.compile(r"step_(\d{7}|[1-9]\d{7,})\.pt")  # checkpoint_name(): 7 digits, or more without a 0 first
CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "wall_time", "rng", "config", "model_args", "diffusion_args",
                   "classes")


def checkpoint_name(step):
    return f"step_{step:07d}.pt"


def checkpoint_files(run_dir, folder="checkpoints"):
    """The checkpoints the trainer wrote in run_dir/folder, newest first: a user's `step_best.pt` is never touched."""
    found = [(int(match[1]), path) for path in Path(run_dir, folder).glob("step_*.pt")
             if (match := CHECKPOINT_NAME.fullmatch(path.name)) and path.is_file()]
    return [path for _, path in sorted(found, reverse=True)]


def save_checkpoint(state, run_dir, keep_every=0):
    """Write a temporary file, fsync, rename: a kill at any point leaves the old set of checkpoints or the new one,
    never a half-written file. Keeps the two newest (a damaged one has a fallback) and each multiple of keep_every."""
    ckpt_dir = Path(run_dir, "checkpoints")
    path = ckpt_dir / checkpoint_name(state["step"])
    tmp = ckpt_dir / (path.name + ".tmp")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk: no partial file left, and the older checkpoints are intact
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path} ({err.strerror or err}); the older checkpoints "
                              f"are intact: free some space and run again to resume") from None
    for old in checkpoint_files(run_dir)[2:]:
        if not (keep_every and int(CHECKPOINT_NAME.fullmatch(old.name)[1]) % keep_every == 0):
            old.unlink()
    return path


def read_checkpoint(path):
    """One file, onto the CPU, with weights_only=True: tensors, numbers, strings, lists and dicts only, so a shared
    file can never run code here (a full pickle can). Keys beyond CHECKPOINT_KEYS (old "data_batches") are ignored."""
    try:
        with warnings.catch_warnings():  # torch's own notes on refused files: our message says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # refused by the safe unpickler: nothing in the file ran
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"it asks to run {found[1]}" if found else "not a file of tensors from torch.save"
        raise CheckpointError(f"{path} is not a checkpoint of this project ({what}); refused, "
                              f"nothing in it was run") from None
    except Exception as err:  # truncated, empty, a zip of something else: many error types
        reason = (str(err).split(". ")[0].splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason})") from None
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else ["a dict"]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this project (it lacks {', '.join(missing)})")
    return upgrade_checkpoint(state)


def upgrade_checkpoint(state):
    """Every rule for older versions' checkpoints, in one place: what they lack is filled in as they meant it."""
    state["config"] = {"conditioning": "adaln-zero", "noise_shift": 1.0, "objective": "ddpm",  # before these
                       "adam_beta2": 0.999, **state["config"]}                               # flags existed
    if not isinstance(state["rng"], list):  # saved before DDP runs kept every rank's streams: rank 0's
        state["rng"] = [state["rng"]]
    args = state["model_args"]
    if isinstance(args, dict) and args.get("name") in dit.TextDiT_models:
        args.setdefault("caption_pool", "mean_then_mlp")  # text runs before the choice pooled this way
        for weights in (state["model"], state["ema"]):
            for name in [n for n in weights if n.startswith("caption_encoder.spell.0.")]:  # a list of one layer
                weights[name.replace(".spell.0.", ".spell.")] = weights.pop(name)
            if "pos_embed" not in weights and "x_embedder.proj.weight" in weights:  # a buffer, not stored
                width, _, patch, _ = weights["x_embedder.proj.weight"].shape
                weights["pos_embed"] = dit.sincos_pos_embed_2d(width, args["input_size"] // patch)[None]
    return state


def load_checkpoint(path):
    """A checkpoint file, or a run directory's newest readable one (past a damaged one, warning): the one loader."""
    path = Path(path)
    if path.is_file():
        return read_checkpoint(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist: run `python train.py` first, or pass --ckpt")
    candidates = checkpoint_files(path) or checkpoint_files(path, ".")  # a run, or its checkpoints/ folder
    if not candidates:
        raise CheckpointError(f"no checkpoint in {path}/checkpoints (step_NNNNNNN.pt) yet: "
                              f"run `python train.py --out {path}` first")
    for candidate, fallback in zip(candidates, candidates[1:]):
        try:
            return read_checkpoint(candidate)
        except CheckpointError as err:
            warnings.warn(f"{err}; falling back to {fallback}")
    return read_checkpoint(candidates[-1])


# -----------------------------------------------------------------------------
# Devices and processes: one, or a DDP group that stops and fails together
# -----------------------------------------------------------------------------

@dataclasses.dataclass
class Process:
    rank: int
    world: int
    device: torch.device
    group: object = None  # a gloo group for small host-side messages (stop flag, RNG states, errors)
    is_main = property(lambda self: self.rank == 0)  # the rank that writes


@contextmanager
def distributed(device_name):
    """DDP turns on when torchrun put RANK in the environment; plain `python train.py` is one process."""
    device = resolve_device(device_name)
    if "RANK" not in os.environ:
        yield Process(0, 1, device)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:  # NCCL only moves device tensors; the host-side messages go over gloo
        proc = Process(rank, world, device, dist.new_group(backend="gloo") if device.type == "cuda" else None)
        yield proc
        # Every rank tears down together: one that destroys its group while rank 0 still writes the final grid
        # can abort in gloo's teardown ("terminate called without an active exception").
        dist.barrier(group=proc.group)
    finally:
        dist.destroy_process_group()


def on_rank0(proc, fn, *args):
    """fn(*args) on rank 0 alone, its error raised on every rank: none waits forever in a collective rank 0 left."""
    result, error = None, None
    if proc.is_main:
        try:
            result = fn(*args)
        except FAILURES as err:
            error = err
    if proc.world > 1:
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0, group=proc.group)
        if message[0] is not None and error is None:
            error = ConfigError(message[0])
    if error is not None:
        raise error
    return result


def agree_on_stop(signum, proc):
    """The signal any rank has seen (or None), by a host-side message: all stop at the same step, none left waiting."""
    if proc.world == 1:
        return signum
    seen = torch.tensor([signum or 0])
    dist.all_reduce(seen, dist.ReduceOp.MAX, group=proc.group)
    return int(seen) or None


# -----------------------------------------------------------------------------
# Benchmark: images/s, ms/step, memory and MFU on random data
# -----------------------------------------------------------------------------

def time_steps(train_step, x, y, lr, device, count):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        train_step(x, y, lr)
    sync(device)
    return (time.perf_counter() - start) / count


def benchmark(cfg, proc):
    """Warm-up then timed steps on random data of the model's shape; prints one line, writes nothing."""
    device, batch, s = proc.device, cfg.batch_size // proc.world, cfg.image_size
    state = build_state(cfg, [str(i) for i in range(10)], proc)
    train_step = make_train_step(cfg, state, proc)
    x = torch.randn(batch, 3, s, s, device=device)
    # Ten classes, or for a text model a caption of the built-in set's typical length.
    y = state.model.conditions(["a triangle in purple"] * 10)[torch.randint(0, 10, (batch,))].to(device)
    warmup, timed = (3, 10) if device.type == "cpu" else (15, 50)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    time_steps(train_step, x, y, cfg.lr, device, warmup)
    with torch.profiler.profile(on_trace_ready=torch.profiler.tensorboard_trace_handler(
            str(Path(cfg.out, "profile")))) if cfg.profile else nullcontext():
        dt = time_steps(train_step, x, y, cfg.lr, device, timed)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource  # POSIX only, like fcntl: imported where it is used
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB; Linux reports KiB
    with torch.device("meta"):  # the paper's count of the forward pass, on no memory
        gmacs = dit.forward_gmacs(build_model(state.model_args))
    achieved = 3 * 2 * gmacs * batch / dt / 1e3  # TFLOP/s: 2 flops a multiply-add; backward ~ twice the forward
    peaks = {"H100": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "A100": 312.0, "L4": 121.0}  # bf16 TFLOP/s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = peaks.get(max((k for k in peaks if k in name), key=len, default=""))  # the longest match: "H100 PCIe"
    mfu = f" | MFU {100 * achieved / peak:.1f}% of {peak:.0f}" if peak else ""
    print(f"benchmark | {cfg.model} {s}px | batch {batch} | attn {cfg.attn} | "
          f"{'bf16' if use_bf16(cfg, device) else 'fp32'} | compile {'on' if cfg.compile else 'off'} | "
          f"ckpt {'on' if cfg.grad_checkpointing else 'off'} | {batch / dt:.1f} img/s | "
          f"{1000 * dt:.1f} ms/step | peak mem {mem:.2f} GiB | {achieved:.2f} TFLOP/s{mfu}")
    return {"img_per_s": batch / dt, "ms_per_step": 1000 * dt, "peak_mem_gib": mem, "tflops": achieved,
            "mfu": achieved / peak if peak else None, "params": num_params(state.model)}


# -----------------------------------------------------------------------------
# Command line: an error is one line, a signal an exit status
# -----------------------------------------------------------------------------

def main(argv=None):
    """Exit status: 0 finished, 1 an error (one line, no traceback), 128 + N stopped by signal N."""
    try:
        cfg = parse_args(TrainConfig, sys.argv[1:] if argv is None else argv, TRAIN_PRESETS)
        return train(cfg)
    except FAILURES as err:
        raise SystemExit(f"train.py: error: {err}") from None
    except Stopped as stop:
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:  # Ctrl-C before the training loop took the signal over
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()

"""
Train a class-conditional DiT with DDPM on a folder of images, on a CPU, one GPU or many.

    python train.py                                  # built-in shapes set, CPU-sized model, minutes
    python train.py --data my_images --out runs/mine # your own root/<class>/*.png folders
    python train.py --preset gpu                     # larger model and batch for one GPU
    torchrun --nproc_per_node=4 train.py --preset gpu    # data parallel over 4 GPUs (DDP)
    python train.py --benchmark --model DiT-XL/2 --image-size 32 --batch-size 32   # img/s, MFU

Starting again with the same --out resumes from the newest checkpoint: a single-process run killed
at any moment (even SIGKILL) ends with the same weights as one never interrupted (under DDP the
other ranks' random streams restart from their seeds). SIGINT/SIGTERM save a checkpoint first.
Watch it with `tensorboard --logdir runs`. All flags: `python train.py --help` (or config.py).
"""

import copy
import csv
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dit
from config import ConfigError, TrainConfig, TRAIN_PRESETS, parse_args
from dataset import DatasetError, ImageFolder, check_batch_size, ensure_builtin_dataset

BUILTIN_DATA = "data/shapes"


# -----------------------------------------------------------------------------
# Devices and processes
# -----------------------------------------------------------------------------

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def setup_distributed(device_name):
    """DDP turns on when torchrun put RANK in the environment; plain `python train.py` is one process."""
    if "RANK" not in os.environ:
        return 0, 1, resolve_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# -----------------------------------------------------------------------------
# Data order: a shuffled, sharded, resumable stream of batches
# -----------------------------------------------------------------------------

class ResumableBatchSampler:
    """Batch k of the run is a pure function of (seed, k): epoch e shuffles with seed + e, each rank
    takes every world-th index (a distributed sampler), and a resumed run simply starts at batch k."""

    def __init__(self, num_items, batch_size, seed, rank=0, world_size=1, start_batch=0):
        self.per_rank = num_items // world_size
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.batches_per_epoch = self.per_rank // batch_size  # the ragged last batch is dropped
        self.num_items, self.start_batch = num_items, start_batch

    def __iter__(self):
        batch, order_epoch, order = self.start_batch, None, None
        while True:
            epoch, k = divmod(batch, self.batches_per_epoch)
            if epoch != order_epoch:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_items, generator=gen)[self.rank::self.world]
                order_epoch = epoch
            yield order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
            batch += 1


# -----------------------------------------------------------------------------
# Checkpoints: atomic writes, newest-first loading with fallback
# -----------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    pass


def checkpoint_files(run_dir):
    """Checkpoint files of a run, newest first."""
    return sorted(Path(run_dir, "checkpoints").glob("step_*.pt"), reverse=True)


def save_checkpoint(state, run_dir, keep_every=0):
    """Write to a temporary file, fsync, then rename: a kill at any point leaves either the old
    set of checkpoints or the new one, never a half-written newest file. Keeps the two newest
    (so a damaged newest one still has a fallback) and every multiple of keep_every."""
    ckpt_dir = Path(run_dir, "checkpoints")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{state['step']:07d}.pt"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in checkpoint_files(run_dir)[2:]:
        step = int(old.stem.split("_")[1])
        if not (keep_every and step % keep_every == 0):
            old.unlink()
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file, or a run directory's newest readable one (falling back past a
    damaged file with a warning). The one loader: train.py resumes with it, sample.py samples."""
    path = Path(path)
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = checkpoint_files(path)
        if not candidates:
            raise CheckpointError(f"no checkpoint in {path}/checkpoints yet: run `python train.py` first")
    else:
        raise CheckpointError(f"{path} does not exist: run `python train.py` first, or pass --ckpt")
    for i, candidate in enumerate(candidates):
        try:
            state = torch.load(candidate, map_location=map_location, weights_only=False)
            if not isinstance(state, dict) or "model" not in state:
                raise ValueError("not a checkpoint of this project")
            return state
        except Exception as err:
            if i + 1 == len(candidates):
                raise CheckpointError(f"checkpoint {candidate} is unreadable ({err})") from None
            warnings.warn(f"checkpoint {candidate} is unreadable ({err}); falling back to {candidates[i + 1]}")


def build_model(model_args, **options):
    """Rebuild a DiT from the arguments a checkpoint stores (options: attn_backend, grad_checkpointing)."""
    args = dict(model_args)
    return dit.DiT_models[args.pop("name")](**args, **options)


# -----------------------------------------------------------------------------
# Optimisation helpers
# -----------------------------------------------------------------------------

def learning_rate(cfg, step):
    """Linear warm-up, then constant or a cosine decay to a tenth of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def update_ema(ema, model, decay):
    # One multi-tensor kernel for all parameters rather than one small kernel each.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def ema_decay(cfg, step):
    """Warmed up: early on, the average must forget the random initialisation quickly."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def sample_grid(model, diffusion, num_classes, per_class, steps, cfg_scale, device, seed=0):
    """per_class samples of every class, class-major: (num_classes * per_class, 3, H, W) in [0, 1].
    Uses its own generator, so drawing a grid never disturbs the training RNG (exact resume)."""
    gen = torch.Generator(device).manual_seed(seed)
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    s = model.input_size
    noise = torch.randn(len(y), model.in_channels, s, s, device=device, generator=gen)
    x = diffusion.sample(dit.guided_model_fn(model, y, cfg_scale), noise, steps=steps,
                         sampler="ddim", generator=gen)
    return (x.float().clamp(-1, 1) + 1) / 2


# -----------------------------------------------------------------------------
# Benchmark: images/s, ms/step, memory and MFU on random data
# -----------------------------------------------------------------------------

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H100 PCIe": 756.0, "A100": 312.0, "L4": 121.0}


def forward_flops(model_args, batch_size):
    """FLOPs of one forward pass, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model(model_args, attn_backend="math")
        x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size)
        t = torch.zeros(batch_size, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, t)
    return counter.get_total_flops()


def peak_tflops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in BF16_PEAK_TFLOPS if k in name]
    return BF16_PEAK_TFLOPS[max(matches, key=len)] if matches else None


# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------

MODEL_FIELDS = ("model", "image_size", "learn_sigma", "class_dropout", "conditioning", "schedule", "prediction")


def check_resume_compatible(cfg, saved_cfg, classes, saved_classes):
    saved_cfg = {"conditioning": "adaln-zero", **saved_cfg}  # runs saved before --conditioning existed
    for key in MODEL_FIELDS:
        if getattr(cfg, key) != saved_cfg[key]:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{cfg.out} holds a run trained with {flag} {saved_cfg[key]}, but this run asks "
                              f"for {getattr(cfg, key)}: pass the same value, or another --out")
    if classes != saved_classes:
        raise ConfigError(f"{cfg.out} was trained on classes {saved_classes}, but the data has {classes}")


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg):
    rank, world, device = setup_distributed(cfg.device)
    is_main = rank == 0
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.model not in dit.DiT_models:
        raise ConfigError(f"--model {cfg.model!r} is not a preset; choose from {', '.join(dit.DiT_models)}")
    patch = int(cfg.model.split("/")[1])
    if cfg.image_size % patch:
        raise ConfigError(f"--image-size {cfg.image_size} is not a multiple of {cfg.model}'s patch size {patch}")

    # --- data -------------------------------------------------------------------
    if cfg.benchmark:
        classes = [str(i) for i in range(10)]
    else:
        data_dir = cfg.data or BUILTIN_DATA
        if not cfg.data and is_main:
            ensure_builtin_dataset(data_dir)
        if world > 1:
            dist.barrier()  # the other ranks wait while rank 0 generates the built-in set
        # Flips happen below with a checkpointed generator, not in the data set: that keeps a
        # resumed run bitwise identical whatever the number of loader workers.
        dataset = ImageFolder(data_dir, cfg.image_size, hflip=False)
        check_batch_size(dataset, cfg.batch_size)
        classes = dataset.classes

    # --- model, EMA, optimizer, diffusion ---------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_args = dict(name=cfg.model, input_size=cfg.image_size, in_channels=3, num_classes=len(classes),
                      learn_sigma=cfg.learn_sigma, class_dropout_prob=cfg.class_dropout,
                      conditioning=cfg.conditioning)
    diffusion_args = dict(schedule=cfg.schedule, prediction=cfg.prediction, learn_sigma=cfg.learn_sigma,
                          loss_weighting=cfg.loss_weighting)
    model = build_model(model_args, attn_backend=cfg.attn, grad_checkpointing=cfg.grad_checkpointing)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    diffusion = dit.GaussianDiffusion(**diffusion_args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    num_params = sum(p.numel() for p in params)

    step, wall_before = 0, 0.0
    flip_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)
    torch.manual_seed(cfg.seed + rank)  # per-rank noise and timesteps
    if not cfg.benchmark and checkpoint_files(cfg.out):
        state = load_checkpoint(cfg.out)
        check_resume_compatible(cfg, state["config"], classes, state["classes"])
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, wall_before = state["step"], state["wall_time"]
        if world == 1:  # the saved RNG states are rank 0's
            torch.set_rng_state(state["rng"]["cpu"])
            flip_gen.set_state(state["rng"]["flip"])
            if device.type == "cuda" and state["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        if is_main:
            print(f"resuming {cfg.out} from step {step}")

    train_model = torch.compile(model) if cfg.compile else model
    if world > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint_state():
        return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "data_batches": step, "wall_time": wall_before + time.time() - start_time,
                "rng": {"cpu": torch.get_rng_state(), "flip": flip_gen.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "config": dataclasses.asdict(cfg), "model_args": model_args,
                "diffusion_args": diffusion_args, "classes": classes}

    # --- one training step ---------------------------------------------------------
    def train_step(x, y, lr):
        for group in opt.param_groups:
            group["lr"] = lr
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with autocast:
            losses = diffusion.training_losses(train_model, x, t, y)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        return loss.detach(), losses["mse"].mean().detach(), grad_norm

    local_batch = cfg.batch_size // world
    if cfg.benchmark:
        return benchmark(cfg, train_step, model_args, num_params, device, local_batch, len(classes), use_bf16)

    sampler = ResumableBatchSampler(len(dataset), local_batch, cfg.seed, rank, world, start_batch=step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.workers > 0,
                                         # its own generator: creating the iterator must not draw
                                         # from the global RNG, or a resumed run would diverge
                                         generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)

    # --- observability (rank 0 only writes) --------------------------------------
    out = Path(cfg.out)
    writer = metrics = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(out, purge_step=step)  # drops events a killed run logged past the checkpoint
        metrics = open_metrics(out / "metrics.csv", step)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"{cfg.model}: {num_params / 1e6:.2f}M parameters, {len(dataset)} images in "
              f"{len(classes)} classes, {world} x {device.type}, {'bf16' if use_bf16 else 'fp32'}")

    profiler = nullcontext()
    if cfg.profile and is_main:
        profiler = torch.profiler.profile(
            schedule=torch.profiler.schedule(wait=2, warmup=2, active=4, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out / "profile")),
            record_shapes=True, profile_memory=True)

    start_time = time.time()
    start_step = saved_step = step
    window = {"loss": 0.0, "mse": 0.0, "n": 0, "t": time.time()}
    last_loss = float("nan")
    bar = tqdm(total=cfg.steps, initial=step, disable=not is_main, dynamic_ncols=True)
    with StopFlag() as stop, profiler as prof:
        train_model.train()
        while step < cfg.steps and stop.signum is None:
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.hflip:
                flip = torch.rand(x.shape[0], generator=flip_gen) < 0.5
                x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            lr = learning_rate(cfg, step)
            loss, mse, grad_norm = train_step(x, y, lr)
            update_ema(ema, model, ema_decay(cfg, step))
            step += 1
            bar.update(1)
            if cfg.profile and is_main:
                prof.step()
            # Only here does the host wait for the device: everything above is queued asynchronously.
            window["loss"] += loss
            window["mse"] += mse
            window["n"] += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                n, dt = window["n"], time.time() - window["t"]
                last_loss = (window["loss"] / n).item()
                row = {"step": step, "loss": last_loss, "mse": (window["mse"] / n).item(),
                       "grad_norm": grad_norm.item(), "lr": lr, "img_per_s": n * cfg.batch_size / dt,
                       "elapsed_s": wall_before + time.time() - start_time}
                if is_main:
                    log_step(row, writer, metrics, bar)
                window = {"loss": 0.0, "mse": 0.0, "n": 0, "t": time.time()}
            if is_main and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                write_samples(ema, diffusion, cfg, classes, device, out, writer, step)
            if is_main and step % cfg.ckpt_every == 0:
                save_checkpoint(checkpoint_state(), out, cfg.keep_every)
                saved_step = step
        if is_main and saved_step != step:  # the last step, or where a signal stopped us
            save_checkpoint(checkpoint_state(), out, cfg.keep_every)
    bar.close()

    summary = None
    if is_main:
        if stop.signum is not None:
            print(f"stopped by signal {stop.signum} at step {step}; checkpoint saved, run again to resume")
        else:
            write_samples(ema, diffusion, cfg, classes, device, out, writer, step)
        wall = wall_before + time.time() - start_time
        summary = {"steps": step, "final_loss": last_loss, "wall_time_s": round(wall, 1),
                   "img_per_s": round((step - start_step) * cfg.batch_size / max(1e-9, time.time() - start_time), 1),
                   "model": cfg.model, "params": num_params, "device": str(device),
                   "interrupted": stop.signum is not None}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        writer.close()
        metrics.close()
    if world > 1:
        dist.destroy_process_group()
    return summary


# -----------------------------------------------------------------------------
# Logging and samples
# -----------------------------------------------------------------------------

METRIC_COLUMNS = ["step", "loss", "mse", "grad_norm", "lr", "img_per_s", "elapsed_s"]


def open_metrics(path, step):
    """Open metrics.csv for appending, first dropping rows a killed run wrote past `step`."""
    rows = []
    if path.exists():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, METRIC_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f


def log_step(row, writer, metrics, bar):
    step = row["step"]
    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
    bar.write(f"step {step:6d} | loss {row['loss']:.4f} | lr {row['lr']:.1e} | "
              f"norm {row['grad_norm']:.2f} | {row['img_per_s']:.0f} img/s")
    for key in ("loss", "mse", "grad_norm", "lr", "img_per_s"):
        writer.add_scalar(f"train/{key}", row[key], step)
    csv.DictWriter(metrics, METRIC_COLUMNS).writerow(row)
    metrics.flush()


def write_samples(ema, diffusion, cfg, classes, device, out, writer, step, per_class=8):
    import torchvision.utils
    with torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
        cfg_scale = cfg.cfg_scale if cfg.class_dropout > 0 else 1.0  # no null label, no guidance
        images = sample_grid(ema, diffusion, len(classes), per_class, cfg.sample_steps, cfg_scale, device)
    grid = torchvision.utils.make_grid(images, nrow=per_class, padding=1)  # one row per class
    (out / "samples").mkdir(exist_ok=True)
    torchvision.utils.save_image(grid, out / "samples" / f"step_{step:07d}.png")
    writer.add_image("samples/ema", grid, step)
    with torch.no_grad():  # a look at what the network outputs on fresh noise, for the histogram
        x = images[:per_class].to(device) * 2 - 1
        t = torch.randint(0, diffusion.num_timesteps, (len(x),), device=device,
                          generator=torch.Generator(device).manual_seed(step))
        writer.add_histogram("ema/prediction", ema(x, t, torch.zeros_like(t)).float().cpu(), step)


def benchmark(cfg, train_step, model_args, num_params, device, batch, num_classes, use_bf16):
    """Warm-up then timed steps on random data of the model's shape; prints one line, writes nothing."""
    s = cfg.image_size
    x = torch.randn(batch, 3, s, s, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    warmup, timed = (3, 10) if device.type == "cpu" else (15, 50)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    profiler = nullcontext()
    if cfg.profile:
        profiler = torch.profiler.profile(
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(Path(cfg.out, "profile"))))
    for _ in range(warmup):
        train_step(x, y, cfg.lr)
    sync()
    with profiler:
        t0 = time.perf_counter()
        for _ in range(timed):
            train_step(x, y, cfg.lr)
        sync()
        dt = (time.perf_counter() - t0) / timed
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    flops = 3 * forward_flops(model_args, batch)  # backward costs about twice the forward
    achieved = flops / dt / 1e12
    peak = peak_tflops(device)
    mfu = f" | MFU {100 * achieved / peak:.1f}% of {peak:.0f}" if peak else ""
    line = (f"benchmark | {cfg.model} {s}px | batch {batch} | attn {cfg.attn} | "
            f"{'bf16' if use_bf16 else 'fp32'} | compile {'on' if cfg.compile else 'off'} | "
            f"ckpt {'on' if cfg.grad_checkpointing else 'off'} | {batch / dt:.1f} img/s | "
            f"{1000 * dt:.1f} ms/step | peak mem {mem:.2f} GiB | {achieved:.2f} TFLOP/s{mfu}")
    print(line)
    return {"img_per_s": batch / dt, "ms_per_step": 1000 * dt, "peak_mem_gib": mem,
            "tflops": achieved, "mfu": achieved / peak if peak else None, "params": num_params}


def main(argv=None):
    try:
        cfg = parse_args(TrainConfig, sys.argv[1:] if argv is None else argv, TRAIN_PRESETS)
        return train(cfg)
    except (ConfigError, DatasetError, CheckpointError) as err:
        raise SystemExit(f"train.py: error: {err}") from None


if __name__ == "__main__":
    main()

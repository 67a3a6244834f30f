"""
Where a training step's time goes on this machine, and how close the step comes to its matmul peak.

    python assets/profile_cpu.py                       # the default recipe (config.py's "cpu" preset)
    python assets/profile_cpu.py --preset text         # any train.py flags: the same parser
    python assets/profile_cpu.py --compile             # the step under torch.compile

Prints three things in one run, so that they share the machine's state:
1. the machine's fp32 matmul peak: the best GFLOP/s of torch.mm over a few large square sizes;
2. the training step's achieved GFLOP/s (the paper's count of the forward, times 3 for forward and
   backward, two flops a multiply-add) and its share of that peak. A time holds for one machine;
   the share carries across machines;
3. a table of where a step goes: each part timed alone at the run's own shapes, forward and
   backward (attention, MLP, adaLN, the block's norms and residuals, embedders and final layer), then
   the optimizer, the gradient clip, the EMA, the data and the log's bookkeeping, against a full
   step of train.py's own step function. "The rest" is the whole minus the parts: the loss,
   autograd's own work and allocation; negative where small parts timed alone use the threads
   worse than inside the step.
Nothing is written. Timings take the median of repeated runs; run it on a quiet machine.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dit  # noqa: E402
import train  # noqa: E402
from config import TRAIN_PRESETS, TrainConfig, parse_args  # noqa: E402


def median_seconds(fn, repeats=30, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_gflops():
    """The best fp32 torch.mm rate over a few square sizes: what this machine's BLAS can do."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        seconds = median_seconds(lambda: a @ b, repeats=10 if n < 2048 else 4, warmup=2)
        best = max(best, 2 * n ** 3 / seconds / 1e9)
    return best


def forward_backward(module, *inputs):
    """A function that runs module(*inputs) forward and backward, as in a training step."""
    inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]

    def run():
        out = module(*inputs)
        out.float().square().mean().backward()
    return run


def main(argv=None):
    cfg = parse_args(TrainConfig, sys.argv[1:] if argv is None else argv, TRAIN_PRESETS)
    proc = train.Process(0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    takes_captions = dit.MODELS[cfg.model].func.conditions_on == "captions"
    state = train.build_state(cfg, None if takes_captions else [str(i) for i in range(8)], proc)
    model, batch, size = state.model, cfg.batch_size, cfg.image_size
    x = torch.randn(batch, 3, size, size)
    y = model.conditions(["a triangle in purple"] * 8)[torch.randint(0, 8, (batch,))]
    step = train.make_train_step(cfg, state, proc)

    peak = matmul_peak_gflops()
    whole = median_seconds(lambda: step(x, y, cfg.lr), repeats=20)
    with torch.device("meta"):
        gmacs = dit.forward_gmacs(train.build_model(state.model_args))
    achieved = 6 * gmacs * batch / whole  # GFLOP/s: forward and backward ~ 3 forwards, 2 flops a MAC

    # The parts, at the step's own shapes: one block's sublayers, times the depth.
    block, depth = model.blocks[0], len(model.blocks)
    tokens = model.x_embedder(x).detach()                                    # (N, T, D)
    N, T, D = tokens.shape
    c = torch.randn(N, D)
    with torch.no_grad():
        _, context, lengths = model.condition(torch.zeros(N), y)
    parts = {
        "attention (qkv, softmax, proj)": (forward_backward(block.attn, tokens), depth),
        "MLP": (forward_backward(block.mlp, tokens), depth),
        "LayerNorms": (forward_backward(lambda t: block.norm2(block.norm1(t)), tokens), depth),
    }
    if block.cross_attn is not None and context is not None:
        parts["cross-attention"] = (forward_backward(lambda t, k: block.cross_attn(t, k, lengths),
                                                     tokens, context.detach()), depth)
    if hasattr(block, "adaLN_modulation"):
        parts["adaLN regression (c -> shifts, scales, gates)"] = (forward_backward(block.adaLN_modulation, c), depth)
    parts["patch embedding, final layer"] = (forward_backward(
        lambda img, cc: model.final_layer(model.x_embedder(img), cc), x, c), 1)
    if takes_captions:
        parts["caption encoder"] = (lambda: model.caption_encoder(y)[2].square().mean().backward(), 1)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    parts["AdamW (fused)"] = (state.opt.step, 1)
    parts["gradient clip"] = (lambda: torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")), 1)
    parts["EMA update"] = (lambda: train.update_ema(state.ema, model, 0.999), 1)
    dataset = train.ImageFolder(train.BUILTIN_DATA, size) if not takes_captions and Path(train.BUILTIN_DATA).is_dir() else None
    if dataset is not None:
        batches = train.make_batches(cfg, dataset, 0, proc)
        parts["data (next batch)"] = (lambda: train.next_batch(batches, cfg, state, proc.device), 1)
    window = train.Window(0)
    one = torch.tensor(1.0)
    parts["log bookkeeping (Window.add)"] = (lambda: window.add(one, one, one), 1)

    rows = [(name, median_seconds(fn) * times) for name, (fn, times) in parts.items()]
    print(f"{cfg.model} {size}px, batch {batch}, {torch.get_num_threads()} threads, compile "
          f"{'on' if cfg.compile else 'off'}, torch {torch.__version__}")
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s (torch.mm, square 512-2048)")
    print(f"training step: {1000 * whole:.1f} ms, {batch / whole:.0f} img/s, {achieved:.1f} GFLOP/s "
          f"= {100 * achieved / peak:.0f}% of the peak ({gmacs * 1e3:.2f} MMACs per image forward)")
    print()
    print("| part | ms per step | share of the step |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {100 * seconds / whole:.0f}% |")
    rest = whole - sum(s for _, s in rows)
    # One training grid, as the run draws it (8 samples of each of 8 rows), against the step.
    grid_y = model.conditions([str(i) for i in range(8)] if not takes_captions else ["a red star"] * 8)
    grid_y = grid_y.repeat_interleave(8, 0)
    start = time.perf_counter()
    for _ in dit.draw(state.ema, state.diffusion, grid_y, list(range(8)) * 8, 0, cfg.sample_steps, cfg.cfg_scale,
                      interval=cfg.cfg_interval):
        pass
    grid = time.perf_counter() - start
    print(f"| the rest: the whole minus the parts | {1000 * rest:.1f} | {100 * rest / whole:.0f}% |")
    print(f"| **whole step** (train.py's step function) | **{1000 * whole:.1f}** | 100% |")
    print()
    print(f"one sample grid (64 images, {cfg.sample_steps} steps, cfg {cfg.cfg_scale:g} in {cfg.cfg_interval}): "
          f"{grid:.1f} s, the time of {grid / whole:.0f} training steps")


if __name__ == "__main__":
    main()

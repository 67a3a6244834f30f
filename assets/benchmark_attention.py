"""
The README's attention benchmark, measured in one sitting on one CUDA GPU:

    python assets/benchmark_attention.py                   # writes assets/attention_benchmark.md
    python assets/benchmark_attention.py --autotune quick  # only the configs that usually win
    TRITON_INTERPRET=1 python assets/benchmark_attention.py --smoke --out /tmp/t.md   # CPU dry run

Our Triton FlashAttention (flash_attn_triton.py) against PyTorch's SDPA backends (flash,
memory-efficient, cuDNN, each where this PyTorch has it and it accepts the shape) and plain
PyTorch ops, in bf16, non-causal. For each shape it first checks our output against SDPA, then
times the forward pass and forward+backward with triton.testing.do_bench (medians) and records
the peak memory of one forward+backward. A second table divides our TFLOP/s by the best SDPA
backend's, and a third lists the block sizes our autotuner chose. The first call of our kernel for each shape autotunes it: expect a few minutes, or
about a third of that with `--autotune quick`. `--smoke` runs the same code at toy sizes on the
CPU (the kernel in Triton's interpreter, a wall-clock timer), so that the script cannot rot
between GPU sessions; its numbers mean nothing. assets/gpu_check.sh runs both.
"""

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flash_attn_triton  # noqa: E402
from flash_attn_triton import flash_attention  # noqa: E402

SHAPES = [  # (workload, B, H, N, D): the paper's models at 256 tokens, then longer sequences
    ("DiT-S/2 256px", 32, 6, 256, 64),
    ("DiT-XL/2 256px", 32, 16, 256, 72),
    ("DiT-XL/2 512px", 8, 16, 1024, 72),
    ("N=4096", 4, 16, 4096, 64),
    ("N=16384", 1, 16, 16384, 64),
    ("N=16384 D=128", 1, 16, 16384, 128),
]
SMOKE_SHAPES = [("toy", 1, 2, 33, 72)]  # ragged against every block, head dim padded to 128

# The autotune candidates most likely to win on Hopper (the Triton tutorial's FlashAttention
# choices and their neighbours: a guess until a GPU run's third table shows which win), the 8-warp
# 64 x 64 dK/dV tile, which spills no registers at large head dims (assets/compile_sm90.md), and the
# smallest tile, which fits any dtype and head dim. --autotune quick keeps only these of
# flash_attn_triton's lists (15 configs instead of 38), so that a new shape compiles and times a
# third as many. Each is (BLOCK_M, BLOCK_N, warps, stages): BLOCK_M always tiles the queries and
# BLOCK_N the keys, also in dK/dV, where a program owns keys.
QUICK_CONFIGS = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
}


def tuned_kernels():
    """Our three autotuned kernels by short name (the preprocess kernel has one fixed block)."""
    return {"fwd": flash_attn_triton._attn_fwd_tuned, "dkdv": flash_attn_triton._attn_bwd_dkdv_tuned,
            "dq": flash_attn_triton._attn_bwd_dq_tuned}


def config_key(config):
    """(BLOCK_M, BLOCK_N, warps, stages) of a triton.Config, as QUICK_CONFIGS writes them."""
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)


def quick_autotune():
    """Narrow each kernel's autotune list to QUICK_CONFIGS, in this process. A candidate the
    kernel no longer lists is skipped; if none is left, the full list stays (and we say so)."""
    for name, tuned in tuned_kernels().items():
        keep = [c for c in tuned.configs if config_key(c) in QUICK_CONFIGS[name]]
        if keep:
            tuned.configs = keep
        else:
            print(f"--autotune quick: none of QUICK_CONFIGS[{name!r}] is a candidate of the kernel any "
                  f"more; it keeps all {len(tuned.configs)}")
    return {name: len(tuned.configs) for name, tuned in tuned_kernels().items()}


def autotune_choice():
    """What the autotuner chose at the last call of each kernel, e.g. 'fwd 128x64 w4 s3'."""
    if flash_attn_triton._INTERPRET:
        return "the interpreter's fixed blocks"
    words = []
    for name, tuned in tuned_kernels().items():
        best = getattr(tuned, "best_config", None)
        words.append(f"{name} " + ("?" if best is None else "{}x{} w{} s{}".format(*config_key(best))))
    return ", ".join(words)


def plain_attention(q, k, v):
    """Attention with plain PyTorch ops: the (N, N) score matrix is materialised."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
    return scores.softmax(dim=-1) @ v  # (B, H, N, D)


def methods():
    """(name, attention function, SDPA backend or None) for everything that is timed."""
    out = [("ours (Triton)", flash_attention, None)]
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # PyTorch < 2.3 cannot pin a backend: time SDPA's own choice
        out.append(("SDPA (default)", F.scaled_dot_product_attention, None))
    else:
        for name, attr in (("SDPA flash", "FLASH_ATTENTION"), ("SDPA efficient", "EFFICIENT_ATTENTION"),
                           ("SDPA cuDNN", "CUDNN_ATTENTION")):
            if hasattr(SDPBackend, attr):  # cuDNN only from PyTorch 2.5
                out.append((name, F.scaled_dot_product_attention, getattr(SDPBackend, attr)))
    out.append(("plain PyTorch", plain_attention, None))
    return out


def host_bench(fn, grad_to_none=None, return_mode="median", reps=2):
    """do_bench's stand-in on the CPU (--smoke): median wall-clock ms of a few calls."""
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def time_method(fn, backend, q, k, v, do):
    """Median forward ms, median forward+backward ms, peak MiB of one forward+backward (None
    off CUDA)."""
    if backend is None:
        pinned = contextlib.nullcontext()
    else:
        from torch.nn.attention import sdpa_kernel

        pinned = sdpa_kernel(backend)
    cuda = q.is_cuda
    bench = do_bench if cuda else host_bench

    def fwd_bwd():
        fn(q, k, v).backward(do)

    with pinned:
        with torch.no_grad():  # forward only: no autograd bookkeeping, nothing saved
            fwd_ms = bench(lambda: fn(q, k, v), return_mode="median")
        both_ms = bench(fwd_bwd, grad_to_none=[q, k, v], return_mode="median")
        q.grad = k.grad = v.grad = None
        if not cuda:
            return fwd_ms, both_ms, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
    return fwd_ms, both_ms, torch.cuda.max_memory_allocated() / 2**20


def measure(workload, B, H, N, D, dtype=torch.bfloat16, device="cuda"):
    """One row per method that ran: (workload, shape, method, fwd_ms, fwd_tflops,
    both_ms, both_tflops, peak_mib), with None for the numbers of a run out of memory."""
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(4))  # (B, H, N, D)
    for t in (q, k, v):
        t.requires_grad_(True)
    with torch.no_grad():  # correctness first: a fast wrong kernel is worthless
        err = (flash_attention(q, k, v).float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max()
    print(f"{workload} (B={B}, H={H}, N={N}, D={D}): max |ours - SDPA| = {err.item():.2e}")
    fwd_flops = 4 * B * H * N * N * D  # two matmuls (Q K^T and P V) of 2 * N * N * D each
    both_flops = 3.5 * fwd_flops  # backward = 2.5 x forward: five matmuls instead of two
    rows = []
    for name, fn, backend in methods():
        result = skipped = None
        try:
            result = time_method(fn, backend, q, k, v, do)
        except torch.cuda.OutOfMemoryError:
            pass  # result stays None: reported as OOM
        except RuntimeError as exc:  # e.g. "No available kernel": this backend rejects the shape
            skipped = (str(exc).strip().splitlines() or ["?"])[0][:100]
        # Outside the except block, so that the traceback no longer pins the big tensors.
        q.grad = k.grad = v.grad = None
        gc.collect()
        if q.is_cuda:
            torch.cuda.empty_cache()
        if skipped is not None:
            print(f"  {name:16s} skipped: {skipped}")
            continue
        shape = f"B={B} H={H} N={N} D={D}"
        if result is None:
            print(f"  {name:16s} OOM")
            rows.append((workload, shape, name, None, None, None, None, None))
            continue
        fwd_ms, both_ms, peak = result
        fwd_tf, both_tf = fwd_flops / fwd_ms * 1e-9, both_flops / both_ms * 1e-9  # ms -> TFLOP/s
        peak_text = "n/a" if peak is None else f"{peak:9.1f} MiB"
        print(f"  {name:16s} fwd {fwd_ms:8.3f} ms {fwd_tf:6.1f} TFLOP/s | fwd+bwd {both_ms:8.3f} ms "
              f"{both_tf:6.1f} TFLOP/s | peak {peak_text}")
        rows.append((workload, shape, name, fwd_ms, fwd_tf, both_ms, both_tf, peak))
    return rows


def report(rows, gpu, choices, autotune="full", command="python assets/benchmark_attention.py"):
    """The markdown tables: every measurement, then ours relative to the best SDPA backend, then
    the block sizes the autotuner chose for each shape."""
    def cell(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    tuned = ("every candidate config of flash_attn_triton.py" if autotune == "full" else
             "`--autotune quick` (QUICK_CONFIGS in this script)")
    lines = [
        "# Attention benchmark", "",
        f"GPU: {gpu}. torch {torch.__version__}, triton {triton.__version__}, bfloat16, non-causal. "
        "Forward FLOPs = 4·B·H·N²·D, backward = 2.5 × forward. Times are medians of "
        "`triton.testing.do_bench`. Peak memory is `torch.cuda.max_memory_allocated` over one "
        f"forward+backward, including the inputs, dO and the gradients. Our kernel autotuned over {tuned}. "
        f"Reproduce with `{command}`.", "",
        "| workload | shape | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for workload, shape, name, fwd_ms, fwd_tf, both_ms, both_tf, peak in rows:
        if fwd_ms is None:  # out of memory
            lines.append(f"| {workload} | {shape} | {name} | OOM | | | | |")
            continue
        lines.append(f"| {workload} | {shape} | {name} | {cell(fwd_ms, '.3f')} | {cell(fwd_tf, '.1f')} | "
                     f"{cell(both_ms, '.3f')} | {cell(both_tf, '.1f')} | {cell(peak, '.0f')} |")

    lines += ["", "Ours relative to the fastest SDPA backend for each shape (> 1: ours is faster).", "",
              "| workload | fwd: ours / best SDPA | best SDPA fwd "
              "| fwd+bwd: ours / best SDPA | best SDPA fwd+bwd |",
              "|---|---:|---|---:|---|"]
    for workload in dict.fromkeys(r[0] for r in rows):
        cells = []
        for col in (4, 6):  # forward TFLOP/s, forward+backward TFLOP/s
            ours = [r[col] for r in rows if r[0] == workload and r[2].startswith("ours") and r[col]]
            sdpa = [(r[col], r[2]) for r in rows if r[0] == workload and r[2].startswith("SDPA") and r[col]]
            if ours and sdpa:
                best, best_name = max(sdpa)
                cells += [f"{ours[0] / best:.2f}", f"{best_name} ({best:.1f} TFLOP/s)"]
            else:
                cells += ["n/a", "none ran"]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")

    lines += ["", "Block sizes the autotuner chose for our kernels (BLOCK_M x BLOCK_N, warps, stages).", "",
              "| workload | chosen |", "|---|---|"]
    lines += [f"| {workload} | {choice} |" for workload, choice in choices.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "attention_benchmark.md"))
    parser.add_argument("--autotune", choices=("full", "quick"), default="full",
                        help="our kernel's autotune candidates: all, or QUICK_CONFIGS only")
    parser.add_argument("--smoke", action="store_true",
                        help="toy shapes on the CPU with TRITON_INTERPRET=1: checks the script, not the kernel")
    args = parser.parse_args(argv)
    if args.smoke:
        if not flash_attn_triton._INTERPRET:
            print("--smoke runs the kernel in Triton's interpreter: start with TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, gpu, shapes = "cpu", "none (--smoke on the CPU: interpreter, wall clock; numbers mean nothing)", SMOKE_SHAPES
    elif not torch.cuda.is_available():
        print("This benchmark needs a CUDA GPU: it times compiled Triton kernels. Nothing to do here.")
        return 0
    elif flash_attn_triton._INTERPRET:
        print("TRITON_INTERPRET is set: the kernels would run on the CPU interpreter. Unset it to "
              "benchmark the compiled kernels.")
        return 0
    else:
        device, gpu, shapes = "cuda", torch.cuda.get_device_name(), SHAPES
    if args.autotune == "quick":
        print(f"--autotune quick: candidates per kernel {quick_autotune()}")
    command = "python assets/benchmark_attention.py" + " --autotune quick" * (args.autotune == "quick")
    print(f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}; bf16")
    print("The first Triton call for each shape autotunes its kernels: expect a few minutes.")
    rows, choices = [], {}
    for shape in shapes:
        rows += measure(*shape, device=device)
        if any(r[0] == shape[0] and r[2].startswith("ours") and r[3] is not None for r in rows):
            choices[shape[0]] = autotune_choice()  # the last calls of our kernels were this shape's
            print(f"  autotune chose: {choices[shape[0]]}")
        # Written after every shape: a run stopped by a time limit keeps the shapes it finished.
        table = report(rows, gpu, choices, args.autotune, command)
        Path(args.out).write_text(table, encoding="utf-8")
    print("\n" + table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""
The README's attention benchmark, measured in one sitting on one CUDA GPU:

    python assets/benchmark_attention.py            # writes assets/attention_benchmark.md

Our Triton FlashAttention (flash_attn_triton.py) against PyTorch's SDPA backends (flash,
memory-efficient, cuDNN, each where this PyTorch has it and it accepts the shape) and plain
PyTorch ops, in bf16, non-causal. For each shape it first checks our output against SDPA, then
times the forward pass and forward+backward with triton.testing.do_bench (medians) and records
the peak memory of one forward+backward. The last table divides our TFLOP/s by the best SDPA
backend's. The first call of our kernel for each shape autotunes it: expect a few minutes.
"""

import argparse
import contextlib
import gc
import sys
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


def time_method(fn, backend, q, k, v, do):
    """Median forward ms, median forward+backward ms, peak MiB of one forward+backward."""
    if backend is None:
        pinned = contextlib.nullcontext()
    else:
        from torch.nn.attention import sdpa_kernel

        pinned = sdpa_kernel(backend)

    def fwd_bwd():
        fn(q, k, v).backward(do)

    with pinned:
        with torch.no_grad():  # forward only: no autograd bookkeeping, nothing saved
            fwd_ms = do_bench(lambda: fn(q, k, v), return_mode="median")
        both_ms = do_bench(fwd_bwd, grad_to_none=[q, k, v], return_mode="median")
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
    return fwd_ms, both_ms, torch.cuda.max_memory_allocated() / 2**20


def measure(workload, B, H, N, D, dtype=torch.bfloat16):
    """One row per method that ran: (workload, shape, method, fwd_ms, fwd_tflops,
    both_ms, both_tflops, peak_mib), with None for the numbers of a run out of memory."""
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(4))  # (B, H, N, D)
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
        print(f"  {name:16s} fwd {fwd_ms:8.3f} ms {fwd_tf:6.1f} TFLOP/s | fwd+bwd {both_ms:8.3f} ms "
              f"{both_tf:6.1f} TFLOP/s | peak {peak:9.1f} MiB")
        rows.append((workload, shape, name, fwd_ms, fwd_tf, both_ms, both_tf, peak))
    return rows


def report(rows, gpu):
    """The markdown tables: every measurement, then ours relative to the best SDPA backend."""
    def cell(x, fmt):
        return "OOM" if x is None else format(x, fmt)

    lines = [
        "# Attention benchmark", "",
        f"GPU: {gpu}. torch {torch.__version__}, triton {triton.__version__}, bfloat16, non-causal. "
        "Forward FLOPs = 4·B·H·N²·D, backward = 2.5 × forward. Times are medians of "
        "`triton.testing.do_bench`. Peak memory is `torch.cuda.max_memory_allocated` over one "
        "forward+backward, including the inputs, dO and the gradients. "
        "Reproduce with `python assets/benchmark_attention.py`.", "",
        "| workload | shape | method | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for workload, shape, name, fwd_ms, fwd_tf, both_ms, both_tf, peak in rows:
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
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "attention_benchmark.md"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("This benchmark needs a CUDA GPU: it times compiled Triton kernels. Nothing to do here.")
        return 0
    if flash_attn_triton._INTERPRET:
        print("TRITON_INTERPRET is set: the kernels would run on the CPU interpreter. Unset it to "
              "benchmark the compiled kernels.")
        return 0
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}; bf16")
    print("The first Triton call for each shape autotunes its kernels: expect a few minutes.")
    rows = []
    for shape in SHAPES:
        rows += measure(*shape)
    table = report(rows, gpu)
    print("\n" + table)
    Path(args.out).write_text(table, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

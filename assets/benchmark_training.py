"""
The README's training-throughput table, measured in one sitting on one GPU:

    python assets/benchmark_training.py                 # writes assets/train_benchmark.md
    TRITON_INTERPRET=1 python assets/benchmark_training.py --models DiT-Mi/4 --image-size 16 \
        --batches 8 --max-batch 16 --out /tmp/table.md                 # a smoke run on a CPU

Every row is one `python train.py --benchmark ...` (random data of the model's shape, warm-up, then
timed AdamW steps). The paper setting is 256 tokens: 32 x 32 inputs in 2 x 2 patches. Per model:
bf16 with the Triton kernel, then the variations the README compares: attention math / sdpa /
triton, fp32 vs bf16, torch.compile on, gradient checkpointing on, and for checkpointing off vs on
the largest power-of-two batch that fits.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def run(model, image_size, batch, attn="triton", precision="bf16", compile=False, ckpt=False):
    argv = ["--benchmark", "--model", model, "--image-size", str(image_size), "--batch-size", str(batch),
            "--attn", attn, "--precision", precision, "--out", "runs/benchmark"]
    argv += ["--compile"] * compile + ["--grad-checkpointing"] * ckpt
    row = dict(model=model, batch=batch, attn=attn, precision=precision, compile=compile, ckpt=ckpt)
    try:
        row.update(train.main(argv))
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as err:  # e.g. a backend that cannot compile: one row fails, not the table
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:80]}"
        print(f"{model} batch {batch} {attn} {precision} compile={compile} ckpt={ckpt}: {row['error']}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def largest_batch(model, image_size, start, limit, **options):
    """Double the batch until it no longer fits; the last row that fitted."""
    best, batch = None, start
    while batch <= limit:
        row = run(model, image_size, batch, **options)
        if row.get("oom") or row.get("error"):
            break
        best, batch = row, batch * 2
    return best


def table(rows, device, command="python assets/benchmark_training.py"):
    lines = [f"Training throughput on {device}, measured by `{command}` (torch {torch.__version__}).", "",
             "| model | batch | attention | precision | compile | grad ckpt | img/s | ms/step | peak GiB | TFLOP/s | MFU |",
             "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r is None:
            continue
        head = (f"| {r['model']} | {r['batch']} | {r['attn']} | {r['precision']} | "
                f"{'on' if r['compile'] else 'off'} | {'on' if r['ckpt'] else 'off'} |")
        if r.get("oom") or r.get("error"):
            lines.append(head + f" {'OOM' if r.get('oom') else 'failed: ' + r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        lines.append(head + f" {r['img_per_s']:.0f} | {r['ms_per_step']:.1f} | {r['peak_mem_gib']:.1f} | "
                            f"{r['tflops']:.1f} | {mfu} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 256, 64],
                        help="batch per model, in the order of --models")
    parser.add_argument("--max-batch", type=int, default=4096, help="where the batch search stops")
    parser.add_argument("--out", default=str(Path(__file__).parent / "train_benchmark.md"))
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = []
    for model, batch in zip(args.models, args.batches):
        size = args.image_size
        rows.append(run(model, size, batch))                         # the baseline: bf16, triton
        rows += [run(model, size, batch, attn=a) for a in ("sdpa", "math")]
        rows.append(run(model, size, batch, precision="fp32"))
        rows.append(run(model, size, batch, compile=True))
        rows.append(largest_batch(model, size, batch, args.max_batch))
        rows.append(largest_batch(model, size, batch, args.max_batch, ckpt=True))
    text = table(rows, device)
    print(text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

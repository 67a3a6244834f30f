"""
Time to quality: how a run's samples improve with the wall time spent training, from the
checkpoints kept along it (train with --keep-every N).

    python train.py --keep-every 500 --out runs/curve          # checkpoints every 500 steps stay
    python assets/time_to_quality.py runs/curve                 # a table of recognised, FD, TV
    python assets/time_to_quality.py runs/old runs/new --plot assets/time_to_quality.png

Each checkpoint is judged by assets/evaluate.py with sample.py's defaults; its wall time is the
training time the checkpoint recorded (not counting start-up or the final grid). The plot
(matplotlib, optional: pip install matplotlib) puts recognised and feature FD against minutes,
one line per run. Not a run-time part of the project: it only measures.
"""

import argparse
import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import train  # noqa: E402


def curve(run):
    """[(step, wall seconds, evaluate.py's result)] for every checkpoint of `run`, oldest first."""
    points = []
    for path in reversed(train.checkpoint_files(run)):
        state = train.read_checkpoint(path)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = evaluate.main(["--ckpt", str(path)])
        points.append((state["step"], state["wall_time"], result))
        print(f"{run} step {state['step']:5d} | {state['wall_time'] / 60:5.2f} min | recognised "
              f"{100 * result['recognised']:5.1f}% (worst {100 * min(result['per_class']):5.1f}%) | FD "
              f"{result['fd']:5.1f} | colour TV {result.get('colour_tv', float('nan')):.3f}", flush=True)
    return points


def plot(curves, out):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("time_to_quality.py: --plot needs matplotlib (pip install matplotlib)") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    for run, points in curves.items():
        minutes = [wall / 60 for _, wall, _ in points]
        left.plot(minutes, [100 * r["recognised"] for *_, r in points], marker="o", label=run)
        right.plot(minutes, [r["fd"] for *_, r in points], marker="o", label=run)
    left.axhline(95, color="grey", linestyle="--", linewidth=1)   # the targets: 95% recognised ...
    right.axhline(3.0, color="grey", linestyle="--", linewidth=1)  # ... and FD at most 3.0
    left.set(xlabel="training time (min)", ylabel="recognised (%)", ylim=(0, 100))
    right.set(xlabel="training time (min)", ylabel="feature FD (lower is better)", yscale="log")
    for ax in (left, right):
        ax.grid(color="#ddd")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories trained with --keep-every")
    parser.add_argument("--plot", default="", help="write the plot here (PNG or SVG)")
    args = parser.parse_args(argv)
    curves = {run: curve(run) for run in args.runs}
    if args.plot:
        plot(curves, args.plot)
    return curves


if __name__ == "__main__":
    main()

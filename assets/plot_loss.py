"""
Draw a run's training loss (its metrics.csv) with matplotlib.

    pip install matplotlib                               # optional: training and sampling never need it
    python assets/plot_loss.py                           # runs/default -> assets/loss.svg
    python assets/plot_loss.py runs/mine assets/mine.png # any format matplotlib writes

TensorBoard shows the same curve with nothing extra installed: `tensorboard --logdir runs`, scalar
`train/loss`.
"""

import csv
import sys
from pathlib import Path


def read_losses(path):
    """(steps, losses) from metrics.csv, skipping rows that do not parse."""
    steps, losses = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step, loss = int(row["step"]), float(row["loss"])
            except (KeyError, TypeError, ValueError):
                continue
            steps.append(step)
            losses.append(loss)
    return steps, losses


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run = Path(argv[0] if argv else "runs/default")
    out = Path(argv[1] if len(argv) > 1 else Path(__file__).parent / "loss.svg")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_loss.py: matplotlib is not installed (pip install matplotlib); "
                         "TensorBoard shows the same curve: tensorboard --logdir runs") from None
    if not (run / "metrics.csv").is_file():
        raise SystemExit(f"plot_loss.py: no {run / 'metrics.csv'}: train a run first (python train.py)")
    steps, losses = read_losses(run / "metrics.csv")
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(steps, losses, color="#3465a4", linewidth=2)
    ax.set_title(f"training loss, {run.name} (min-SNR weighted, one point per log window)", fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.grid(color="#ddd")
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""
Draw a run's training loss (metrics.csv) as an SVG line chart, with no plotting library.

    python assets/plot_loss.py                          # runs/default -> assets/loss.svg
    python assets/plot_loss.py runs/mine assets/mine.svg
"""

import csv
import math
import sys
from pathlib import Path

W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 320, 64, 16, 28, 44


def nice_ticks(hi, count=5):
    """0, step, 2 step, ... up to hi, with step 1, 2 or 5 times a power of ten."""
    raw = hi / count
    base = 10 ** math.floor(math.log10(raw))
    step = min(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return [i * step for i in range(int(hi / step) + 1)]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run = Path(argv[0] if argv else "runs/default")
    out = Path(argv[1] if len(argv) > 1 else Path(__file__).parent / "loss.svg")
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    x_max, y_max = max(steps), max(losses) * 1.05

    def px(step, loss):
        return (LEFT + (W - LEFT - RIGHT) * step / x_max, TOP + (H - TOP - BOTTOM) * (1 - loss / y_max))

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (px(s, v) for s, v in zip(steps, losses)))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">training loss, {run.name} '
             f'(min-SNR weighted, one point per log window)</text>']
    for v in nice_ticks(y_max):
        _, y = px(0, v)
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{round(v, 6):g}</text>')
    for s in nice_ticks(x_max):
        x, _ = px(s, 0)
        parts.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{int(s)}</text>')
    parts += [f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle">step</text>',
              f'<polyline points="{points}" fill="none" stroke="#3465a4" stroke-width="2"/>',
              f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
              f'fill="none" stroke="#888"/></svg>']
    out.write_text("\n".join(parts) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

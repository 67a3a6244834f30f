"""
The DiT paper's conditioning experiment (Sec. 3.2, Fig. 5, Table 4) at laptop scale: the four
designs, in-context, cross-attention, adaLN and adaLN-Zero, trained on the same data with the same
seed and the same number of steps, then judged by the same classifier (assets/evaluate.py).

    python assets/conditioning_experiment.py                   # CPU: 1200 steps each, 17 min in all
    python assets/conditioning_experiment.py --steps 3600      # 3x the budget (not measured)
    python assets/conditioning_experiment.py --preset gpu      # the GPU preset's model and budget
    python assets/conditioning_experiment.py --steps 20 --num 4 --runs /tmp/cond --out /tmp/cond  # smoke

On the cpu preset every design trains the earlier 16 px recipe (CPU_RECIPE below: DiT-Ti/4 in
4 x 4 patches, v-prediction, unshifted schedule, AdamW beta2 0.999, lr 2e-3 with 100 warm-up
steps), the one the README's table was measured with.
Any other flag goes to every train.py run (e.g. --batch-size 64). Writes <out>/conditioning.md (a
table: parameters, GMACs per image, final loss, share of samples recognised, training time) and
<out>/conditioning_<design>.png (one row per class, enlarged). Runs go to <runs>/<design>; a run
that already finished is read back, not trained again.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import dit  # noqa: E402
import evaluate  # noqa: E402  (assets/evaluate.py: the classifier that judges the samples)
import sample  # noqa: E402
import train  # noqa: E402
from config import SampleConfig, TRAIN_PRESETS, TrainConfig  # noqa: E402

# The paper's Table 4: DiT-XL/2 on ImageNet 256x256 latents, FID-50K after 400K steps.
PAPER = {"in-context": (449, 119.37, 35.24), "cross-attn": (598, 137.62, 26.14),
         "adaln": (600, 118.56, 25.21), "adaln-zero": (675, 118.64, 19.47)}


CPU_RECIPE = ["--image-size", "16", "--model", "DiT-Ti/4", "--prediction", "v", "--noise-shift", "1",
              "--adam-beta2", "0.999", "--lr", "2e-3", "--warmup-steps", "100"]


def train_design(design, args, train_argv):
    """Train one design (or read back its finished run); returns the run's summary."""
    run = Path(args.runs) / design
    summary_file = run / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        if summary["steps"] >= args.steps and not summary["interrupted"]:
            print(f"{design}: finished run found in {run}")
            return summary
    argv = ["--preset", args.preset, "--conditioning", design, "--out", str(run), "--steps", str(args.steps),
            "--sample-every", "0", *(CPU_RECIPE if args.preset == "cpu" else []), *train_argv]
    print(f"{design}: python train.py {' '.join(argv)}")
    return train.main(argv)


def judge(design, args, cfg_scale, device):
    """Share of samples the classifier recognises, and one grid of samples per class, both with the
    guidance scale the run was trained to show (train.py's --cfg-scale), colour included as in the
    paper."""
    run = str(Path(args.runs) / design)
    recognised = evaluate.main(["--ckpt", run, "--num", str(args.num), "--cfg-scale", str(cfg_scale),
                                "--cfg-colour-scale", str(cfg_scale), "--cfg-interval", "0", "1000"]
                               )["recognised"]
    model, diffusion, classes = sample.load_model(run, device)
    cfg = SampleConfig(num=8, steps=50, cfg_scale=cfg_scale, cfg_interval=(0, 1000), cfg_colour_scale=cfg_scale,
                       seed=0)
    images, _ = sample.generate(model, diffusion, torch.arange(len(classes)), cfg, device)
    zoom = max(1, 64 // model.input_size)  # nearest-pixel enlargement: 16 px images are hard to see
    train.save_grid(images, Path(args.out) / f"conditioning_{design}.png", nrow=cfg.num, zoom=zoom)
    return recognised, len(classes)


def write_table(rows, args, num_classes):
    lines = [
        f"{len(rows)} conditioning designs, `--preset {args.preset}`"
        f"{' ' + ' '.join(CPU_RECIPE) if args.preset == 'cpu' else ''}, {args.steps} steps each, same data and seed "
        f"(`python assets/conditioning_experiment.py`). Recognised: share of {args.num} DDIM-50 samples per "
        f"class that assets/evaluate.py's classifier assigns to their class (chance {100 / num_classes:.1f}%). "
        "Final loss: the training loss (as train.py weights it) over the last log interval. Train time: "
        "train.py's wall time, its closing sample grid included. One seed. "
        "The last three columns are the paper's Table 4 (DiT-XL/2, ImageNet 256, FID-50K at 400K steps).",
        "",
        "| design | params | GMACs / image | final loss | recognised | train time "
        "| paper params | paper GMACs | paper FID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for design, r in rows.items():
        p_params, p_gmacs, p_fid = PAPER[design]
        lines.append(f"| {design} | {r['params'] / 1e6:.2f}M | {r['gmacs']:.4f} | {r['final_loss']:.4f} | "
                     f"{100 * r['recognised']:.1f}% | {r['wall_time_s'] / 60:.1f} min | "
                     f"{p_params}M | {p_gmacs} | {p_fid} |")
    path = Path(args.out) / "conditioning.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"wrote {path} and {len(rows)} sample grids beside it")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags are passed to every train.py run.")
    parser.add_argument("--preset", default="cpu", choices=("cpu", "gpu"), help="train.py preset")
    parser.add_argument("--steps", type=int, default=None, help="steps per design (default: 1200 on "
                        "the cpu preset, the preset's own on gpu)")
    parser.add_argument("--designs", nargs="+", default=list(dit.CONDITIONINGS), choices=dit.CONDITIONINGS)
    parser.add_argument("--num", type=int, default=32, help="samples per class to judge")
    parser.add_argument("--runs", default="runs/conditioning", help="where the training runs go")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="table and grids")
    args, train_argv = parser.parse_known_args(argv)
    if args.steps is None:
        args.steps = 1200 if args.preset == "cpu" else TRAIN_PRESETS["gpu"].get("steps", TrainConfig.steps)
    Path(args.out).mkdir(parents=True, exist_ok=True)

    device = train.resolve_device("auto")
    rows = {}
    for design in args.designs:
        summary = train_design(design, args, train_argv)
        state = train.load_checkpoint(Path(args.runs) / design)
        with torch.device("meta"):  # counting costs no memory and no compute
            gmacs = dit.forward_gmacs(train.build_model(state["model_args"], attn_backend="math"))
        recognised, num_classes = judge(design, args, state["config"]["cfg_scale"], device)
        rows[design] = dict(summary, gmacs=gmacs, recognised=recognised)
    write_table(rows, args, num_classes)
    return rows


if __name__ == "__main__":
    main()

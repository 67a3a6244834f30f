"""
How recognisable are a run's samples? An independent judge: a small CNN trained on the run's own
data set classifies EMA samples of every class; the share it assigns to the intended class is the
number reported in the README (chance is 1 / number of classes).

    python assets/evaluate.py                               # runs/default, 32 DDIM samples per class
    python assets/evaluate.py --ckpt runs/mine --sampler ddpm --steps 1000

Not a run-time part of the project: it only measures. The classifier is cached beside the run
(runs/classifier_<data>_<size>px.pt).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import SampleConfig  # noqa: E402
from dataset import MARKER, ImageFolder  # noqa: E402
from sample import generate, load_model  # noqa: E402
from train import BUILTIN_DATA, load_checkpoint, resolve_device  # noqa: E402


def make_classifier(num_classes):
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def train_classifier(data_dir, image_size, epochs=6, seed=0):
    """Train on 90% of the data set, report accuracy on the held-out 10%."""
    data = ImageFolder(data_dir, image_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    split = len(data) // 10
    x = torch.stack([data[i][0] for i in order.tolist()])
    y = torch.tensor([data[i][1] for i in order.tolist()])
    x_val, y_val, x_tr, y_tr = x[:split], y[:split], x[split:], y[split:]
    torch.manual_seed(seed)
    net = make_classifier(len(data.classes))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(64):
            loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        hit = (net(x_val).argmax(1) == y_val).float()
    per_class = [hit[y_val == c].mean().item() for c in range(len(data.classes))]
    return net, data.classes, hit.mean().item(), per_class


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="runs/default")
    parser.add_argument("--num", type=int, default=32, help="samples per class")
    defaults = SampleConfig()  # sample.py's defaults: the score is what a user of sample.py sees
    parser.add_argument("--sampler", default=defaults.sampler, choices=("ddim", "ddpm"))
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale)
    parser.add_argument("--grid", default="", help="also save the first 8 samples per class here, 4x enlarged")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    state = load_checkpoint(args.ckpt)
    data_dir = state["config"]["data"] or BUILTIN_DATA
    run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parents[1]
    image_size = state["config"]["image_size"]
    cache = run_dir.parent / f"classifier_{Path(data_dir).name}_{image_size}px.pt"  # shared by runs beside it
    # The built-in set's marker names its drawing version: a redrawn set retrains the classifier.
    marker = Path(data_dir) / MARKER
    data_id = marker.read_text() if marker.is_file() else str(Path(data_dir).resolve())
    # Weights only, loaded with weights_only=True: a cache file can never run code.
    try:
        saved = torch.load(cache, weights_only=True) if cache.exists() else {}
    except Exception:  # a cache of an older format (a pickled module): train the classifier again
        saved = {}
    if saved.get("data_id") != data_id:
        net, classes, val_acc, val_per_class = train_classifier(data_dir, image_size)
        saved = {"net": net.state_dict(), "classes": classes, "val_acc": val_acc,
                 "val_per_class": val_per_class, "data_id": data_id}
        torch.save(saved, cache)
    classes = saved["classes"]
    net = make_classifier(len(classes))
    net.load_state_dict(saved["net"])
    val = ", ".join(f"{c} {100 * a:.0f}%" for c, a in zip(classes, saved["val_per_class"]))
    print(f"classifier ({image_size} px): {100 * saved['val_acc']:.1f}% on held-out real images of "
          f"{data_dir} (worst class {100 * min(saved['val_per_class']):.0f}%; {val})")

    device = resolve_device("auto")
    model, diffusion, model_classes = load_model(args.ckpt, device)
    assert model_classes == classes, "the run's classes differ from its data set's"
    cfg = SampleConfig(num=args.num, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                       seed=args.seed)
    t0 = time.time()
    images, _ = generate(model, diffusion, list(range(len(classes))), cfg, device)
    seconds = time.time() - t0
    if args.grid:
        first = images.cpu().view(len(classes), args.num, *images.shape[1:])[:, :8].flatten(0, 1)
        save_image(F.interpolate(first, scale_factor=4, mode="nearest"), args.grid, nrow=min(8, args.num))
    with torch.no_grad():
        pred = net.eval()(images.cpu() * 2 - 1).argmax(1).view(len(classes), args.num)
    correct = (pred == torch.arange(len(classes))[:, None]).float().mean(1)
    for name, acc in zip(classes, correct.tolist()):
        print(f"  {name:>12s}: {100 * acc:5.1f}%")
    total = correct.mean().item()
    worst = correct.argmin().item()
    print(f"samples recognised as their class: {100 * total:.1f}% (worst class {classes[worst]} "
          f"{100 * correct[worst].item():.1f}%; chance {100 / len(classes):.1f}%), "
          f"{args.sampler} {args.steps} steps, cfg {args.cfg_scale}, {len(images)} samples in {seconds:.1f}s")
    return total


if __name__ == "__main__":
    main()

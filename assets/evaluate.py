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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import SampleConfig  # noqa: E402
from dataset import ImageFolder  # noqa: E402
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
        val_acc = (net(x_val).argmax(1) == y_val).float().mean().item()
    return net, data.classes, val_acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="runs/default")
    parser.add_argument("--num", type=int, default=32, help="samples per class")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    state = load_checkpoint(args.ckpt)
    data_dir = state["config"]["data"] or BUILTIN_DATA
    run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parents[1]
    image_size = state["config"]["image_size"]
    cache = run_dir.parent / f"classifier_{Path(data_dir).name}_{image_size}px.pt"  # shared by runs beside it
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        net, classes, val_acc = saved["net"], saved["classes"], saved["val_acc"]
    else:
        net, classes, val_acc = train_classifier(data_dir, image_size)
        torch.save({"net": net, "classes": classes, "val_acc": val_acc}, cache)
    print(f"classifier: {100 * val_acc:.1f}% on held-out real images of {data_dir}")

    device = resolve_device("auto")
    model, diffusion, model_classes = load_model(args.ckpt, device)
    assert model_classes == classes, "the run's classes differ from its data set's"
    cfg = SampleConfig(num=args.num, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                       seed=args.seed)
    t0 = time.time()
    images, _ = generate(model, diffusion, list(range(len(classes))), cfg, device)
    seconds = time.time() - t0
    with torch.no_grad():
        pred = net.eval()(images.cpu() * 2 - 1).argmax(1).view(len(classes), args.num)
    correct = (pred == torch.arange(len(classes))[:, None]).float().mean(1)
    for name, acc in zip(classes, correct.tolist()):
        print(f"  {name:>12s}: {100 * acc:5.1f}%")
    total = correct.mean().item()
    print(f"samples recognised as their class: {100 * total:.1f}% (chance {100 / len(classes):.1f}%), "
          f"{args.sampler} {args.steps} steps, cfg {args.cfg_scale}, {len(images)} samples in {seconds:.1f}s")
    return total


if __name__ == "__main__":
    main()

"""
How good are a run's samples? Two questions, judged by a small CNN trained on the run's own data set:
are they recognisable (the share of EMA samples the CNN assigns to the intended class; chance is
1 / number of classes), and do they cover the data rather than its commonest look (a Frechet distance
between the CNN's features of real images and of samples, and, for the built-in shapes, the spread of
colours against the data's)?

    python assets/evaluate.py                               # runs/default, 32 DDIM samples per class
    python assets/evaluate.py --ckpt runs/mine --sampler ddpm --steps 1000
    python assets/evaluate.py --cfg-scale 3 --cfg-interval 0 1000   # guidance at every step
    python assets/evaluate.py --ckpt runs/text              # a text run: prompts, held-out pairs apart

For a text run (train.py --preset text) it prompts "a <colour> <shape>" for all 48 pairs and
judges the shape by the CNN and the colour by the palette, the pairs the run never saw apart,
and prompts "a <shape>" to see whether the colours then spread as the data's do, pooled and per
shape (and whether each sample is painted in one colour, as every real one is).

The Frechet distance here is FID's formula on OUR classifier's 128 penultimate features, not on
Inception's: its numbers compare only with each other, at equal sample counts (the estimate is
biased upwards at small counts). So it is printed beside the same distance between two disjoint
sets of real images of the same size: the floor a perfect sampler would reach.

Not a run-time part of the project: it only measures. The classifier is cached beside the run
(runs/classifier_<data>_<size>px.pt).
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import SampleConfig, converter  # noqa: E402
import dit  # noqa: E402
from dataset import (COLOUR_NAMES, MARKER, PALETTE, SHAPES, TEXT_HOLDOUT, CaptionFolder, ImageFolder,  # noqa: E402
                     shape_prompt)
from sample import generate, load_model  # noqa: E402
from train import BUILTIN_DATA, load_checkpoint, resolve_device  # noqa: E402

# The classifier's cache names its format: a cache of another format is trained again.
CACHE_FORMAT = "v2: a quarter held out"
HELD_OUT = 4  # one image in HELD_OUT is kept from the classifier: the real reference sets come from there


# -----------------------------------------------------------------------------
# The judge: a small CNN, and its features
# -----------------------------------------------------------------------------

def make_classifier(num_classes):
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def split(num_images, seed=0):
    """The classifier's (held-out, training) image indices: a fixed random split."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return order[:num_images // HELD_OUT], order[num_images // HELD_OUT:]


def train_classifier(data, epochs=6, seed=0):
    """Train on the training split; report accuracy on the held-out split, overall and per class."""
    held, kept = split(len(data), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.stack([data[i][0] for i in range(len(data))])                  # (N, 3, H, W) in [-1, 1]
    y = torch.tensor(data.labels)                                            # (N,)
    torch.manual_seed(seed)
    net = make_classifier(len(data.classes))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        net.train()
        for idx in kept[torch.randperm(len(kept), generator=gen)].split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        hit = (net(x[held]).argmax(1) == y[held]).float()
    per_class = [hit[y[held] == c].mean().item() for c in range(len(data.classes))]
    return net, hit.mean().item(), per_class


@torch.no_grad()
def features(net, images):
    """The classifier's penultimate activations (N, 128) for images in [0, 1]."""
    return torch.cat([net[:-1](batch * 2 - 1) for batch in images.split(256)])


# -----------------------------------------------------------------------------
# Spread: Frechet distance and colours
# -----------------------------------------------------------------------------

def frechet_distance(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two sets of
    features (N, F) (Heusel et al. 2017). Tr((S_a S_b)^(1/2)) is the sum of the square roots of the
    eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric matrix: no non-symmetric matrix root needed."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)                           # (F, F) each
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def palette_colours(images, threshold=0.25):
    """Index into dataset.PALETTE of each image's foreground colour (N,): the mean of the pixels
    brighter than `threshold` (the shapes are bright on black), matched to the nearest palette
    colour. An image with no bright pixel counts as the nearest colour to its brightest pixel."""
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255                 # (P, 3)
    flat = images.flatten(2)                                                    # (N, 3, H*W)
    bright = flat.amax(1, keepdim=True) > threshold                             # (N, 1, H*W)
    any_bright = bright.any(-1, keepdim=True)
    bright = torch.where(any_bright, bright, flat.amax(1, keepdim=True) == flat.amax((1, 2), keepdim=True))
    colour = (flat * bright).sum(-1) / bright.sum(-1)                           # (N, 3)
    return torch.cdist(colour, palette).argmin(1)


def one_colour(images, threshold=0.25, share=0.8):
    """(N,) bool: is the image painted in one colour, at least `share` of its bright pixels
    nearest the same palette colour? Real shapes are (99%; their anti-aliased rims are the
    rest); a sample that paints some patches red and others green averages to a third colour."""
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 255                 # (P, 3)
    pixels = images.flatten(2).transpose(1, 2)                                  # (N, H*W, 3)
    bright = pixels.amax(-1) > threshold                                        # (N, H*W)
    nearest = torch.cdist(pixels, palette.expand(len(images), -1, -1)).argmin(-1)  # (N, H*W)
    votes = F.one_hot(nearest, len(PALETTE)).mul(bright[..., None]).sum(1)      # (N, P)
    return votes.amax(1) >= share * votes.sum(1).clamp(min=1)


def colour_histogram(images):
    counts = torch.bincount(palette_colours(images), minlength=len(PALETTE)).float()
    return counts / counts.sum()


def total_variation(p, q):
    """Half the L1 distance between two histograms: 0 the same, 1 disjoint."""
    return 0.5 * (p - q).abs().sum().item()


def counting_floor(colours, n, generator, draws=20):
    """How far n real images drawn at random from `colours` (palette indices) are from all of them
    in total variation, the mean of `draws` draws: even a perfect sampler is that far off."""
    hist = torch.bincount(colours, minlength=len(PALETTE)).float() / len(colours)
    return sum(total_variation(torch.bincount(colours[torch.randperm(len(colours), generator=generator)[:n]],
                                              minlength=len(PALETTE)).float() / n, hist)
               for _ in range(draws)) / draws


def per_shape_tv(drawn, real_colours, real_shapes, generator):
    """Total variation per shape: drawn (shapes, n) palette indices of n samples of each shape,
    against the colours of that shape's real images (real_colours and real_shapes, (K,) each).
    Returns the (shapes,) distances (NaN for a shape with no real image) and the mean counting
    floor. Pooled over the shapes, a sampler that paints every triangle orange and every circle
    red can still match the data's colours; per shape it cannot. A held-out pair is rightly
    absent here: "a square" never saw a red one in training."""
    tvs, floors = torch.full((len(drawn),), float("nan")), []
    for k, row in enumerate(drawn):
        mine = real_colours[real_shapes == k]
        if len(mine):
            tvs[k] = total_variation(torch.bincount(row, minlength=len(PALETTE)).float() / len(row),
                                     torch.bincount(mine, minlength=len(PALETTE)).float() / len(mine))
            floors.append(counting_floor(mine, len(row), generator))
    return tvs, sum(floors) / len(floors)


def real_reference(data, per_class, seed=0):
    """Two disjoint sets of real images (in [0, 1]), `per_class` of each class in each, taken from
    the classifier's held-out split first (features of images it trained on could sit closer to
    the class means). Returns the two sets and how many images had to come from training."""
    held, kept = split(len(data), seed)
    targets = torch.tensor(data.labels)
    sets, borrowed = ([], []), 0
    for c in range(len(data.classes)):
        pool = torch.cat([held[targets[held] == c], kept[targets[kept] == c]])
        need = 2 * per_class
        if len(pool) < need:
            raise ValueError(f"class {data.classes[c]} has {len(pool)} images; the real reference needs "
                             f"{need} (2 x --num): lower --num")
        borrowed += max(0, need - int((targets[held] == c).sum()))
        sets[0].extend(pool[:per_class].tolist())
        sets[1].extend(pool[per_class:need].tolist())
    to_unit = lambda idx: torch.stack([data[i][0] for i in idx]) / 2 + 0.5  # noqa: E731
    return to_unit(sets[0]), to_unit(sets[1]), borrowed


# -----------------------------------------------------------------------------
# The evaluation
# -----------------------------------------------------------------------------

def load_classifier(data, data_dir, image_size, run_dir):
    """The cached classifier for this data set, or a new one trained and cached."""
    cache = run_dir.parent / f"classifier_{Path(data_dir).name}_{image_size}px.pt"  # shared by runs beside it
    # The built-in set's marker names its drawing version: a redrawn set retrains the classifier.
    marker = Path(data_dir) / MARKER
    data_id = f"{CACHE_FORMAT}; " + (marker.read_text() if marker.is_file() else str(Path(data_dir).resolve()))
    # Weights only, loaded with weights_only=True: a cache file can never run code.
    try:
        saved = torch.load(cache, weights_only=True) if cache.exists() else {}
    except Exception:  # a cache of an older format (a pickled module): train the classifier again
        saved = {}
    if saved.get("data_id") != data_id or saved.get("classes") != data.classes:
        net, val_acc, val_per_class = train_classifier(data)
        saved = {"net": net.state_dict(), "classes": data.classes, "val_acc": val_acc,
                 "val_per_class": val_per_class, "data_id": data_id}
        torch.save(saved, cache)
    net = make_classifier(len(data.classes))
    net.load_state_dict(saved["net"])
    val = ", ".join(f"{c} {100 * a:.0f}%" for c, a in zip(data.classes, saved["val_per_class"]))
    print(f"classifier ({image_size} px): {100 * saved['val_acc']:.1f}% on held-out real images of "
          f"{data_dir} (worst class {100 * min(saved['val_per_class']):.0f}%; {val})")
    return net.eval()


def judge(net, images, real_a, real_b, num_classes, palette):
    """Every figure for samples (label-major, equal counts per class) against the real sets."""
    with torch.no_grad():
        pred = net(images * 2 - 1).argmax(1).view(num_classes, -1)
    recognised = (pred == torch.arange(num_classes)[:, None]).float().mean(1)  # (classes,)
    f_real_a, f_real_b, f_samples = (features(net, x) for x in (real_a, real_b, images))
    result = {"recognised": recognised.mean().item(), "per_class": recognised.tolist(),
              "fd": frechet_distance(f_real_a, f_samples), "fd_real": frechet_distance(f_real_a, f_real_b)}
    if palette:
        data_hist = colour_histogram(real_a)
        result.update(colours=colour_histogram(images).tolist(),
                      colour_tv=total_variation(colour_histogram(images), data_hist),
                      colour_tv_real=total_variation(colour_histogram(real_b), data_hist))
    return result


# -----------------------------------------------------------------------------
# A text run (train.py --preset text): does it draw what a prompt says, also for unseen pairs?
# -----------------------------------------------------------------------------

def judge_prompts(net, model, diffusion, data_dir, image_size, cfg, device, grid=""):
    """On the built-in shapes: cfg.num samples of "a <colour> <shape>" for all 48 pairs, the shape
    judged by the classifier and the colour by the palette; the pairs of dataset.TEXT_HOLDOUT were
    never in training, so their scores measure composition. Then 6 * cfg.num samples of "a <shape>"
    for every shape, whose colours should spread as the training images' do (beside the same
    distance for as many real images: at a few hundred samples even a perfect sampler is ~0.05
    off, from counting alone), and the share of them painted in one colour, as real shapes are
    (a patchwork of two colours counts as their mean's colour in the histogram); the same distance
    also per shape, against that shape's training images, which pooling cannot hide. grid: also save
    the first sample of each pair there, rows colours and columns shapes, held-out pairs framed
    in white."""
    pairs = [(colour, shape) for colour in COLOUR_NAMES for shape in SHAPES]
    prompts = [shape_prompt(shape, colour) for colour, shape in pairs]
    images, _ = generate(model, diffusion, dit.tokenize(prompts), cfg, device)
    with torch.no_grad():
        shape_hit = net(images * 2 - 1).argmax(1) == torch.tensor([SHAPES.index(s) for _, s in pairs]
                                                                   ).repeat_interleave(cfg.num)
    colour_hit = palette_colours(images) == torch.tensor([COLOUR_NAMES.index(c) for c, _ in pairs]
                                                         ).repeat_interleave(cfg.num)
    held = torch.tensor([pair in TEXT_HOLDOUT for pair in pairs]).repeat_interleave(cfg.num)
    if grid:
        first = images.view(len(pairs), cfg.num, *images.shape[1:])[:, 0]               # (48, 3, S, S)
        framed = F.pad(first, (2, 2, 2, 2))                                             # black frames ...
        framed[held[::cfg.num]] = F.pad(first[held[::cfg.num]], (2, 2, 2, 2), value=1.0)  # ... white if held out
        save_image(F.interpolate(framed, scale_factor=4, mode="nearest"), grid, nrow=len(SHAPES), padding=0)
    per_pair = {prompt: (s.float().mean().item(), c.float().mean().item()) for prompt, s, c in
                zip(prompts, shape_hit.view(len(pairs), -1), colour_hit.view(len(pairs), -1))}
    plain = dataclasses.replace(cfg, num=6 * cfg.num)
    plain_images, _ = generate(model, diffusion, dit.tokenize([shape_prompt(s) for s in SHAPES]), plain, device)
    real = CaptionFolder(data_dir, image_size, split="train")
    real_images = torch.stack([real[i][0] for i in range(len(real))]) / 2 + 0.5                   # (K, 3, S, S)
    real_colours = palette_colours(real_images)                                                    # (K,)
    real_shapes = torch.tensor([SHAPES.index(shape) for _, shape in real.pairs])                   # (K,)
    data_hist = torch.bincount(real_colours, minlength=len(PALETTE)).float() / len(real_colours)
    plain_colours = palette_colours(plain_images)                                                  # (8 * num,)
    plain_hist = colour_histogram(plain_images)
    draws = torch.Generator().manual_seed(cfg.seed)
    pooled_floor = counting_floor(real_colours, len(plain_images), draws)
    shape_tv, shape_floor = per_shape_tv(plain_colours.view(len(SHAPES), -1), real_colours, real_shapes, draws)
    result = {"seen_shape": shape_hit[~held].float().mean().item(), "seen_colour": colour_hit[~held].float().mean().item(),
              "held_shape": shape_hit[held].float().mean().item(), "held_colour": colour_hit[held].float().mean().item(),
              "per_pair": per_pair, "plain_colours": plain_hist.tolist(),
              "plain_colour_tv": total_variation(plain_hist, data_hist), "plain_colour_tv_real": pooled_floor,
              "plain_shape_tv": shape_tv.nanmean().item(), "plain_shape_tv_real": shape_floor,
              "plain_shape_tvs": {shape: tv for shape, tv in zip(SHAPES, shape_tv.tolist()) if not math.isnan(tv)},
              "plain_one_colour": one_colour(plain_images).float().mean().item(),
              "real_one_colour": one_colour(real_images).float().mean().item()}
    print(f"prompts 'a <colour> <shape>', {cfg.num} samples each: seen pairs shape {100 * result['seen_shape']:.1f}%, "
          f"colour {100 * result['seen_colour']:.1f}%; held-out pairs (never in training) shape "
          f"{100 * result['held_shape']:.1f}%, colour {100 * result['held_colour']:.1f}%")
    for colour, shape in TEXT_HOLDOUT:
        hit_shape, hit_colour = per_pair[shape_prompt(shape, colour)]
        print(f"  held out {shape_prompt(shape, colour):>20s}: shape {100 * hit_shape:5.1f}%, colour {100 * hit_colour:5.1f}%")
    shares = " ".join(f"{name} {100 * p:.0f}%" for name, p in zip(COLOUR_NAMES, plain_hist.tolist()))
    print(f"prompts 'a <shape>' (no colour), {plain.num} each: colours {shares}; total variation to the "
          f"training images' colours {result['plain_colour_tv']:.3f} (as many real images: "
          f"{result['plain_colour_tv_real']:.3f}); in one colour: {100 * result['plain_one_colour']:.0f}% "
          f"(real: {100 * result['real_one_colour']:.0f}%)")
    per_shape = ", ".join(f"{shape} {tv:.2f}" for shape, tv in result["plain_shape_tvs"].items())
    print(f"  per shape, against that shape's training images: mean total variation {result['plain_shape_tv']:.3f} "
          f"(as many real images: {result['plain_shape_tv_real']:.3f}); {per_shape}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="runs/default")
    parser.add_argument("--num", type=int, default=None, help="samples per class (32), or per prompt of a text run (8)")
    defaults = SampleConfig()  # sample.py's defaults: the score is what a user of sample.py sees
    ranges = {f.name: converter(f) for f in dataclasses.fields(SampleConfig)  # and its valid ranges
              if f.name in ("steps", "cfg_scale", "cfg_interval", "cfg_colour_scale")}
    parser.add_argument("--sampler", default=defaults.sampler, choices=("auto", "ddim", "ddpm", "euler", "heun"))
    parser.add_argument("--steps", type=ranges["steps"], default=defaults.steps)
    parser.add_argument("--cfg-scale", type=ranges["cfg_scale"], default=defaults.cfg_scale)
    parser.add_argument("--cfg-interval", type=ranges["cfg_interval"], nargs=2, default=defaults.cfg_interval,
                        metavar=("LO", "HI"), help="guidance only for timesteps LO <= t < HI")
    parser.add_argument("--cfg-colour-scale", type=ranges["cfg_colour_scale"], default=defaults.cfg_colour_scale,
                        help="guidance scale for colour (sample.py's --cfg-colour-scale)")
    parser.add_argument("--grid", default="", help="also save the first 8 samples per class (a text run: the "
                        "first of each colour and shape) here, 4x enlarged")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.num is not None and args.num < 2:
        parser.error("--num: expected an integer >= 2 (a covariance needs two samples)")
    if not args.cfg_interval[0] < args.cfg_interval[1]:
        lo, hi = args.cfg_interval
        parser.error(f"argument --cfg-interval: expected LO < HI, got {lo:g} {hi:g}")

    state = load_checkpoint(args.ckpt)
    data_dir = state["config"]["data"] or BUILTIN_DATA
    run_dir = Path(args.ckpt) if Path(args.ckpt).is_dir() else Path(args.ckpt).parents[1]
    image_size = state["config"]["image_size"]
    data = ImageFolder(data_dir, image_size)
    net = load_classifier(data, data_dir, image_size, run_dir)
    classes = data.classes
    device = resolve_device("auto")
    model, diffusion, model_classes = load_model(args.ckpt, device)
    cfg = SampleConfig(num=args.num or (8 if model_classes is None else 32), sampler=args.sampler, steps=args.steps,
                       cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval),
                       cfg_colour_scale=args.cfg_colour_scale, seed=args.seed)
    if model_classes is None:  # a text run
        return judge_prompts(net, model, diffusion, data_dir, image_size, cfg, device, args.grid)
    real_a, real_b, borrowed = real_reference(data, cfg.num)
    if borrowed:
        print(f"note: {borrowed} real reference images come from the classifier's training split")

    assert model_classes == classes, "the run's classes differ from its data set's"
    t0 = time.time()
    images, _ = generate(model, diffusion, torch.arange(len(classes)), cfg, device)
    seconds = time.time() - t0
    if args.grid:
        first = images.cpu().view(len(classes), cfg.num, *images.shape[1:])[:, :8].flatten(0, 1)
        save_image(F.interpolate(first, scale_factor=4, mode="nearest"), args.grid, nrow=min(8, cfg.num))

    result = judge(net, images.cpu(), real_a, real_b, len(classes), palette=(Path(data_dir) / MARKER).is_file())
    for name, acc in zip(classes, result["per_class"]):
        print(f"  {name:>12s}: {100 * acc:5.1f}%")
    worst = min(range(len(classes)), key=lambda c: result["per_class"][c])
    lo, hi = cfg.cfg_interval
    sampler = diffusion.samplers[0] if args.sampler == "auto" else args.sampler
    colour = args.cfg_scale if args.cfg_colour_scale is None else args.cfg_colour_scale  # a class run's default
    print(f"samples recognised as their class: {100 * result['recognised']:.1f}% (worst class {classes[worst]} "
          f"{100 * result['per_class'][worst]:.1f}%; chance {100 / len(classes):.1f}%), {sampler} "
          f"{args.steps} steps, cfg {args.cfg_scale} (colour {colour}) for {lo:g} <= t < {hi:g}, "
          f"{len(images)} samples in {seconds:.1f}s")
    print(f"feature Frechet distance to real images: {result['fd']:.1f} (real vs real, same count: "
          f"{result['fd_real']:.1f})")
    if "colours" in result:
        shares = " ".join(f"{100 * s:.0f}%" for s in result["colours"])
        print(f"colour spread, total variation to the data's: {result['colour_tv']:.3f} (real vs real: "
              f"{result['colour_tv_real']:.3f}); shares in palette order: {shares}")
    return result


if __name__ == "__main__":
    main()

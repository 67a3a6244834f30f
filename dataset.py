"""Image data for DiT: a class-folder loader and a built-in toy data set.

A class-conditional diffusion model needs images *and* labels; the simplest
layout that carries both is one sub-folder per class:

    root/circle/0000.png, root/heart/0000.png, ...
    root/<class name>/<image files>      (.png .jpg .jpeg .bmp .webp, any case)

The class index is the folder's position in the sorted class names, so a
folder always gives the same labels. Only files directly inside a class folder
count; hidden files and folders are ignored. `ImageFolder` turns such a folder
into (image, label) pairs scaled to [-1, 1], the range the diffusion noise
lives in. The built-in data set, eight procedurally drawn shapes, trains on a
laptop CPU in minutes, and its generator is an example of the layout.

Generate the built-in set and print a summary:

    python dataset.py [--out DIR]          # DIR defaults to data/shapes
"""

import argparse
import math
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# Above this size the decoded images are not kept in memory but decoded again
# on every access (slower, but it cannot exhaust the laptop's RAM).
CACHE_LIMIT_BYTES = 2 * 1024**3


class DatasetError(ValueError):
    """The data on disk cannot be used; the message says why and what to do."""


# ----------------------------------------------------------------------------
# Finding and decoding images
# ----------------------------------------------------------------------------

def _find_images(root):
    """Return the sorted class names and a sorted list of (path, class index)."""
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"data folder '{root}' {problem}; pass the folder that "
                           f"holds one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"data folder '{root}' has no class sub-folders; put the "
                           f"images in '{root}/<class name>/' (a single folder "
                           f"such as '{root}/all/' for unlabelled data)")
    files = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if (path.is_file() and not path.name.startswith(".")
                    and path.suffix.lower() in IMAGE_EXTENSIONS):
                files.append((path, index))
    return classes, files


def _load_image(path, image_size):
    """Decode one file into a uint8 tensor (3, S, S); PIL does the heavy lifting."""
    with Image.open(path) as image:
        if image.mode in ("I", "I;16", "I;16B", "I;16L"):
            # 16-bit grey (0..65535): convert("RGB") would clip every value above 255 to
            # white, so scale to 0..255 first (rounded; point() maps linearly in one pass).
            image = image.convert("I").point(lambda v: v / 257 + 0.5)
        image = image.convert("RGB")
    # fit() crops the centred square and resizes it in one resampling step,
    # which equals "shorter side to S, then centre crop" without a second blur.
    image = ImageOps.fit(image, (image_size, image_size), Image.Resampling.BICUBIC)
    # A bytearray (writable) lets torch wrap the pixels without going via numpy.
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(image_size, image_size, 3).permute(2, 0, 1)


# ----------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------

class ImageFolder(torch.utils.data.Dataset):
    """Class-folder images as (x, y): x float32 (3, S, S) in [-1, 1], y an int.

    Every file is decoded once at construction. That pass weeds out unreadable
    files (each skipped with one warning) so counts and labels are final, and
    it fills an in-memory uint8 cache so training never touches the disk or
    the JPEG decoder again. If the cache would exceed CACHE_LIMIT_BYTES only
    the paths are kept and each image is decoded again when it is requested.

    The batch size is not checked here, because only the trainer knows it:
    call `check_batch_size(dataset, batch_size)` before training.
    """

    def __init__(self, root, image_size):
        self.root = Path(root)
        self.image_size = image_size
        self.classes, files = _find_images(self.root)
        # Filled in place: torch.stack of a list would briefly need twice the RAM.
        fits = len(files) * 3 * image_size**2 <= CACHE_LIMIT_BYTES
        shape = (len(files), 3, image_size, image_size)
        self.cache = torch.empty(shape, dtype=torch.uint8) if fits else None
        self.paths, self.labels = [], []
        for path, label in tqdm(files, desc="loading images", unit="img",
                                disable=len(files) <= 300):
            try:
                image = _load_image(path, image_size)
            except Exception as error:  # PIL raises many types for bad files
                warnings.warn(f"skipping unreadable image '{path}': {error}")
                continue
            if self.cache is not None:
                self.cache[len(self.labels)] = image
            self.paths.append(path)
            self.labels.append(label)
        if self.cache is not None:
            self.cache = self.cache[:len(self.labels)]  # drop skipped files' slots
        found = set(self.labels)
        for index, name in enumerate(self.classes):
            if index not in found:
                raise DatasetError(f"class folder '{self.root / name}' has no readable "
                                   f"images ({', '.join(IMAGE_EXTENSIONS)}); add some "
                                   f"or remove the folder")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.cache is not None:
            image = self.cache[i]
        else:
            image = _load_image(self.paths[i], self.image_size)
        return image.float() / 127.5 - 1.0, self.labels[i]


def check_batch_size(dataset, batch_size):
    """Fail early, with advice, when a single batch cannot be filled."""
    if len(dataset) < batch_size:
        raise DatasetError(f"the data set has only {len(dataset)} images but the "
                           f"batch size is {batch_size}; use a batch size of at "
                           f"most {len(dataset)} or add more images")


# ----------------------------------------------------------------------------
# The built-in data set: procedural shapes
# ----------------------------------------------------------------------------

SHAPES = ("circle", "cross", "heart", "moon", "ring", "square", "star", "triangle")
MARKER = ".complete"  # written last, so its presence means "fully generated"
SUPERSAMPLE = 4       # draw big, then average down: smooth antialiased edges


def _regular(n, radius=1.0, start=90.0):
    return [(radius * math.cos(math.radians(start + 360 * k / n)),
             radius * math.sin(math.radians(start + 360 * k / n))) for k in range(n)]


def _outline(name):
    """A shape as [(polygon, filled)] in unit coordinates (y up, radius <= ~1);
    unfilled polygons paint background, to cut the ring's hole and moon's bite."""
    if name == "circle":
        return [(_regular(64), True)]
    if name == "ring":
        return [(_regular(64), True), (_regular(64, 0.55), False)]
    if name == "moon":
        bite = [(x + 0.5, y + 0.3) for x, y in _regular(64, 0.85)]
        return [(_regular(64), True), (bite, False)]
    if name == "square":
        return [(_regular(4, 1.0, 45.0), True)]
    if name == "triangle":
        return [(_regular(3), True)]
    if name == "star":
        tips, dents = _regular(5), _regular(5, 0.45, 126.0)
        return [([p for pair in zip(tips, dents) for p in pair], True)]
    if name == "cross":
        a, b = 0.95, 0.32  # arm reach and half-width: thick enough to survive 32 px
        return [([(b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b),
                  (-b, -a), (b, -a), (b, -b), (a, -b), (a, b)], True)]
    if name == "heart":  # the classic parametric heart curve, centred and scaled
        ts = [2 * math.pi * k / 96 for k in range(96)]
        return [([(16 * math.sin(t) ** 3 / 18,
                   (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                    - math.cos(4 * t) + 2.5) / 18) for t in ts], True)]
    raise ValueError(f"unknown shape {name!r}")


# Six bright colours, picked at random for every image whatever its class: a model must learn to
# paint one flat colour per shape, but a handful of colours is learned in minutes, where a
# continuum of hues and shades would take capacity away from the outlines.
PALETTE = ((235, 64, 52), (245, 160, 30), (240, 220, 40), (60, 200, 80), (50, 130, 240), (200, 80, 220))


def draw_shape(name, image_size, rng):
    """One random instance of a shape as a PIL image (image_size squared)."""
    side = image_size * SUPERSAMPLE
    # A black background and a bright shape: the class lives in the outline alone, so a small
    # model spends its few minutes on shape rather than on background noise.
    background = (0, 0, 0)
    foreground = rng.choice(PALETTE)
    # Large and near the centre, turned at most 20 degrees: at 32 px a small or strongly turned
    # shape loses its corners to the pixels (a square at 45 degrees is a diamond, a triangle on
    # its side reads as an arrow), and a person would not recognise it either.
    radius = rng.uniform(0.7, 0.92) * side / 2
    slack = min(side / 2 - radius, 0.08 * side)
    cx, cy = (side / 2 + rng.uniform(-slack, slack) for _ in range(2))
    angle = math.radians(rng.uniform(-20.0, 20.0))
    cos, sin = math.cos(angle), math.sin(angle)
    image = Image.new("RGB", (side, side), background)
    pen = ImageDraw.Draw(image)
    for points, filled in _outline(name):
        pen.polygon([(cx + radius * (x * cos - y * sin), cy - radius * (x * sin + y * cos))
                     for x, y in points], fill=foreground if filled else background)
    return image.reduce(SUPERSAMPLE)


def _settings(images_per_class, image_size, seed):
    return f"shapes v3 images_per_class={images_per_class} image_size={image_size} seed={seed}\n"


def make_shapes_dataset(root, images_per_class=500, image_size=32, seed=0):
    """Write the shapes data set as class folders of PNGs at `root`.

    Files go to a hidden sibling folder that is renamed to `root` only when
    complete, so a run killed midway never leaves a half-written `root`.
    Each image has its own seed, so image i is the same whatever the count.
    """
    root = Path(root)
    ours = {*SHAPES, MARKER}
    if root.exists() and not (root.is_dir() and {p.name for p in root.iterdir()} <= ours):
        raise DatasetError(f"'{root}' exists and is not a shapes data set; refusing "
                           f"to overwrite it (delete it or choose another folder)")
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # leftovers of a killed run
    for name in SHAPES:
        (partial / name).mkdir(parents=True)
        for i in range(images_per_class):
            rng = random.Random(f"{seed}/{name}/{i}")
            draw_shape(name, image_size, rng).save(partial / name / f"{i:04d}.png")
    (partial / MARKER).write_text(_settings(images_per_class, image_size, seed))
    old = root.with_name(f".{root.name}.old")
    if root.exists():  # an old or incomplete shapes set: move it aside first
        shutil.rmtree(old, ignore_errors=True)
        root.rename(old)
    partial.rename(root)
    shutil.rmtree(old, ignore_errors=True)
    return root


def ensure_builtin_dataset(root, images_per_class=500, image_size=32, seed=0):
    """Generate the shapes set at `root` unless a complete one is already there."""
    root = Path(root)
    marker = root / MARKER
    settings = _settings(images_per_class, image_size, seed)
    if not (marker.is_file() and marker.read_text() == settings):
        print(f"generating the built-in shapes data set: "
              f"{len(SHAPES) * images_per_class} images in '{root}'")
        make_shapes_dataset(root, images_per_class, image_size, seed)
    return root


# ----------------------------------------------------------------------------
# Script entry: generate the built-in set and summarise it
# ----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shapes", help="where to write the data set")
    args = parser.parse_args()
    start = time.perf_counter()
    root = ensure_builtin_dataset(args.out)
    print(f"done in {time.perf_counter() - start:.1f} s")
    data = ImageFolder(root, image_size=32)
    print(f"{len(data)} images of {data.image_size}x{data.image_size} in '{root}'")
    for index, name in enumerate(data.classes):
        print(f"  {index}  {name:<10} {data.labels.count(index)} images")


if __name__ == "__main__":
    main()

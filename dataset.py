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

A text-conditioned model needs a caption per image instead. It reads them from
`root/metadata.jsonl` (the Hugging Face "imagefolder" convention), one JSON
object per line, the file name relative to root (class folders optional):

    {"file_name": "star/0000.png", "text": "a red star"}

`CaptionFolder` turns that into (image, caption tokens) pairs. The built-in set
writes one, naming each image's colour and shape too, so that the pairs in
TEXT_HOLDOUT can be kept out of training and then asked for. Its captions name
the colour and the shape, or only one of them ("a star", "something red").

Generate the built-in set and print a summary:

    python dataset.py [--out DIR]          # DIR defaults to data/shapes
"""

import argparse
import json
import math
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

import dit

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


def _decode_images(paths, image_size):
    """Decode every file once: the uint8 cache (K, 3, S, S), or None past CACHE_LIMIT_BYTES, and
    the indices of the K readable files (each unreadable one is skipped with one warning)."""
    # Filled in place: torch.stack of a list would briefly need twice the RAM.
    fits = len(paths) * 3 * image_size**2 <= CACHE_LIMIT_BYTES
    cache = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8) if fits else None
    kept = []
    for k, path in enumerate(tqdm(paths, desc="loading images", unit="img", disable=len(paths) <= 300)):
        try:
            image = _load_image(path, image_size)
        except Exception as error:  # PIL raises many types for bad files
            warnings.warn(f"skipping unreadable image '{path}': {error}")
            continue
        if cache is not None:
            cache[len(kept)] = image
        kept.append(k)
    if cache is not None:
        cache = cache[:len(kept)]  # drop skipped files' slots
    return cache, kept


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
        self.cache, kept = _decode_images([path for path, _ in files], image_size)
        self.paths = [files[k][0] for k in kept]
        self.labels = [files[k][1] for k in kept]
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
# Captioned images: metadata.jsonl
# ----------------------------------------------------------------------------

METADATA = "metadata.jsonl"
SPLITS = ("train", "holdout", "all")
_EXAMPLE_LINE = '{"file_name": "cats/0001.png", "text": "a cat"}'


def _read_metadata(root, max_caption_bytes):
    """Parse root/metadata.jsonl into [(image path, caption, (colour, shape) or None)], one per
    line. The first bad line stops the load with a DatasetError naming the file and the line:
    a caption the model cannot take is better found now than at step 3000."""
    meta = root / METADATA
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "does not exist"
        raise DatasetError(f"data folder '{root}' {problem}; pass the folder that holds {METADATA}")
    if not meta.is_file():
        raise DatasetError(f"'{root}' has no {METADATA}; a text run needs one JSON line per image "
                           f"there, such as {_EXAMPLE_LINE}")
    top, entries = root.resolve(), []
    for number, raw in enumerate(meta.read_bytes().splitlines(), start=1):
        where = f"{meta}:{number}"
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")  # a byte-order mark some editors write
        except UnicodeDecodeError:
            raise DatasetError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue  # blank lines, such as a trailing one
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not JSON ({err.msg}); each line is one object such as "
                               f"{_EXAMPLE_LINE}") from None
        if not isinstance(item, dict):
            raise DatasetError(f"{where}: not a JSON object; each line is one object such as {_EXAMPLE_LINE}")
        name, text = item.get("file_name"), item.get("text")
        if not isinstance(name, str) or not name:
            raise DatasetError(f'{where}: "file_name" is missing or empty; give the image\'s path '
                               f"relative to '{root}'")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f'{where}: "text" is missing or empty; every image needs a caption '
                               f"(the empty caption is reserved: it is guidance's null condition)")
        path = root / name
        if not path.resolve().is_relative_to(top):
            raise DatasetError(f"{where}: file_name '{name}' points outside '{root}'")
        if not path.is_file():
            raise DatasetError(f"{where}: image '{name}' not found in '{root}'")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # JSON can spell a lone surrogate, which is no character
            raise DatasetError(f"{where}: the caption is not valid Unicode") from None
        if size > max_caption_bytes:
            raise DatasetError(f"{where}: the caption is {size} bytes in UTF-8, over the limit of "
                               f"{max_caption_bytes}; shorten it")
        colour, shape = item.get("colour"), item.get("shape")  # only the built-in set names them
        pair = (colour, shape) if isinstance(colour, str) and isinstance(shape, str) else None
        entries.append((path, text, pair))
    return entries


class CaptionFolder(torch.utils.data.Dataset):
    """Captioned images as (x, tokens): x float32 (3, S, S) in [-1, 1], tokens int64 (L,), the
    caption as dit.tokenize writes it, padded to L = 1 + the set's longest caption in bytes, so
    that the default collate stacks a batch into the (N, L) tensor the text model takes.

    root/metadata.jsonl lists the images (see the module docstring); the files may lie anywhere
    under root. Images are decoded and cached as in ImageFolder (unreadable ones are skipped with
    a warning); a bad line of metadata is a DatasetError naming the file and the line.

    split: "train" leaves out every image whose line names a (colour, shape) pair of TEXT_HOLDOUT,
    whatever its caption says (only the built-in set names them; other data loses nothing);
    "holdout" keeps only those, the real images an evaluation compares the unseen pairs with;
    "all" keeps every image.
    """

    def __init__(self, root, image_size, max_caption_bytes=dit.MAX_CAPTION_BYTES, split="train"):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        self.root = Path(root)
        self.image_size = image_size
        self.classes = None  # captions, not class labels
        meta = self.root / METADATA
        entries = _read_metadata(self.root, max_caption_bytes)
        held_out = set(TEXT_HOLDOUT)
        if split != "all":
            entries = [e for e in entries if (e[2] in held_out) == (split == "holdout")]
        if not entries:
            raise DatasetError({
                "train": f"every image in '{meta}' is of a held-out pair: nothing is left to train on",
                "holdout": f"'{meta}' names no image of a held-out pair; only the built-in shapes set "
                           f"has them",
                "all": f"'{meta}' lists no images; add one JSON line per image, such as {_EXAMPLE_LINE}",
            }[split])
        self.cache, kept = _decode_images([path for path, _, _ in entries], image_size)
        if not kept:
            raise DatasetError(f"none of the images listed in '{meta}' is readable "
                               f"({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = [entries[k][0] for k in kept]
        self.captions = [entries[k][1] for k in kept]
        self.pairs = [entries[k][2] for k in kept]      # (colour, shape), or None
        self.tokens = dit.tokenize(self.captions, max_caption_bytes)  # (K, L)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.cache is not None:
            image = self.cache[i]
        else:
            image = _load_image(self.paths[i], self.image_size)
        return image.float() / 127.5 - 1.0, self.tokens[i]


# ----------------------------------------------------------------------------
# Data order: a shuffled, sharded, resumable stream of batches
# ----------------------------------------------------------------------------

class ResumableBatchSampler:
    """Batch k of the run is a pure function of (seed, k): epoch e shuffles with seed + e, each rank
    takes every world-th index (a distributed sampler), and a resumed run simply starts at batch k."""

    def __init__(self, num_items, batch_size, seed, rank, world_size, start_batch=0):
        self.per_rank = num_items // world_size
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.batches_per_epoch = self.per_rank // batch_size  # the ragged last batch is dropped
        self.num_items, self.start_batch = num_items, start_batch

    def __iter__(self):
        batch, order_epoch, order = self.start_batch, None, None
        while True:
            epoch, k = divmod(batch, self.batches_per_epoch)
            if epoch != order_epoch:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.num_items, generator=gen)[self.rank::self.world]
                order_epoch = epoch
            yield order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
            batch += 1


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
COLOUR_NAMES = ("red", "orange", "yellow", "green", "blue", "purple")  # the palette's, in its order

# Pairs a text run never trains on: one per shape, every colour at least once. A model that draws
# "a blue heart" having seen blue things and hearts, but never a blue heart, composes colour and
# shape instead of recalling pairs it has seen.
TEXT_HOLDOUT = (("green", "circle"), ("orange", "cross"), ("blue", "heart"), ("yellow", "moon"),
                ("purple", "ring"), ("red", "square"), ("orange", "star"), ("blue", "triangle"))

# A few wordings, so that the model learns the words rather than one sentence. Two fifths of the
# captions leave the colour out, so that "a star" means a star of any colour: with one fifth,
# "a <shape>" rarely committed to a colour and came out orange, the palette colour nearest the
# mean of all six (assets/text.md, "The spread: why"). A fifth leave the shape out: "something
# orange" is then learned apart from any shape.
COLOURED_CAPTIONS = ("a {colour} {shape}", "{colour} {shape}", "a {shape} in {colour}",
                     "a {colour} {shape} on black")
PLAIN_CAPTIONS = ("a {shape}", "{shape}")
SHAPELESS_CAPTIONS = ("something {colour}", "a {colour} shape", "{colour}")
NO_COLOUR_FRACTION = 0.4
NO_SHAPE_FRACTION = 0.2


def _article(text):
    """English's "an" before a vowel: "a orange star" -> "an orange star"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def shape_caption(colour, shape, rng):
    """A caption for one image of a colour name and a shape name, worded at random."""
    draw = rng.random()
    if draw < NO_COLOUR_FRACTION:
        return _article(rng.choice(PLAIN_CAPTIONS).format(shape=shape))
    if draw < NO_COLOUR_FRACTION + NO_SHAPE_FRACTION:
        return _article(rng.choice(SHAPELESS_CAPTIONS).format(colour=colour))
    return _article(rng.choice(COLOURED_CAPTIONS).format(colour=colour, shape=shape))


def shape_prompt(shape, colour=None):
    """The plainest wording of the captions, the one to prompt with: "a red star", "an orange
    star", or "a star" when no colour is asked for."""
    return _article(f"a {colour} {shape}" if colour else f"a {shape}")


def grid_prompts(dataset):
    """What a text run's sample grids draw, one row each: on the built-in shapes, each shape once,
    alternately in its held-out colour (never seen in training) and in a colour it was seen in;
    on other data, the first 8 different captions."""
    if not any(dataset.pairs):
        return list(dict.fromkeys(dataset.captions))[:8]
    seen = {pair for pair in dataset.pairs if pair}
    prompts = []
    for i, (colour, shape) in enumerate(TEXT_HOLDOUT):
        if i % 2:  # (no colour at all if the data never showed this shape)
            colour = next((c for c in COLOUR_NAMES if (c, shape) in seen), None)
        prompts.append(shape_prompt(shape, colour))
    return prompts


def draw_shape(name, image_size, rng, colour=None):
    """One random instance of a shape as a PIL image (image_size squared); colour is a PALETTE
    index, or None to draw one from rng."""
    side = image_size * SUPERSAMPLE
    # A black background and a bright shape: the class lives in the outline alone, so a small
    # model spends its few minutes on shape rather than on background noise.
    background = (0, 0, 0)
    foreground = PALETTE[rng.randrange(len(PALETTE)) if colour is None else colour]
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
    # v4: the captions (metadata.jsonl) came; v5: a fifth of them without the shape; v6: two
    # fifths without the colour. The images are those of v3.
    return f"shapes v6 images_per_class={images_per_class} image_size={image_size} seed={seed}\n"


def make_shapes_dataset(root, images_per_class=500, image_size=32, seed=0):
    """Write the shapes data set as class folders of PNGs at `root`, and their captions, colours
    and shapes in `root/metadata.jsonl`.

    Files go to a hidden sibling folder that is renamed to `root` only when
    complete, so a run killed midway never leaves a half-written `root`.
    Each image has its own seed, so image i is the same whatever the count.
    """
    root = Path(root)
    ours = {*SHAPES, MARKER, METADATA}
    if root.exists() and not (root.is_dir() and {p.name for p in root.iterdir()} <= ours):
        raise DatasetError(f"'{root}' exists and is not a shapes data set; refusing "
                           f"to overwrite it (delete it or choose another folder)")
    partial = root.with_name(f".{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # leftovers of a killed run
    lines = []
    for name in SHAPES:
        (partial / name).mkdir(parents=True)
        for i in range(images_per_class):
            rng = random.Random(f"{seed}/{name}/{i}")
            colour = rng.randrange(len(PALETTE))  # drawn first, as draw_shape would draw it
            draw_shape(name, image_size, rng, colour).save(partial / name / f"{i:04d}.png")
            # The wording has a stream of its own, so that the drawing stays as it was.
            words = random.Random(f"{seed}/{name}/{i}/caption")
            text = shape_caption(COLOUR_NAMES[colour], name, words)
            lines.append(json.dumps({"file_name": f"{name}/{i:04d}.png", "text": text,
                                     "colour": COLOUR_NAMES[colour], "shape": name}))
    (partial / METADATA).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
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
    entries = _read_metadata(root, dit.MAX_CAPTION_BYTES)
    held_out = sum(pair in TEXT_HOLDOUT for _, _, pair in entries)
    pairs = ", ".join(shape_prompt(shape, colour) for colour, shape in TEXT_HOLDOUT)
    print(f"{len(entries)} captions in '{root / METADATA}'; the {held_out} images of the held-out "
          f"pairs ({pairs}) never reach a text run's training batches")


if __name__ == "__main__":
    main()

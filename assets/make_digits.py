"""
A second small data set to check that the default recipe is not tuned to the shapes alone:
10 classes of digit glyphs (150 each), white on black, with random size, stroke width, rotation
and offset, written as class folders of 32x32 PNGs.

    python assets/make_digits.py data/digits
    python train.py --data data/digits --out runs/digits
    python assets/evaluate.py --ckpt runs/digits
"""

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "data/digits")
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
        for i in range(150):
            rng = random.Random(f"{digit}/{i}")
            font = ImageFont.load_default(size=rng.randint(70, 100))  # Pillow's bundled FreeType font
            image = Image.new("L", (128, 128), 0)  # drawn at 4x, then averaged down: smooth strokes
            ImageDraw.Draw(image).text(
                (64 + rng.uniform(-10, 10), 64 + rng.uniform(-10, 10)), str(digit), fill=255, font=font,
                anchor="mm", stroke_width=rng.randint(2, 6), stroke_fill=255)
            image = image.rotate(rng.uniform(-20, 20), resample=Image.BICUBIC)
            image.reduce(4).convert("RGB").save(root / str(digit) / f"{i:03d}.png")
    print(f"wrote 1500 images in 10 class folders under {root}")


if __name__ == "__main__":
    main()

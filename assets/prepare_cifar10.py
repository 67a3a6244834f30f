"""
CIFAR-10 as class folders, so train.py can learn it like any folder of images:

    python assets/prepare_cifar10.py data/cifar10                     # downloads it (needs internet)
    python assets/prepare_cifar10.py data/cifar10 --from cifar-10-batches-py   # already downloaded
    python train.py --data data/cifar10 --out runs/cifar10 --preset gpu

Writes OUT/<class>/<split>_<index>.png (32 x 32 RGB): the 50,000 training images, or the 10,000
test images with --split test. The official files are Python pickles; they are read with an
unpickler that admits only plain containers and numpy arrays, so a tampered file cannot run code
(torchvision's own reader would unpickle anything). The folder is written beside OUT and renamed
into place when complete: a killed run never leaves a half-written OUT.
"""

import argparse
import io
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# What the official batches are allowed to contain: numpy arrays and their dtypes (numpy 1 and 2
# spell the module differently), bytes as protocol 2 writes them from Python 3 (_codecs.encode of
# a str), and nothing that could call into the rest of Python.
ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class PrepareError(RuntimeError):
    pass


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise PrepareError(f"it asks to load {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def read_batch(path):
    """One official batch file as a dict with str keys (the files were written by Python 2)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PrepareError(f"cannot read {path} ({err.strerror}): is --from the extracted "
                           f"cifar-10-batches-py folder?") from None
    try:
        batch = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except PrepareError as err:
        raise PrepareError(f"{path} is not a CIFAR-10 batch ({err}); refused, nothing in it was run") from None
    except Exception as err:  # a truncated or foreign file: pickle raises many types
        raise PrepareError(f"{path} is not a CIFAR-10 batch ({type(err).__name__}: {err})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def download(root):
    """The official archive, checked against its MD5 and extracted under root (torchvision's helper)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive
    download_and_extract_archive(CIFAR10.url, str(root), md5=CIFAR10.tgz_md5)
    return root / CIFAR10.base_folder


def write_folders(source, out, split):
    names = [n.decode() for n in read_batch(source / "batches.meta")["label_names"]]
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # leftovers of a killed run
    for name in names:
        (partial / name).mkdir(parents=True)
    count = 0
    for file in SPLITS[split]:
        batch = read_batch(source / file)
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for image, label in zip(images, batch["labels"]):  # (32, 32, 3) uint8 each
            Image.fromarray(image).save(partial / names[label] / f"{split}_{count:05d}.png")
            count += 1
    if out.is_dir():
        out.rmdir()  # an empty folder the user made: replaced by the complete one
    partial.rename(out)
    return count, names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to create: OUT/<class>/*.png")
    parser.add_argument("--from", dest="source", default="", help="an extracted cifar-10-batches-py folder")
    parser.add_argument("--split", default="train", choices=tuple(SPLITS), help="which images (default: train)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out} already exists and is not empty: choose a new folder (nothing was written)")
    try:
        source = Path(args.source) if args.source else download(out.parent / ".cifar10_download")
        count, names = write_folders(source, out, args.split)
    except PrepareError as err:
        raise SystemExit(f"prepare_cifar10.py: error: {err}") from None
    except OSError as err:  # no network, a full disk
        raise SystemExit(f"prepare_cifar10.py: error: {err}") from None
    print(f"wrote {count} images in {len(names)} class folders under {out}; "
          f"train with: python train.py --data {out}")


if __name__ == "__main__":
    main()

"""MNIST as in-memory tensors, from a local folder of IDX files or torchvision's download.

The book's normalisation: pixels scaled to [0, 1], then ``(x - 0.5) / 0.5`` (torchvision's
``ToTensor()`` + ``Normalize((0.5,), (0.5,))``), applied once to the whole set; batches are
index slices of tensors held in memory, not per-sample PIL transforms.

Where the files come from, in order:
1. ``data_dir`` (``--data-dir``) or ``$FASTNORM_DATA``: a folder with the four IDX files,
   gzipped or not (e.g. the offline copy at ``../shared/data/mnist``). They are decompressed
   into a writable cache (``$FASTNORM_CACHE``, default ``~/.cache/fastnorm``) under
   ``MNIST/raw/``, checked against the original files' MD5 sums, and read with torchvision.
2. Otherwise torchvision downloads MNIST into the cache.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

#: MD5 of the uncompressed original IDX files (the same as torchvision's and the offline copy's).
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MEAN, STD = 0.5, 0.5  # the book's Normalize((0.5,), (0.5,))


class MNISTNotFound(FileNotFoundError):
    """MNIST is neither in the folders looked at nor downloadable."""


@dataclass
class MNIST:
    """The whole of MNIST as tensors: images (N, 1, 28, 28) float32 normalised, labels (N,) int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def subset(self, train: int | None = None, test: int | None = None) -> MNIST:
        """The first ``train`` / ``test`` samples (for quick runs and tests)."""
        return MNIST(self.train_images[:train], self.train_labels[:train],
                     self.test_images[:test], self.test_labels[:test])  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("FASTNORM_CACHE") or Path.home() / ".cache" / "fastnorm")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stage(folder: Path, raw: Path) -> bool:
    """Decompress (or copy) the four IDX files of ``folder`` into ``raw``; False if any is missing."""
    sources = {}
    for name in MNIST_FILES:
        for candidate in (folder / f"{name}.gz", folder / name, folder / "MNIST" / "raw" / name):
            if candidate.is_file():
                sources[name] = candidate
                break
        else:
            return False
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = raw / name
        if dst.is_file() and _md5(dst) == MNIST_FILES[name]:
            continue
        tmp = dst.with_suffix(".partial")
        with gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        if _md5(tmp) != MNIST_FILES[name]:
            tmp.unlink()
            raise ValueError(f"{src}: its contents are not the original MNIST file {name} (MD5 mismatch)")
        tmp.replace(dst)
    return True


def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> MNIST:
    """Load MNIST (train 60,000 and test 10,000) as normalised in-memory tensors.

    Args:
        data_dir: a folder with the four IDX files (gzipped or not); default ``$FASTNORM_DATA``.
        download: when no folder has them, let torchvision download MNIST into the cache.

    Raises:
        MNISTNotFound: with where it looked and what to do, when the data cannot be had.

    Example:
        >>> mnist = load_mnist("../shared/data/mnist")
        >>> mnist.train_images.shape
        torch.Size([60000, 1, 28, 28])
    """
    from torchvision import datasets

    root = cache_dir()
    raw = root / "MNIST" / "raw"
    looked = []
    folders = [Path(p).expanduser() for p in (data_dir, os.environ.get("FASTNORM_DATA")) if p]
    staged = False
    for folder in folders:
        looked.append(str(folder))
        if folder.is_dir() and _stage(folder, raw):
            staged = True
            break
    if not staged and not all((raw / name).is_file() for name in MNIST_FILES):
        if not download:
            raise MNISTNotFound(_missing_message(looked, root, tried_download=False))
        try:
            datasets.MNIST(str(root), train=True, download=True)
            datasets.MNIST(str(root), train=False, download=True)
        except Exception as exc:  # offline, mirror down, ...
            raise MNISTNotFound(_missing_message(looked, root, tried_download=True, why=exc)) from exc
    train = datasets.MNIST(str(root), train=True, download=False)
    test = datasets.MNIST(str(root), train=False, download=False)
    return MNIST(_normalise(train.data), train.targets.clone(), _normalise(test.data), test.targets.clone())


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28): ToTensor then Normalize((0.5,), (0.5,))."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1).contiguous()


def _missing_message(looked: list[str], root: Path, tried_download: bool, why: Exception | None = None) -> str:
    where = ", ".join(looked) if looked else "no folder given (--data-dir / FASTNORM_DATA unset)"
    lines = [
        "MNIST not found.",
        f"  looked in: {where}; cache {root / 'MNIST' / 'raw'}",
        "  expected the four IDX files (gzipped or not): " + ", ".join(MNIST_FILES),
    ]
    if tried_download:
        lines.append(f"  torchvision's download failed: {why}")
    lines.append(
        "  fix: pass --data-dir (or set FASTNORM_DATA) to a folder holding them, e.g. "
        "../shared/data/mnist, or run once with internet access"
    )
    return "\n".join(lines)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    """Yield (images, labels) batches; shuffled by ``generator`` (a seeded torch.Generator) if given.

    A last batch of a single sample is dropped: BatchNorm cannot train on one value per channel.
    """
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - 1 if n % batch_size == 1 else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]

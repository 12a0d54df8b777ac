"""The MNIST loader: the shared offline folder, uncompressed folders, missing and corrupt data."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch
from conftest import SHARED_MNIST

from fastnorm.book import data as fdata

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # its README
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_loads_the_shared_folder(mnist):
    assert mnist.train_images.shape == (60000, 1, 28, 28) and mnist.train_images.dtype == torch.float32
    assert mnist.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(mnist.train_labels).tolist() == TRAIN_COUNTS
    assert torch.bincount(mnist.test_labels).tolist() == TEST_COUNTS
    # the book's normalisation: (x/255 - 0.5) / 0.5, so background pixels are exactly -1
    assert mnist.train_images.min().item() == -1.0 and mnist.train_images.max().item() == 1.0
    assert -0.8 < mnist.train_images.mean().item() < -0.7


def test_loads_an_uncompressed_folder(tmp_path, mnist_cache, mnist):
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in fdata.MNIST_FILES:
        with gzip.open(SHARED_MNIST / f"{name}.gz", "rb") as fin, open(folder / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    again = fdata.load_mnist(folder, download=False)
    assert torch.equal(again.test_images, mnist.test_images)


def test_missing_folder_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTNORM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("FASTNORM_DATA", raising=False)
    with pytest.raises(fdata.MNISTNotFound) as info:
        fdata.load_mnist(tmp_path / "nowhere", download=False)
    message = str(info.value)
    assert "nowhere" in message and "empty-cache" in message and "--data-dir" in message


def test_failed_download_is_reported_clearly(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("FASTNORM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTNORM_DATA", raising=False)
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(fdata.MNISTNotFound, match="download failed.*name resolution"):
        fdata.load_mnist(None, download=True)


def test_corrupt_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTNORM_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in fdata.MNIST_FILES:
        with gzip.open(folder / f"{name}.gz", "wb") as f:
            f.write(b"not mnist")
    with pytest.raises(ValueError, match="MD5 mismatch"):
        fdata.load_mnist(folder, download=False)


def test_batches_are_deterministic_and_cover_the_data():
    x = torch.arange(10.0).reshape(10, 1)
    y = torch.arange(10)
    first = [b[1].tolist() for b in fdata.batches(x, y, 4, torch.Generator().manual_seed(3))]
    again = [b[1].tolist() for b in fdata.batches(x, y, 4, torch.Generator().manual_seed(3))]
    assert first == again and sorted(sum(first, [])) == list(range(10))
    assert [len(b) for b in first] == [4, 4, 2]
    # a last batch of one sample is dropped (BatchNorm cannot train on it)
    assert [len(b[1]) for b in fdata.batches(x[:9], y[:9], 4, None)] == [4, 4]

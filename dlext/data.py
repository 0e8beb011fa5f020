"""Datasets for training without a download.

- digits (default): the real handwritten digits that ship inside scikit-learn (`load_digits`,
  1797 images of 8x8, 16 grey levels), upscaled to 32x32 with bilinear interpolation, scaled to
  [0, 1] and normalised; a fixed, stratified 80/20 train/test split.
- mnist: IDX files (train-images-idx3-ubyte, ... optionally .gz) from a folder the user names;
  28x28 images padded to 32x32, LeNet-5's classic input.
- cifar10: the python batches (data_batch_1..5, test_batch) from a folder the user names; 3x32x32.

Every loader returns (train, test) as torch.utils.data.TensorDataset of (float images, int64 labels).
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATASETS = ("digits", "mnist", "cifar10")


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


def load_digits_32(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear",
                                             align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    # Stratified split: the same fraction of each class in the test set, fixed by the seed.
    g = torch.Generator().manual_seed(seed)
    test_mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_mask[idx[: round(len(idx) * test_fraction)]] = True
    mean, std = images[~test_mask].mean(), images[~test_mask].std()
    images = _normalise(images, mean, std)
    return (TensorDataset(images[~test_mask], labels[~test_mask]),
            TensorDataset(images[test_mask], labels[test_mask]))


def _open(path: str):
    if os.path.exists(path):
        return open(path, "rb")
    if os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rb")
    raise FileNotFoundError(f"{path} (or {path}.gz) not found")


def _read_exactly(f, n: int, path: str) -> bytes:
    block = f.read(n)
    if len(block) != n:
        raise ValueError(f"{path}: truncated IDX header ({len(block)} of {n} bytes)")
    return block


def read_idx(path: str) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0x0000 type ndim, big-endian sizes, then the data."""
    with _open(path) as f:
        try:
            zero, dtype_code, ndim = struct.unpack(">HBB", _read_exactly(f, 4, path))
            if zero != 0 or dtype_code != 0x08:
                raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {zero:#x} "
                                 f"{dtype_code:#x})")
            shape = struct.unpack(">" + "I" * ndim, _read_exactly(f, 4 * ndim, path))
            data = np.frombuffer(f.read(), dtype=np.uint8)
        except (OSError, EOFError) as e:  # e.g. a corrupt or truncated .gz
            raise ValueError(f"{path}: cannot read it as an IDX file "
                             f"({e or type(e).__name__})") from e
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} bytes of data, got {data.size}")
    return data.reshape(shape)


def load_mnist(folder: str) -> tuple[TensorDataset, TensorDataset]:
    def part(prefix):
        x = torch.from_numpy(read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte")).copy())
        y = torch.from_numpy(read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte")).copy())
        if x.dim() != 3 or x.shape[1:] != (28, 28) or y.dim() != 1:
            raise ValueError(f"{folder}: expected {prefix} images of 28x28 and 1-D labels, got "
                             f"image shape {tuple(x.shape)} and label shape {tuple(y.shape)}")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"{prefix}: {x.shape[0]} images but {y.shape[0]} labels")
        x = torch.nn.functional.pad(x.float().unsqueeze(1) / 255.0, (2, 2, 2, 2))  # 28 -> 32
        return x, y.long()

    (xtr, ytr), (xte, yte) = part("train"), part("t10k")
    mean, std = xtr.mean(), xtr.std()
    return (TensorDataset(_normalise(xtr, mean, std), ytr),
            TensorDataset(_normalise(xte, mean, std), yte))


def load_cifar10(folder: str) -> tuple[TensorDataset, TensorDataset]:
    def batch(name):
        path = os.path.join(folder, name)
        try:  # (pickle runs code from the file: read only CIFAR-10 files you trust)
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = torch.tensor(d[b"labels"], dtype=torch.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a CIFAR-10 python batch (a pickled dict with b'data' "
                             f"and b'labels'): {type(e).__name__}: {e}") from e
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.numel():
            raise ValueError(f"{path}: expected rows of 3072 bytes, one per label, got data "
                             f"{data.shape} and {labels.numel()} labels")
        return torch.tensor(data).view(-1, 3, 32, 32).float() / 255.0, labels

    train = [batch(f"data_batch_{i}") for i in range(1, 6)
             if os.path.exists(os.path.join(folder, f"data_batch_{i}"))]
    if not train:
        hint = (" (the batches are in its cifar-10-batches-py folder)"
                if os.path.isdir(os.path.join(folder, "cifar-10-batches-py")) else "")
        raise FileNotFoundError(f"no CIFAR-10 data_batch_* files in {folder}{hint}")
    xtr, ytr = torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train])
    xte, yte = batch("test_batch")
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    return (TensorDataset(_normalise(xtr, mean, std), ytr),
            TensorDataset(_normalise(xte, mean, std), yte))


def load(name: str, folder: str | None = None) -> tuple[TensorDataset, TensorDataset]:
    if name == "digits":
        return load_digits_32()
    if folder is None:
        raise ValueError(f"--data {name} reads local files: name their folder with --data-dir")
    if name == "mnist":
        return load_mnist(folder)
    if name == "cifar10":
        return load_cifar10(folder)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")

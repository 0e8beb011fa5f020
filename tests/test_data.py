"""Dataset loaders: the bundled digits, and MNIST IDX / CIFAR-10 batches from small files."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from dlext import data


def write_idx(path, array: np.ndarray, compress=False):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim,
                                                                     *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_digits_split_is_fixed_stratified_and_32x32():
    train, test = data.load("digits")
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape[1:] == (1, 32, 32) and xte.shape[1:] == (1, 32, 32)
    assert len(train) + len(test) == 1797 and 0.18 < len(test) / 1797 < 0.22
    assert set(yte.tolist()) == set(range(10))
    counts_test = torch.bincount(yte, minlength=10).float() / len(yte)
    counts_train = torch.bincount(ytr, minlength=10).float() / len(ytr)
    assert torch.allclose(counts_test, counts_train, atol=0.01)      # stratified
    again = data.load("digits")[1].tensors
    assert torch.equal(again[0], xte) and torch.equal(again[1], yte)  # fixed
    assert abs(xtr.mean().item()) < 1e-4 and abs(xtr.std().item() - 1) < 1e-3


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 7), ("t10k", 3)]:
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = rng.integers(0, 10, size=(n,))
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels, compress)
        if prefix == "t10k":
            test_images, test_labels = images, labels
    train, test = data.load("mnist", str(tmp_path))
    assert train.tensors[0].shape == (7, 1, 32, 32) and test.tensors[0].shape == (3, 1, 32, 32)
    assert test.tensors[1].tolist() == test_labels.tolist()
    # The 28x28 image sits in the middle of the 32x32 frame, normalised by train statistics.
    x = test.tensors[0][:, 0, 2:30, 2:30]
    raw = torch.tensor(test_images, dtype=torch.float32) / 255
    scale = (x[0, 0, 1] - x[0, 0, 0]) / (raw[0, 0, 1] - raw[0, 0, 0])
    torch.testing.assert_close(x - x[0, 0, 0] - scale * (raw - raw[0, 0, 0]), torch.zeros_like(x),
                               atol=1e-4, rtol=0)


def test_mnist_rejects_a_bad_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        data.read_idx(str(tmp_path / "train-images-idx3-ubyte"))
    with pytest.raises(FileNotFoundError):
        data.load("mnist", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--data-dir"):
        data.load("mnist")
    for name, payload in (("empty", b""), ("short", b"\x00\x00\x08\x03\x00\x00")):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match=f"{name}: truncated IDX header"):
            data.read_idx(str(tmp_path / name))
    (tmp_path / "corrupt.gz").write_bytes(b"\x1f\x8b" + b"not gzip data")
    with pytest.raises(ValueError, match="corrupt: cannot read it as an IDX file"):
        data.read_idx(str(tmp_path / "corrupt"))


def test_mnist_rejects_wrong_shapes(tmp_path):
    """32x32 images, 2-D labels and swapped files are named and refused at load, not later."""
    rng = np.random.default_rng(0)
    for images, labels, words in (
            (rng.integers(0, 256, (4, 32, 32)), rng.integers(0, 10, (4,)), "28x28"),
            (rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 10, (4, 2)), "1-D labels"),
            (rng.integers(0, 10, (4,)), rng.integers(0, 256, (4, 28, 28)), "28x28"),
            (rng.integers(0, 256, (0, 28, 28)), rng.integers(0, 10, (0,)), "0 images")):
        for prefix in ("train", "t10k"):
            write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
            write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels)
        with pytest.raises(ValueError, match=words):
            data.load("mnist", str(tmp_path))


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in [("data_batch_1", 5), ("data_batch_2", 4), ("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=(n,)).tolist()}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
        if name == "test_batch":
            expected = batch
    train, test = data.load("cifar10", str(tmp_path))
    assert train.tensors[0].shape == (9, 3, 32, 32) and test.tensors[0].shape == (3, 3, 32, 32)
    assert test.tensors[1].tolist() == expected[b"labels"]
    # channel-major rows: the first 1024 bytes are the red plane
    red = torch.tensor(expected[b"data"][0, :1024], dtype=torch.float32).view(32, 32) / 255
    got = test.tensors[0][0, 0]
    corr = torch.corrcoef(torch.stack([red.flatten(), got.flatten()]))[0, 1]
    assert corr > 0.9999


def test_cifar10_rejects_bad_batches(tmp_path):
    """Each bad batch is named with what was expected."""
    good = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(good, f)
    for batch, words in (({"data": good[b"data"], "labels": [0, 1]}, "not a CIFAR-10 python batch"),
                         ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},
                          "rows of 3072 bytes"),
                         (None, "not a CIFAR-10 python batch")):
        with open(tmp_path / "data_batch_1", "wb") as f:
            if batch is None:
                f.write(b"not a pickle")
            else:
                pickle.dump(batch, f)
        with pytest.raises(ValueError, match=words):
            data.load("cifar10", str(tmp_path))
    (tmp_path / "parent" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py folder"):
        data.load("cifar10", str(tmp_path / "parent"))

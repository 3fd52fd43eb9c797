"""CIFAR-10 from its python pickle batches.

Expected layout: <root>/cifar-10-batches-py/{data_batch_1..5, test_batch}, as
unpacked from the official cifar-10-python.tar.gz.  Each batch is a pickled
dict with b"data" (N x 3072 uint8, channel-major 32x32) and b"labels".
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayData
from .local import DatasetNotFoundError, data_root

DIRECTORY = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
MEAN, STD = 120.7, 64.2  # pixel statistics on the 0..255 scale


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[b"labels"], dtype=np.int64)


def _missing(root: Path) -> list[str]:
    directory = root / DIRECTORY
    return [f for f in TRAIN_FILES + [TEST_FILE] if not (directory / f).is_file()]


def is_available(root=None) -> bool:
    try:
        return not _missing(data_root(root))
    except DatasetNotFoundError:
        return False


def load_cifar10_data(root=None) -> ArrayData:
    base = data_root(root)
    missing = _missing(base)
    if missing:
        raise DatasetNotFoundError(
            f"cifar10: missing {', '.join(missing)} in {base / DIRECTORY}; unpack the official "
            "cifar-10-python.tar.gz there (data_batch_1..5 and test_batch)")
    train = [read_batch(base / DIRECTORY / f) for f in TRAIN_FILES]
    test_x, test_y = read_batch(base / DIRECTORY / TEST_FILE)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return ArrayData((torch.from_numpy(train_x), torch.from_numpy(train_y)),
                     (torch.from_numpy(test_x), torch.from_numpy(test_y)), mean=MEAN, std=STD)

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
from .local import DatasetFormatError, DatasetNotFoundError, data_root

DIRECTORY = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
MEAN, STD = 120.7, 64.2  # pixel statistics on the 0..255 scale


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    # A truncated or foreign file fails inside pickle/numpy with a message
    # ("pickle data was truncated") that does not say which of the six files it is.
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise DatasetFormatError(f"{path}: not a readable CIFAR-10 python batch "
                                 f"({type(err).__name__}: {err})") from err
    if labels.ndim != 1 or len(data) != len(labels):
        raise DatasetFormatError(f"{path}: holds {len(data)} images but {labels.size} labels")
    return data, labels


def missing_reason(root=None) -> str | None:
    """Why CIFAR-10 cannot be loaded from the data directory (no directory,
    missing files), or None when its six files are there. Loads nothing."""
    try:
        base = data_root(root)
    except DatasetNotFoundError as err:
        return str(err)
    missing = _missing(base)
    return missing_message(base, missing) if missing else None


def missing_message(base: Path, missing: list[str]) -> str:
    return (f"cifar10: missing {', '.join(missing)} in {base / DIRECTORY}; unpack the official "
            "cifar-10-python.tar.gz there (data_batch_1..5 and test_batch)")


def _missing(root: Path) -> list[str]:
    directory = root / DIRECTORY
    return [f for f in TRAIN_FILES + [TEST_FILE] if not (directory / f).is_file()]


def is_available(root=None) -> bool:
    return missing_reason(root) is None


def load_cifar10_data(root=None) -> ArrayData:
    base = data_root(root)
    missing = _missing(base)
    if missing:
        raise DatasetNotFoundError(missing_message(base, missing))
    train = [read_batch(base / DIRECTORY / f) for f in TRAIN_FILES]
    test_x, test_y = read_batch(base / DIRECTORY / TEST_FILE)
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return ArrayData((torch.from_numpy(train_x), torch.from_numpy(train_y)),
                     (torch.from_numpy(test_x), torch.from_numpy(test_y)), mean=MEAN, std=STD)

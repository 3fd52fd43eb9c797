"""MNIST and FashionMNIST from their original IDX files (optionally gzipped).

Accepted layouts under the data root (the first that has the files wins):
  <root>/<Name>/raw/   (torchvision's layout), <root>/<Name>/, <root>/<name>/
with Name = MNIST or FashionMNIST and name = mnist or fashion_mnist.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayData
from .local import DatasetNotFoundError, data_root, find_file

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DIRECTORIES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
# Standard per-dataset pixel statistics (on the 0..255 scale).
STATS = {"mnist": (33.32, 78.57), "fashion_mnist": (72.94, 90.02)}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file: 2 zero bytes, a dtype code, ndim, big-endian int32 dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, _DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def candidate_dirs(root: Path, name: str) -> list[Path]:
    big = DIRECTORIES[name]
    return [root / big / "raw", root / big, root / name]


def missing_message(root: Path, name: str, missing: list[str]) -> str:
    where = root / DIRECTORIES[name] / "raw"
    return (f"{name}: missing {', '.join(missing)} (optionally .gz) in {where} "
            f"(or {root / DIRECTORIES[name]} or {root / name}); "
            f"copy the four original IDX files {', '.join(FILES.values())} there")


def is_available(name: str, root=None) -> bool:
    try:
        directories = candidate_dirs(data_root(root), name)
    except DatasetNotFoundError:
        return False
    return all(find_file(directories, f) for f in FILES.values())


def load_idx_data(name: str, root=None) -> ArrayData:
    base = data_root(root)
    directories = candidate_dirs(base, name)
    paths = {key: find_file(directories, filename) for key, filename in FILES.items()}
    missing = [FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DatasetNotFoundError(missing_message(base, name, missing))
    arrays = {key: read_idx(path) for key, path in paths.items()}

    def images(key):  # uint8 (N, 1, 28, 28); normalised per batch
        return torch.from_numpy(arrays[key].copy()).unsqueeze(1)

    def labels(key):
        return torch.from_numpy(arrays[key].astype(np.int64))

    mean, std = STATS[name]
    return ArrayData((images("train_images"), labels("train_labels")),
                     (images("test_images"), labels("test_labels")), mean=mean, std=std)

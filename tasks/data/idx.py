"""MNIST and FashionMNIST from their original IDX files (optionally gzipped).

Accepted layouts under the data root (the first that has the files wins):
  <root>/<Name>/raw/   (torchvision's layout), <root>/<Name>/, <root>/<name>/
with Name = MNIST or FashionMNIST and name = mnist or fashion_mnist.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayData
from .local import DatasetFormatError, DatasetNotFoundError, data_root, find_file

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
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        # A corrupt or truncated .gz says only "Not a gzipped file" or
        # "Compressed file ended...": without the path the user cannot tell which of the four.
        raise DatasetFormatError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DatasetFormatError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetFormatError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    itemsize = np.dtype(_DTYPES[raw[2]]).itemsize
    if (len(raw) - 4 - 4 * ndim) % itemsize:
        raise DatasetFormatError(f"{path}: truncated IDX data (not a whole number of values)")
    data = np.frombuffer(raw, _DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetFormatError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def candidate_dirs(root: Path, name: str) -> list[Path]:
    big = DIRECTORIES[name]
    return [root / big / "raw", root / big, root / name]


def missing_message(root: Path, name: str, missing: list[str]) -> str:
    where = root / DIRECTORIES[name] / "raw"
    return (f"{name}: missing {', '.join(missing)} (optionally .gz) in {where} "
            f"(or {root / DIRECTORIES[name]} or {root / name}); "
            f"copy the four original IDX files {', '.join(FILES.values())} there")


def missing_reason(name: str, root=None) -> str | None:
    """Why `name` cannot be loaded from the data directory (no directory, missing
    files), or None when its four files are there. Checks files, loads nothing."""
    try:
        base = data_root(root)
    except DatasetNotFoundError as err:
        return str(err)
    directories = candidate_dirs(base, name)
    missing = [f for f in FILES.values() if find_file(directories, f) is None]
    return missing_message(base, name, missing) if missing else None


def is_available(name: str, root=None) -> bool:
    return missing_reason(name, root) is None


def load_idx_data(name: str, root=None) -> ArrayData:
    base = data_root(root)
    directories = candidate_dirs(base, name)
    paths = {key: find_file(directories, filename) for key, filename in FILES.items()}
    missing = [FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise DatasetNotFoundError(missing_message(base, name, missing))
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_path, label_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        # Checked here: a mismatch would otherwise load fine and fail with an
        # IndexError at some random batch in the middle of a run.
        if images.ndim != 3:
            raise DatasetFormatError(f"{name}: {image_path} holds an array of shape {images.shape}, "
                                     "expected images (N, rows, cols)")
        if labels.ndim != 1:
            raise DatasetFormatError(f"{name}: {label_path} holds an array of shape {labels.shape}, "
                                     "expected labels (N,)")
        if len(images) != len(labels):
            raise DatasetFormatError(f"{name}: {image_path} holds {len(images)} images but {label_path} "
                                     f"holds {len(labels)} labels")

    def images(key):  # uint8 (N, 1, 28, 28); normalised per batch
        return torch.from_numpy(arrays[key].copy()).unsqueeze(1)

    def labels(key):
        return torch.from_numpy(arrays[key].astype(np.int64))

    mean, std = STATS[name]
    return ArrayData((images("train_images"), labels("train_labels")),
                     (images("test_images"), labels("test_labels")), mean=mean, std=std)

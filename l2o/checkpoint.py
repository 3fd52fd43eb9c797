"""Saving and loading learned-optimizer weights: safetensors, atomic, no pickle.

A weights file is a safetensors file whose metadata records which metanetwork
it holds (``l2o_kind``), how to rebuild it (``l2o_config``, JSON) and anything
the caller wants to keep beside it (``l2o_extra``, JSON). Writes go to a
temporary file in the same directory, are fsynced, then renamed over the
target, so a crash never leaves a half-written file under the real name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .gmn import GMNLOpt
from .lopt import LearnedOptimizer
from .mlp_lopt import MLPLOpt

LOPT_CLASSES: dict[str, type[LearnedOptimizer]] = {"gmn": GMNLOpt, "mlp": MLPLOpt}
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
FORMAT_VERSION = "1"


class WeightsFileError(ValueError):
    """A learned-optimizer weights file that is unreadable, not l2o weights, or of the wrong kind."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make weights private to their writer
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def make_lopt(kind: str, **config) -> LearnedOptimizer:
    """A freshly initialised metanetwork of the given kind (``gmn`` or ``mlp``)."""
    if kind not in LOPT_CLASSES:
        raise ValueError(f"unknown learned optimizer kind {kind!r}; choose from {sorted(LOPT_CLASSES)}")
    return LOPT_CLASSES[kind](**config)


def save_lopt(lopt: LearnedOptimizer, path: str | os.PathLike, extra: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in lopt.state_dict().items()}
    metadata = {
        "l2o_format": FORMAT_VERSION,
        "l2o_kind": lopt.kind,
        "l2o_config": json.dumps(lopt.config()),
        "l2o_extra": json.dumps(extra or {}),
    }
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def read_lopt_file(path: str | os.PathLike) -> tuple[dict, dict[str, Any]]:
    """(metadata, tensors) of a weights file, with clear errors for every way it can be bad."""
    path = Path(path)
    if path.is_dir():   # a meta_train.py run directory: its newest weights sit at the top
        if not (path / "lopt.safetensors").is_file():
            raise FileNotFoundError(f"{path} is a directory without lopt.safetensors: pass a weights file "
                                    "(a meta_train.py run writes <out>/lopt.safetensors and <out>/ckpt-N/lopt.safetensors)")
        path = path / "lopt.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"learned-optimizer weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsFileError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}") from err
    if "l2o_kind" not in metadata or "l2o_config" not in metadata:
        raise WeightsFileError(f"{path} is a safetensors file but not l2o learned-optimizer weights "
                         "(no l2o_kind/l2o_config metadata)")
    return metadata, tensors


def load_lopt(path: str | os.PathLike, expect_kind: str | None = None) -> LearnedOptimizer:
    """Rebuild a metanetwork from a weights file written by :func:`save_lopt`."""
    metadata, tensors = read_lopt_file(path)
    kind = metadata["l2o_kind"]
    if expect_kind is not None and kind != expect_kind:
        raise WeightsFileError(f"{path} holds a {kind!r} learned optimizer, expected {expect_kind!r}")
    lopt = make_lopt(kind, **json.loads(metadata["l2o_config"]))
    expected = lopt.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise WeightsFileError(f"{path} does not match the {kind} architecture in its own config: "
                         f"missing={missing} unexpected={unexpected} wrong_shape={wrong}")
    lopt.load_state_dict(tensors)
    return lopt


def lopt_extra(path: str | os.PathLike) -> dict[str, Any]:
    """The ``extra`` record saved beside the weights (training config, counters)."""
    metadata, _ = read_lopt_file(path)
    return json.loads(metadata.get("l2o_extra", "{}"))


def pretrained_path(kind: str) -> Path:
    return PRETRAINED_DIR / f"{kind}.safetensors"


def load_pretrained(kind: str) -> LearnedOptimizer:
    path = pretrained_path(kind)
    if not path.is_file():
        raise FileNotFoundError(
            f"no pretrained {kind.upper()} weights are installed ({path} is missing). Pass "
            f"weights=None for an untrained metanetwork (it behaves like Adam at lr 1e-3), or "
            f"weights='path/to/weights.safetensors' from meta_train.py.")
    return load_lopt(path, expect_kind=kind)

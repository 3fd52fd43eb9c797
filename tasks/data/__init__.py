"""Offline datasets by name, each loaded once per process and cached in memory.

Bundled or procedural (always available): digits, mnist1d, synthetic_cls,
synthetic_reg, parity, reverse, sort, modadd, chars, markov (vocabulary 64),
markov_large (vocabulary 512), and the autoencoder views
digits_recon, mnist1d_recon.
From a local directory (`root=` or $L2O_DATA; never downloaded): mnist,
fashion_mnist, cifar10.
"""
from __future__ import annotations


from . import cifar, idx
from .arrays import ArrayData, TokenStreamData, as_reconstruction, batch_stream
from .chars import load_chars_data
from .digits import load_digits_data
from .local import ENV_VAR, DatasetFormatError, DatasetNotFoundError, data_root
from .markov import load_markov_data
from .mnist1d import load_mnist1d_data
from .sequences import (load_modadd_data, load_parity_data, load_reverse_data,
                        load_sort_data)
from .synthetic import load_classification_data, load_regression_data

BUNDLED = {
    "digits": load_digits_data,
    "mnist1d": load_mnist1d_data,
    "synthetic_cls": load_classification_data,
    "synthetic_reg": load_regression_data,
    "parity": load_parity_data,
    "reverse": load_reverse_data,
    "sort": load_sort_data,
    "modadd": load_modadd_data,
    "chars": load_chars_data,
    "markov": lambda: load_markov_data(64),
    "markov_large": lambda: load_markov_data(512),
    # Autoencoder views: inputs as targets, sharing the tensors of the base dataset.
    "digits_recon": lambda: as_reconstruction(load_dataset("digits")),
    "mnist1d_recon": lambda: as_reconstruction(load_dataset("mnist1d")),
}
LOCAL = {
    "mnist": lambda root: idx.load_idx_data("mnist", root),
    "fashion_mnist": lambda root: idx.load_idx_data("fashion_mnist", root),
    "cifar10": cifar.load_cifar10_data,
}
DATASETS = sorted(BUNDLED) + sorted(LOCAL)

_cache: dict[tuple[str, str | None], object] = {}



class UnknownDatasetError(KeyError):
    """A dataset name that does not exist (a user input error)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

def _resolved_root(root) -> str | None:
    try:
        return str(data_root(root).resolve())
    except DatasetNotFoundError:
        return None


def load_dataset(name: str, root=None):
    """The dataset object for `name` (ArrayData or TokenStreamData), cached."""
    if name in BUNDLED:
        key = (name, None)
        if key not in _cache:
            _cache[key] = BUNDLED[name]()
        return _cache[key]
    if name in LOCAL:
        key = (name, _resolved_root(root))
        if key not in _cache:
            _cache[key] = LOCAL[name](root)  # raises DatasetNotFoundError with the layout
        return _cache[key]
    raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def missing_reason(name: str, root=None) -> str | None:
    """Why `name` cannot be loaded (the loader's own message: no data directory,
    no such directory, which files are missing where), or None when its files
    are there. Checks files, loads nothing."""
    if name in BUNDLED:
        return None
    if name in ("mnist", "fashion_mnist"):
        return idx.missing_reason(name, root)
    if name == "cifar10":
        return cifar.missing_reason(root)
    raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def is_available(name: str, root=None) -> bool:
    """Whether `name` can be loaded without error (checks files, loads nothing)."""
    return missing_reason(name, root) is None


def clear_cache() -> None:
    _cache.clear()


__all__ = ["ArrayData", "TokenStreamData", "DatasetNotFoundError", "DatasetFormatError", "ENV_VAR", "DATASETS",
           "load_dataset", "is_available", "missing_reason", "clear_cache", "batch_stream"]

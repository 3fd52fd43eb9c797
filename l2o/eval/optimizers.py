"""Which optimizers the evaluation compares, and how each is built for a model.

Hand-designed ones (Adam, AdamW, SGD with momentum, Adam at its default lr)
take a learning rate; the learned ones (GMN, MLP) take weights: a file, the
shipped pretrained weights, or, only when asked, an untrained metanetwork.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

OPTIMIZERS = ("gmn", "mlp", "adam", "adamw", "sgd", "adam_default")
LEARNED = ("gmn", "mlp")
# adam_default: Adam at its default lr 1e-3, untuned: what most users run
HAND_DESIGNED = ("adam", "adamw", "sgd", "adam_default")
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
    "adam_default": (1e-3,),
}
ADAMW_WEIGHT_DECAY = 1e-2
SGD_MOMENTUM = 0.9

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


class EvaluationInputError(ValueError):
    """Bad evaluation arguments (optimizer names, seeds, steps, suite without data)."""


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not installed and untrained ones were not allowed."""


def resolve_weights(kind: str, path: str | os.PathLike | None, allow_untrained: bool) -> tuple[str | None, str]:
    """(weights for the optimizer, a label for the report).

    ``path`` None means the shipped pretrained weights. When they are not
    installed we stop with a clear message rather than silently evaluating
    an untrained metanetwork, unless ``allow_untrained``.
    """
    from ..checkpoint import pretrained_path

    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{kind}-weights: file not found: {path}")
        cached_lopt(kind, str(path))    # a corrupt or wrong-kind file: its WeightsFileError here, before any run
        return str(path), str(path)
    pre = pretrained_path(kind)
    if pre.is_file():
        return str(pre), f"pretrained ({pre.name})"
    if not allow_untrained:
        raise MissingWeightsError(
            f"no pretrained {kind.upper()} weights installed ({pre} is missing). Produce them with "
            f"meta_train.py, pass --{kind}-weights PATH, drop '{kind}' from --optimizers, or pass "
            f"--allow-untrained to evaluate an untrained {kind.upper()} (it behaves like Adam at lr 1e-3).")
    return None, "UNTRAINED (no pretrained weights installed)"


_LOPT_CACHE: dict[tuple[str, str | None], Any] = {}


def cached_lopt(kind: str, weights: str | None):
    """The metanetwork of ``kind`` with ``weights`` (None: untrained), loaded
    once per process: workers run many runs with the same weights."""
    key = (kind, weights)
    if key not in _LOPT_CACHE:
        from ..checkpoint import load_lopt, make_lopt
        _LOPT_CACHE[key] = make_lopt(kind) if weights is None else load_lopt(weights, expect_kind=kind)
    return _LOPT_CACHE[key]


def optimizer_factory(name: str, task=None, lr: float | None = None,
                      weights: str | None = None) -> MakeOptimizer:
    """``make_optimizer(model)`` for one of :data:`OPTIMIZERS`.

    Hand-designed optimizers need ``lr``; learned ones take ``weights`` (a
    path, or None for an untrained metanetwork) and ``lr`` as the step
    multiplier (default 1.0, the meta-trained step).
    """
    if name in HAND_DESIGNED:
        return _hand_designed(name, lr)
    if name == "gmn":
        from ..optim import GMNOptimizer
        example = task.example_inputs() if task is not None else None
        return lambda model: GMNOptimizer(
            model, weights=cached_lopt("gmn", weights), lr=1.0 if lr is None else lr,
            example_inputs=None if example is None else tuple(x.to(next(model.parameters()).device) for x in example))
    if name == "mlp":
        from ..optim import MLPOptimizer
        return lambda model: MLPOptimizer(model.parameters(), weights=cached_lopt("mlp", weights),
                                          lr=1.0 if lr is None else lr)
    raise EvaluationInputError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def _hand_designed(name: str, lr: float | None) -> MakeOptimizer:
    if lr is None:
        raise EvaluationInputError(f"{name} needs a learning rate")
    if name in ("adam", "adam_default"):
        return lambda model: torch.optim.Adam(model.parameters(), lr=lr)
    if name == "adamw":
        return lambda model: torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM)

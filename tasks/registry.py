"""Lookup of named tasks, suites and family samplers."""
from __future__ import annotations

import difflib
from typing import Callable, Iterable

from .families import MODULES
from .task import Task

# Family name -> sampler(seed, split="train") -> Task.  Samplers are pure
# functions of (seed, split): the same seed always gives the same config.
FAMILIES: dict[str, Callable[..., Task]] = {module.FAMILY: module.sample for module in MODULES}
# Families that have train-split configurations (conv1d is held out entirely).
TRAIN_FAMILIES = tuple(name for name in FAMILIES if name != "conv1d")
SUITES = ("train", "valid", "heldout", "all")
# The validation suite: one configuration per family drawn by its sampler with
# split="valid" (held-out-style sizes and data, a stream of its own), so no
# validation model is a train or test model. Every recipe, checkpoint and
# threshold is chosen on it; the "heldout" (test) suite is reported only.
VALID_SEEDS = {"mlp": (0, 1), "cnn": (0,), "resnet": (0,), "transformer": (0, 1), "conv1d": (0,),
               "autoencoder": (0,), "regression": (0,), "rnn": (0, 1)}

_named: dict[str, Task] | None = None


def _registry() -> dict[str, Task]:
    global _named
    if _named is None:
        _named = {}
        for module in MODULES:
            for task in module.named_tasks():
                if task.name in _named:
                    raise RuntimeError(f"duplicate task name {task.name!r}")
                _named[task.name] = task
        for family, seeds in VALID_SEEDS.items():
            for seed in seeds:
                task = FAMILIES[family](seed, "valid")
                _named[task.name] = task
    return _named


def list_tasks(split: str = "all") -> list[str]:
    """Names of every named task (including ones whose data is missing)."""
    _check_suite(split)
    return [name for name, task in _registry().items() if split == "all" or task.split == split]


class UnknownTaskError(KeyError):
    """A task, family or suite name that does not exist (a user input error)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownSuiteError(UnknownTaskError, ValueError):
    """A suite name that does not exist."""


def get_task(name: str) -> Task:
    """A named task, or a sampled one by its name ``family~split~seed``."""
    registry = _registry()
    family, split, seed = (name.split("~") + ["", "", ""])[:3] if name.count("~") == 2 else ("", "", "")
    if name not in registry and family in FAMILIES and split in ("train", "valid", "heldout") and seed.isdigit():
        return sample_task(family, int(seed), split)
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(registry)}"
        raise UnknownTaskError(f"unknown task {name!r}{hint}")
    return registry[name]


def get_suite(suite: str | Iterable[str] = "train", include_unavailable: bool = False) -> list[Task]:
    """Tasks of a split ("train", "valid", "heldout", "all") or of an explicit list of names.

    Tasks whose data directory is missing are skipped from named splits (an
    explicit list of names is returned as asked; loading it will raise).
    """
    if not isinstance(suite, str):
        return [get_task(name) for name in suite]
    tasks = [get_task(name) for name in list_tasks(suite)]
    return tasks if include_unavailable else [task for task in tasks if task.available()]


def sample_task(family: str, seed: int, split: str = "train") -> Task:
    """A task with a random configuration of `family`, deterministic in (seed, split)."""
    if family not in FAMILIES:
        raise UnknownTaskError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family](seed, split)


def _check_suite(split: str) -> None:
    if split not in SUITES:
        raise UnknownSuiteError(f"suite must be one of {SUITES} or a list of task names, got {split!r}")

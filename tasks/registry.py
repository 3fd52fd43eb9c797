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
SUITES = ("train", "heldout", "all")

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
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=5, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(registry)}"
        raise UnknownTaskError(f"unknown task {name!r}{hint}")
    return registry[name]


def get_suite(suite: str | Iterable[str] = "train", include_unavailable: bool = False) -> list[Task]:
    """Tasks of a split ("train", "heldout", "all") or of an explicit list of names.

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

"""Which task an inner run trains, and the per-architecture objects it needs.

A task is named by a *spec* string so it fits in a JSON checkpoint:
``"task:<name>"`` for a named suite task, ``"family:<family>:<seed>"`` for a
configuration drawn from a family sampler. Drawing a spec is a pure function
of ``(seed, slot, run index)``, so a resumed run draws the same tasks without
saving any RNG state.

Building a ParamGraph traces the model with torch.fx; that is far too slow to
repeat every inner run, so graphs (and the module used for
``functional_call``) are built once per task configuration and cached.
"""
from __future__ import annotations

import math
import random
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..graph.batch import BatchedGraph
from ..graph.param_graph import ParamGraph
from ..layout import tensor_layout
from .config import ConfigError


def _tasks_module():
    import tasks  # the task suite lives at the repository top level

    return tasks


def suite_specs(suite: str) -> list[str]:
    """The pool of specs to draw from. ``families``/``mix`` add family samplers."""
    tasks = _tasks_module()
    if suite in ("train", "valid", "heldout", "all"):
        names = [t.name for t in tasks.get_suite(suite)]
        if not names:
            raise ConfigError(f"suite {suite!r} has no task whose data is available (is $L2O_DATA set?)")
        return [f"task:{n}" for n in names]
    if suite == "families":
        return [f"family:{f}" for f in tasks.TRAIN_FAMILIES]
    if suite == "mix":
        return suite_specs("train") + suite_specs("families")
    names = [n.strip() for n in suite.split(",") if n.strip()]
    for n in names:
        tasks.get_task(n)  # raises a clear KeyError with suggestions for a typo
    return [f"task:{n}" for n in names]


def check_local_data(specs: list[str]) -> None:
    """Load, once, every dataset from the data directory ($L2O_DATA: MNIST,
    CIFAR-10) the pool's named tasks read: a corrupt file raises its
    ``DatasetFormatError`` (naming the file) before training starts, not when
    the task is first drawn, hours in. Bundled and procedural data are not
    loaded here; the loads are cached, so the runs reuse them."""
    from tasks.data import LOCAL

    tasks = _tasks_module()
    for spec in specs:
        if spec.startswith("task:"):
            task = tasks.get_task(spec[len("task:"):])
            if getattr(task, "dataset", None) in LOCAL:
                task.load_data()


def skipped_for_data(suite: str) -> list[str]:
    """Tasks of a named suite (``mix`` counts as ``train``) that :func:`suite_specs` leaves
    out because their dataset is missing here: the pool then depends on ``$L2O_DATA``."""
    split = "train" if suite == "mix" else suite
    if split not in ("train", "valid", "heldout", "all"):
        return []       # families need no data; a list of names is used as given
    tasks = _tasks_module()
    return [t.name for t in tasks.get_suite(split, include_unavailable=True) if not t.available()]


def pool_mismatch(saved: list[str], here: list[str]) -> str | None:
    """Why the pool a checkpoint drew from (``saved``) differs from the one built here
    (None when they are the same). Draws index the pool, so any difference changes
    every later task: the resume would not continue the same run."""
    if saved == here:
        return None
    missing, extra = [s for s in saved if s not in here], [s for s in here if s not in saved]
    parts = ([f"missing here: {', '.join(missing)}"] if missing else []) + \
            ([f"new here: {', '.join(extra)}"] if extra else []) + \
            ([] if missing or extra else ["the same tasks in another order"])
    return "; ".join(parts)


def draw_spec(pool: list[str], seed: int, slot: int, index: int) -> tuple[str, int]:
    """(spec, init seed) of run number ``index`` of meta-batch slot ``slot``."""
    rng = random.Random(f"{seed}/{slot}/{index}")  # str seeds hash deterministically (sha512)
    choice = pool[rng.randrange(len(pool))]
    if choice.startswith("family:"):
        choice = f"{choice}:{rng.randrange(2**31)}"
    return choice, rng.randrange(2**31)


def draw_length(shortest: int, longest: int, seed: int, slot: int, index: int) -> int:
    """Length of run number ``index`` of slot ``slot``: log-uniform in
    [shortest, longest] (mixed horizons), or ``shortest`` when ``longest`` is 0."""
    if longest <= shortest:
        return shortest
    rng = random.Random(f"length/{seed}/{slot}/{index}")
    return int(round(math.exp(rng.uniform(math.log(shortest), math.log(longest)))))


def resolve_task(spec: str):
    tasks = _tasks_module()
    kind, _, rest = spec.partition(":")
    if kind == "task":
        return tasks.get_task(rest)
    if kind == "family":
        family, _, seed = rest.partition(":")
        return tasks.sample_task(family, int(seed))
    raise ConfigError(f"bad task spec {spec!r}")


@dataclass
class TaskEntry:
    task: object                  # tasks.Task
    module: nn.Module             # used only as the structure for functional_call
    graph: ParamGraph
    loss_fn: Callable


class TaskPool:
    """Spec -> (task, module, graph, loss_fn), built once and kept (LRU-bounded)."""

    def __init__(self, lopt_kind: str, device: torch.device, max_size: int = 64):
        self.lopt_kind = lopt_kind
        self.device = torch.device(device)
        self.max_size = max_size
        self._cache: OrderedDict[str, TaskEntry] = OrderedDict()
        self._unions: OrderedDict[tuple[str, ...], BatchedGraph] = OrderedDict()
        self._warned: set[str] = set()

    def get(self, spec: str) -> TaskEntry:
        if spec in self._cache:
            self._cache.move_to_end(spec)
            return self._cache[spec]
        task = resolve_task(spec)
        module = task.init(0).to(self.device)
        entry = TaskEntry(task, module, self._graph(task, module), task.loss_fn(module))
        self._cache[spec] = entry
        while len(self._cache) > self.max_size:
            self._cache.popitem(last=False)
        return entry

    def union(self, specs: tuple[str, ...]) -> BatchedGraph:
        """The disjoint union of these tasks' graphs, in this order (built once, LRU-kept)."""
        if specs in self._unions:
            self._unions.move_to_end(specs)
            return self._unions[specs]
        union = self._unions[specs] = BatchedGraph.union([self.get(s).graph for s in specs])
        while len(self._unions) > 16:
            self._unions.popitem(last=False)
        return union

    def _graph(self, task, module: nn.Module) -> ParamGraph:
        named = list(module.named_parameters())
        if self.lopt_kind == "mlp":
            # The per-parameter baseline reads only the flat layout and tensor ids.
            return tensor_layout([p.shape for _, p in named], [n for n, _ in named], self.device)
        from ..graph import build_graph

        try:
            graph = build_graph(module, example_inputs=tuple(x.to(self.device) for x in task.example_inputs()))
        except Exception as err:  # keep a long run alive, but say so loudly
            if task.name not in self._warned:
                warnings.warn(f"build_graph failed for {task.name} ({type(err).__name__}: {err}); "
                              "using the structure-free layout for it")
                self._warned.add(task.name)
            return tensor_layout([p.shape for _, p in named], [n for n, _ in named], self.device)
        return graph.to(self.device)

"""The evaluation protocol: which runs, on which seeds, with which learning rates.

* Every optimizer trains the same models: for each evaluation seed the model
  is initialised with that seed and sees the same stream of training batches.
* Hand-designed optimizers (Adam, AdamW, SGD with momentum 0.9) get their
  learning rate tuned per task over a grid on separate tuning seeds: the
  grid value with the lowest mean final train loss wins; runs that diverged
  are excluded. ``adam_default`` is Adam at lr 1e-3, untuned (what most
  users run). The learned optimizers run as shipped (lr multiplier 1.0).
* Final train loss, divergence and speedup: :mod:`l2o.eval.metrics`.

:func:`evaluate` runs it all: tuning runs and learned-optimizer runs first
(interleaved, longest first, over worker processes), then the hand-designed
optimizers at their chosen learning rates.
"""
from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..device_check import device_problem
from .metrics import DIVERGE_FACTOR, SMOOTH_FRAC, select_lr
from .optimizers import (ADAMW_WEIGHT_DECAY, DEFAULT_GRIDS, HAND_DESIGNED, LEARNED, OPTIMIZERS, SGD_MOMENTUM,
                         EvaluationInputError, resolve_weights)
from .report import write_report
from .results import EvalResults, summarize, table_rows
from .runner import TEST_BATCHES, Job, RunResult, longest_first, run_jobs, worker_init

DEFAULT_STEPS = 400
DEFAULT_SEEDS = 3
DEFAULT_TUNE_SEEDS = 1
TUNE_SEED_BASE = 1000          # tuning seeds never overlap evaluation seeds


def as_seeds(seeds: int | Iterable[int], base: int = 0) -> list[int]:
    """A count (seeds base, base+1, ...) or explicit seeds, as a list."""
    return list(range(base, base + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def resolve_suite(suite) -> tuple[list, list[str]]:
    """(tasks to run, names of suite tasks skipped because their data is missing)."""
    import tasks as task_suite
    if isinstance(suite, str):
        if suite in ("train", "valid", "heldout", "all"):
            every = task_suite.get_suite(suite, include_unavailable=True)
            found = [t for t in every if t.available()]
            if not found:
                raise EvaluationInputError(f"suite {suite!r} has no task whose data is available")
            return found, [t.name for t in every if t not in found]
        suite = [suite]
    found = [task_suite.get_task(t) if isinstance(t, str) else t for t in suite]
    # Fail before any run starts rather than in a worker half-way through, and
    # say why: "not in the data directory" cannot tell an unset $L2O_DATA from
    # a mistyped path or one missing file, the loader's own message can.
    missing: dict[str, list[str]] = {}
    for t in found:
        if hasattr(t, "available") and not t.available():
            missing.setdefault(missing_data_reason(t), []).append(t.name)
    if missing:
        raise EvaluationInputError("; ".join(f"data for task(s) {', '.join(names)} is not available: {reason}"
                                             for reason, names in missing.items()))
    return found, []


def missing_data_reason(task) -> str:
    """The data loader's reason ``task`` cannot run (which directory or files are missing)."""
    from tasks import data
    reason = None
    if isinstance(getattr(task, "dataset", None), str):
        with contextlib.suppress(KeyError):    # not a known dataset name: a custom task
            reason = data.missing_reason(task.dataset, getattr(task, "data_root", None))
    return reason or "its data is not in the data directory (see tasks/README.md, $L2O_DATA)"


SUITE_LABELS = {"heldout": "held-out suite", "valid": "validation suite", "train": "training suite",
                "all": "all tasks"}


def suite_label(suite) -> str:
    """How the report and figures name what was evaluated."""
    if isinstance(suite, str):
        return SUITE_LABELS.get(suite, suite)
    names = [t if isinstance(t, str) else getattr(t, "name", str(t)) for t in suite]
    return ", ".join(names) if len(names) <= 3 else f"{len(names)} tasks"


def check_device(device) -> torch.device:
    """``device`` as a torch.device that exists here; a clear error otherwise (a
    misspelt or absent device would surface as a traceback from the first run)."""
    problem = device_problem(device)
    if problem:
        raise EvaluationInputError(problem)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda", "mps"):
        raise EvaluationInputError(f"device {str(device)!r}: only cpu, cuda and mps are supported")
    return dev


def is_registered(task) -> bool:
    """Whether a worker process can rebuild ``task`` from its name."""
    if isinstance(task, str):
        return True
    try:
        import tasks as task_suite
        return task_suite.get_task(task.name) is task
    except KeyError:
        return False


def tuning_table(task_list, grids: Mapping[str, Sequence[float]], runs: list[RunResult]) -> dict:
    """task -> optimizer -> the grid, each value's score, and the chosen learning rate."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for t in task_list:
        for o, grid in grids.items():
            scores = {lr: [(r.final_train_loss, r.diverged) for r in runs
                           if r.task == t.name and r.optimizer == o and r.lr == lr] for lr in grid}
            chosen, ok = select_lr(scores)
            table.setdefault(t.name, {})[o] = {
                "grid": list(grid), "chosen": chosen, "all_diverged": not ok,
                "score": {repr(lr): (None if any(d for _, d in s) else float(np.mean([f for f, _ in s])))
                          for lr, s in scores.items()},
                "at_grid_edge": ok and chosen in (min(grid), max(grid)) and len(grid) > 1,
            }
    return table


def evaluate(suite="heldout", optimizers: Sequence[str] = OPTIMIZERS, steps: int = DEFAULT_STEPS,
             seeds: int | Iterable[int] = DEFAULT_SEEDS, tune_seeds: int | Iterable[int] = DEFAULT_TUNE_SEEDS,
             lr_grids: Mapping[str, Sequence[float]] | None = None, gmn_weights=None, mlp_weights=None,
             allow_untrained: bool = False, device: str = "cpu", test_every: int = 0,
             workers: int | None = None, threads: int | None = None,
             out_dir: str | os.PathLike | None = None, progress: bool = True) -> EvalResults:
    """Run the whole protocol (see the module docstring) and optionally write the report.

    ``suite``: "heldout" (the test split: report it, never choose on it) /
    "valid" (choose on it) / "train" / "all", a task name, or a list of names or
    Task objects. ``seeds`` / ``tune_seeds``: a count or explicit seeds
    (tuning seeds default to 1000, 1001, ... so they never coincide with
    evaluation seeds). ``workers``: parallel processes on CPU (default: one
    per core, one thread each); Task objects not in the registry force
    in-process runs. ``threads``: torch threads per worker (default: cores
    / workers; models here are small, so more processes beat more threads).
    """
    optimizers = list(dict.fromkeys(optimizers))
    if not optimizers:
        raise EvaluationInputError(f"no optimizers to evaluate; choose from {', '.join(OPTIMIZERS)}")
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown:
        raise EvaluationInputError(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    check_counts(steps=steps, test_every=test_every, workers=workers, threads=threads)
    check_device(device)
    task_list, skipped = resolve_suite(suite)
    seeds, tune_seeds = as_seeds(seeds), as_seeds(tune_seeds, TUNE_SEED_BASE)
    # No seeds would be an empty report that looks like a finished evaluation.
    if not seeds:
        raise EvaluationInputError("no evaluation seeds: seeds must be >= 1 (a count) or a non-empty list")
    if set(seeds) & set(tune_seeds):
        raise EvaluationInputError(f"tuning seeds {tune_seeds} overlap evaluation seeds {seeds}")
    grids = {o: tuple(float(x) for x in (lr_grids or {}).get(o, DEFAULT_GRIDS[o]))
             for o in optimizers if o in HAND_DESIGNED}
    for o, grid in grids.items():
        # A learning rate <= 0 or NaN reaches torch.optim as a ValueError from a worker.
        bad = [lr for lr in grid if not (np.isfinite(lr) and lr > 0)]
        if not grid or bad:
            raise EvaluationInputError(f"learning-rate grid for {o} must be non-empty positive numbers, "
                                       f"got {list(grid)}")
    # Without tuning runs select_lr would "choose" a grid value no run has seen
    # (the first) and the report would still call the optimizer tuned.
    if grids and not tune_seeds:
        raise EvaluationInputError(f"no tuning seeds, but {', '.join(grids)} choose(s) a learning rate on them: "
                                   "tune_seeds must be >= 1")
    weights, weight_labels = {}, {}
    for kind, path in (("gmn", gmn_weights), ("mlp", mlp_weights)):
        if kind in optimizers:
            weights[kind], weight_labels[kind] = resolve_weights(kind, path, allow_untrained)
    workers, threads = parallelism(device, task_list, workers, threads)
    config = dict(suite=[t.name for t in task_list], suite_label=suite_label(suite), skipped_no_data=skipped, optimizers=optimizers, steps=steps,
                  seeds=seeds, tune_seeds=tune_seeds, lr_grids={o: list(g) for o, g in grids.items()},
                  weights=weight_labels, device=str(device), workers=workers, threads_per_worker=threads,
                  test_every=test_every, test_batches=TEST_BATCHES, smooth_frac=SMOOTH_FRAC,
                  diverge_factor=DIVERGE_FACTOR, adamw_weight_decay=ADAMW_WEIGHT_DECAY, sgd_momentum=SGD_MOMENTUM,
                  torch=torch.__version__)
    start = time.perf_counter()
    tuning, runs, cpu_time = _run_protocol(task_list, optimizers, grids, weights, seeds, tune_seeds, steps,
                                           str(device), test_every, workers, threads, progress)
    config["wall_time_s"] = round(time.perf_counter() - start, 1)
    config["cpu_time_s"] = round(cpu_time, 1)
    rows = table_rows(task_list, optimizers, runs, tuning, weight_labels)
    results = EvalResults(config, tuning, rows, summarize(rows, optimizers), runs=runs)
    if out_dir is not None:
        write_report(results, out_dir)
    return results


def check_counts(**counts: int | None) -> None:
    """steps >= 1, test_every >= 0, workers / threads None or >= 1: a clear error
    here instead of a ZeroDivisionError or a failed run later."""
    for name, value in counts.items():
        if value is None and name in ("workers", "threads"):
            continue
        low = 0 if name == "test_every" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise EvaluationInputError(f"{name} must be an integer >= {low}, got {value!r}")


def parallelism(device: str, task_list, workers: int | None, threads: int | None) -> tuple[int, int]:
    """(worker processes, torch threads per worker): one process per core on CPU by
    default; one process (this one) on an accelerator or for unregistered tasks."""
    on_cpu = torch.device(device).type == "cpu"
    cores = os.cpu_count() or 1
    registered = all(is_registered(t) for t in task_list)
    if workers is None:
        workers = cores if on_cpu and registered else 1
    if not on_cpu or not registered:
        workers = 1   # one accelerator / unpicklable stand-in tasks: run in this process
    if threads is None:
        threads = max(1, cores // workers) if on_cpu else torch.get_num_threads()
    return workers, threads


def _run_protocol(task_list, optimizers, grids, weights, seeds, tune_seeds, steps, device, test_every,
                  workers, threads, progress) -> tuple[dict, list[RunResult], float]:
    """(tuning table, evaluation runs, CPU seconds of all runs)."""
    from tqdm.auto import tqdm

    task_ref = (lambda t: t.name) if workers > 1 else (lambda t: t)
    tune_jobs = [Job(task_ref(t), o, lr, s, "tune") for t in task_list for o, grid in grids.items()
                 for lr in grid for s in tune_seeds]
    learned_jobs = [Job(task_ref(t), o, None, s, "eval", weights[o]) for t in task_list
                    for o in optimizers if o in LEARNED for s in seeds]
    total = len(tune_jobs) + len(learned_jobs) + len(task_list) * len(grids) * len(seeds)
    on_cpu = torch.device(device).type == "cpu"
    with worker_pool(workers, threads, on_cpu) as pool, \
            tqdm(total=total, desc="evaluate", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        # Learned-optimizer runs need no tuning: interleave them with the grid.
        first = run_jobs(longest_first(learned_jobs + tune_jobs), steps, device, test_every, bar, pool)
        tuning = tuning_table(task_list, grids, [r for r in first if r.seed in tune_seeds])
        hand_jobs = [Job(task_ref(t), o, tuning[t.name][o]["chosen"], s, "eval") for t in task_list
                     for o in grids for s in seeds]
        second = run_jobs(longest_first(hand_jobs), steps, device, test_every, bar, pool)
    runs = [r for r in first if r.seed in seeds and r.optimizer in LEARNED] + second
    return tuning, runs, sum(r.cpu_time for r in first + second)


@contextlib.contextmanager
def worker_pool(workers: int, threads: int, on_cpu: bool) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of ``workers`` spawned processes (None: run in this process, with
    ``threads`` torch threads on CPU); its workers are stopped on any error."""
    pool = None
    if workers > 1:
        import multiprocessing as mp
        # spawn: forking a process whose torch thread pools are live can deadlock.
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                   initializer=worker_init, initargs=(threads,))
    saved_threads = torch.get_num_threads()
    if pool is None and on_cpu:
        torch.set_num_threads(threads)
    try:
        yield pool
    except BaseException:
        if pool is not None:
            # Ctrl-C or a failed run: stop our workers now instead of letting
            # them finish (or outlive us). _processes is the pool's own list.
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list((pool._processes or {}).values()):
                proc.terminate()
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        torch.set_num_threads(saved_threads)

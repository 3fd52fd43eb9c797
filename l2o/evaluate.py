"""Held-out evaluation of the learned optimizers against tuned hand-designed ones.

    python -m l2o.evaluate                          # held-out suite, all optimizers
    python -m l2o.evaluate conv1d_mnist1d --steps 300 --seeds 1 --optimizers gmn,adam

Protocol (also written into results.md so a reader never has to guess):

* Every optimizer trains the same models: for each evaluation seed the model
  is initialised with that seed and sees the same stream of training batches.
* Hand-designed optimizers (Adam, AdamW, SGD with momentum 0.9) get their
  learning rate tuned per task over a grid on separate tuning seeds: the
  grid value with the lowest mean final train loss wins; runs that diverged
  are excluded. ``adam_default`` is Adam at lr 1e-3, untuned (what most
  users run). The learned optimizers run as shipped (lr multiplier 1.0).
* Final train loss = mean of the last 10% of the per-step minibatch losses.
  Curves are smoothed with the same trailing window before comparing them.
* Diverged = a non-finite loss, or the smoothed loss rising above 3x the
  initial loss at any point. Such runs stop early and lose every comparison.
* Speedup of X vs Adam = (steps tuned Adam needs to reach its own final
  smoothed loss) / (steps X needs to reach that loss), on seed-averaged
  smoothed curves. If X never gets there, the speedup is reported as
  "<steps_adam/budget" (an upper bound, below 1).

Cost: the default (held-out suite, 400 steps, 3 seeds, 1 tuning seed,
6+6+7 grid values: 34 runs per task) takes about 15-20 minutes on an idle
2-core CPU: ~2,000 CPU-seconds of runs over two worker processes
(extrapolated from the CPU time a 40-step run of the same protocol used:
225 s; the learned optimizers' steps are 2-4x an Adam step).

The Python API (:func:`evaluate`, :func:`run_training`, :func:`speedup`,
:func:`select_lr`) is what the CLI, the demo and the tests use.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

OPTIMIZERS = ("gmn", "mlp", "adam", "adamw", "sgd", "adam_default")
LEARNED = ("gmn", "mlp")
# adam_default: Adam at its default lr 1e-3, untuned: what most users run
HAND_DESIGNED = ("adam", "adamw", "sgd", "adam_default")
DEFAULT_STEPS = 400
DEFAULT_SEEDS = 3
DEFAULT_TUNE_SEEDS = 1
TUNE_SEED_BASE = 1000          # tuning seeds never overlap evaluation seeds
SMOOTH_FRAC = 0.10             # window of the final-loss average and of curve smoothing
DIVERGE_FACTOR = 3.0
TEST_BATCHES = 8
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
    "adam_default": (1e-3,),
}
ADAMW_WEIGHT_DECAY = 1e-2
SGD_MOMENTUM = 0.9


class EvaluationInputError(ValueError):
    """Bad evaluation arguments (optimizer names, seeds, steps, suite without data)."""


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not installed and untrained ones were not allowed."""


# ----------------------------------------------------------------------------- curves
def smooth(curve, window: int | None = None, frac: float = SMOOTH_FRAC) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` points average what exists so far.

    NaN (a run that stopped early) stays NaN; the window defaults to
    ``frac`` of the curve's length (at least one step).
    """
    x = np.asarray(curve, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"smooth expects a 1-D curve, got shape {x.shape}")
    if x.size == 0:
        return x
    w = window if window is not None else smooth_window(len(x), frac)
    c = np.concatenate([[0.0], np.cumsum(x)])   # NaN propagates forward, as it should
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - w)
    return (c[idx] - c[lo]) / (idx - lo)


def smooth_window(steps: int, frac: float = SMOOTH_FRAC) -> int:
    return max(1, int(math.ceil(frac * steps)))


def final_loss(curve, frac: float = SMOOTH_FRAC) -> float:
    """Mean of the last ``frac`` of the losses (NaN if the run did not finish)."""
    x = np.asarray(curve, dtype=float)
    return float(np.mean(x[-smooth_window(len(x), frac):]))


def is_diverged(curve, factor: float = DIVERGE_FACTOR, window: int | None = None) -> bool:
    """Non-finite anywhere, or the smoothed loss above ``factor`` x the initial loss."""
    x = np.asarray(curve, dtype=float)
    if x.size == 0 or not np.all(np.isfinite(x)):
        return True
    return bool(np.any(smooth(x, window) > factor * x[0]))


def steps_to_reach(smoothed, target: float) -> int | None:
    """1-based number of steps until the (smoothed) curve is <= target; None if never."""
    hits = np.nonzero(np.asarray(smoothed, dtype=float) <= target)[0]
    return int(hits[0]) + 1 if hits.size else None


@dataclass
class Speedup:
    value: float           # NaN when undefined (the reference diverged)
    reached: bool          # False: never reached the target; value is an upper bound
    ref_steps: int | None  # steps the reference needed to reach its own final loss
    steps: int | None      # steps the candidate needed (None if never)

    def __str__(self) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        return f"{self.value:.2f}x" if self.reached else f"<{self.value:.2f}x"


def speedup(reference, candidate, window: int | None = None) -> Speedup:
    """Steps ``reference`` needs to reach its own final smoothed loss divided by
    the steps ``candidate`` needs to reach that same loss (both smoothed).

    Curves are per-step losses of equal budgets. If the candidate never
    reaches the target, the returned value is ``ref_steps / budget`` with
    ``reached=False``: the candidate would need more than the whole budget,
    so the true speedup is below that.
    """
    ref = smooth(reference, window)
    cand = smooth(candidate, window)
    if ref.size == 0 or not np.isfinite(ref[-1]):
        return Speedup(float("nan"), False, None, None)
    target = ref[-1]
    ref_steps = steps_to_reach(ref, target)
    cand_steps = steps_to_reach(np.where(np.isfinite(cand), cand, np.inf), target)
    if cand_steps is None:
        return Speedup(ref_steps / len(cand), False, ref_steps, None)
    return Speedup(ref_steps / cand_steps, True, ref_steps, cand_steps)


def select_lr(scores: Mapping[float, Sequence[tuple[float, bool]]]) -> tuple[float, bool]:
    """The tuning rule: lowest mean final train loss over the tuning seeds,
    excluding learning rates where any tuning run diverged.

    ``scores[lr]`` is a list of ``(final_train_loss, diverged)``. Returns
    ``(lr, ok)``; if every value diverged, ``ok`` is False and the smallest
    learning rate is returned (the one least likely to blow up).
    """
    if not scores:
        raise ValueError("select_lr: empty grid")
    usable = {lr: float(np.mean([f for f, _ in runs])) for lr, runs in scores.items()
              if runs and not any(d for _, d in runs) and all(math.isfinite(f) for f, _ in runs)}
    if not usable:
        return min(scores), False
    return min(usable, key=lambda lr: (usable[lr], lr)), True


# ----------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    task: str
    optimizer: str
    lr: float | None
    seed: int
    steps: int
    train_loss: np.ndarray                     # per-step minibatch loss; NaN after an early stop
    diverged: bool
    stopped_at: int                            # steps actually taken
    test_steps: list[int] = field(default_factory=list)
    test: list[dict[str, float]] = field(default_factory=list)   # metrics at test_steps
    final_test: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0
    cpu_time: float = 0.0                      # this process's CPU seconds (load-independent cost)

    @property
    def final_train_loss(self) -> float:
        return float("nan") if self.diverged else final_loss(self.train_loss)


def evaluate_test(task, model: nn.Module, seed: int, batches: int = TEST_BATCHES, device="cpu") -> dict[str, float]:
    """Mean of ``task.metric`` over a fixed set of held-out test batches."""
    stream = task.batches("test", seed=seed, device=device)
    totals: dict[str, float] = {}
    for _ in range(batches):
        for k, v in task.metric(model, next(stream)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / batches for k, v in totals.items()}


def run_training(task, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], steps: int,
                 seed: int = 0, device="cpu", test_every: int = 0, test_batches: int = TEST_BATCHES,
                 model: nn.Module | None = None, name: str = "", lr: float | None = None) -> RunResult:
    """Train ``task.init(seed)`` (or a copy of ``model``) for ``steps`` steps.

    The batch stream is seeded with ``seed`` too, so two optimizers given the
    same seed see the same initial weights and the same batches. Losses go
    into a preallocated tensor on the device; the only host syncs are one
    divergence check per smoothing window and the test evaluations.
    """
    if steps < 1:
        raise EvaluationInputError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    model = (copy.deepcopy(model) if model is not None else task.init(seed)).to(device).train()
    opt = make_optimizer(model)
    stream = task.batches("train", seed=seed, device=device)
    losses = torch.full((steps,), float("nan"), device=device)
    window = smooth_window(steps)
    result = RunResult(task.name, name, lr, seed, steps, np.empty(0), False, steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    initial = None
    for t in range(steps):
        batch = next(stream)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        losses[t] = loss.detach()
        if initial is None:
            initial = float(losses[0])
        if (t + 1) % window == 0 or t + 1 == steps:
            # One sync per window: the trailing mean here is a point of the
            # smoothed curve, so exceeding the bound is divergence by definition.
            recent = losses[max(0, t + 1 - window): t + 1]
            chunk_mean = float(recent.mean())
            if not bool(torch.isfinite(recent).all()) or chunk_mean > DIVERGE_FACTOR * initial:
                result.diverged, result.stopped_at = True, t + 1
                break
        if test_every and (t + 1) % test_every == 0 and t + 1 < steps:
            result.test_steps.append(t + 1)
            result.test.append(evaluate_test(task, model, seed, test_batches, device))
    result.train_loss = losses.cpu().numpy().astype(float)
    if not result.diverged:
        result.diverged = is_diverged(result.train_loss, window=window)
    if result.diverged:
        result.train_loss[result.stopped_at:] = np.nan
    if not result.diverged or all(math.isfinite(p.detach().float().sum().item()) for p in model.parameters()):
        result.final_test = evaluate_test(task, model, seed, test_batches, device)
    result.test_steps.append(result.stopped_at)
    result.test.append(result.final_test)
    result.wall_time = time.perf_counter() - start
    result.cpu_time = time.process_time() - cpu_start
    return result


# ----------------------------------------------------------------------------- optimizers
def resolve_weights(kind: str, path: str | os.PathLike | None, allow_untrained: bool) -> tuple[str | None, str]:
    """(weights for the optimizer, a label for the report).

    ``path`` None means the shipped pretrained weights. When they are not
    installed we stop with a clear message rather than silently evaluating
    an untrained metanetwork, unless ``allow_untrained``.
    """
    from .checkpoint import pretrained_path

    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--{kind}-weights: file not found: {path}")
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


def _load_lopt(kind: str, weights: str | None):
    # One load per process: workers run many runs with the same weights.
    key = (kind, weights)
    if key not in _LOPT_CACHE:
        from .checkpoint import load_lopt, make_lopt
        _LOPT_CACHE[key] = make_lopt(kind) if weights is None else load_lopt(weights, expect_kind=kind)
    return _LOPT_CACHE[key]


def optimizer_factory(name: str, task=None, lr: float | None = None,
                      weights: str | None = None) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """``make_optimizer(model)`` for one of :data:`OPTIMIZERS`.

    Hand-designed optimizers need ``lr``; learned ones take ``weights`` (a
    path, or None for an untrained metanetwork) and ``lr`` as the step
    multiplier (default 1.0, the meta-trained step).
    """
    if name in HAND_DESIGNED:
        if lr is None:
            raise EvaluationInputError(f"{name} needs a learning rate")
        if name in ("adam", "adam_default"):
            return lambda model: torch.optim.Adam(model.parameters(), lr=lr)
        if name == "adamw":
            return lambda model: torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
        return lambda model: torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM)
    if name == "gmn":
        from .optim import GMNOptimizer
        example = task.example_inputs() if task is not None else None
        return lambda model: GMNOptimizer(
            model, weights=_load_lopt("gmn", weights), lr=1.0 if lr is None else lr,
            example_inputs=None if example is None else tuple(x.to(next(model.parameters()).device) for x in example))
    if name == "mlp":
        from .optim import MLPOptimizer
        return lambda model: MLPOptimizer(model.parameters(), weights=_load_lopt("mlp", weights),
                                          lr=1.0 if lr is None else lr)
    raise EvaluationInputError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


# ----------------------------------------------------------------------------- job running
@dataclass(frozen=True)
class Job:
    task: Any              # a task name (resolved in the worker) or a Task object (in-process)
    optimizer: str
    lr: float | None
    seed: int
    purpose: str           # "tune" | "eval"
    weights: str | None = None

    @property
    def task_name(self) -> str:
        return self.task if isinstance(self.task, str) else self.task.name


def _run_job(job: Job, steps: int, device: str, test_every: int) -> RunResult:
    task = job.task
    if isinstance(task, str):
        import tasks as task_suite
        task = task_suite.get_task(task)
    make = optimizer_factory(job.optimizer, task, job.lr, job.weights)
    # Tuning runs only need the train curve: skip intermediate test passes.
    return run_training(task, make, steps, seed=job.seed, device=device,
                        test_every=test_every if job.purpose == "eval" else 0, name=job.optimizer, lr=job.lr)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_jobs(jobs: list[Job], steps: int, device: str, test_every: int, workers: int, threads: int,
              bar, pool) -> list[RunResult]:
    results: list[RunResult] = []
    if pool is None:
        for job in jobs:
            bar.set_postfix_str(f"{job.task_name}/{job.optimizer}", refresh=False)
            results.append(_run_job(job, steps, device, test_every))
            bar.update()
        return results
    futures = {pool.submit(_run_job, job, steps, device, test_every): job for job in jobs}
    for fut in as_completed(futures):
        job = futures[fut]
        try:
            results.append(fut.result())
        except Exception as err:
            raise RuntimeError(f"run {job.task_name}/{job.optimizer} lr={job.lr} seed={job.seed} failed: "
                               f"{type(err).__name__}: {err}") from err
        bar.set_postfix_str(f"{job.task_name}/{job.optimizer}", refresh=False)
        bar.update()
    return results


# ----------------------------------------------------------------------------- evaluation
@dataclass
class EvalResults:
    config: dict[str, Any]
    tuning: dict[str, dict[str, dict[str, Any]]]        # task -> optimizer -> grid scores, chosen lr
    rows: list[dict[str, Any]]                          # one per (task, optimizer): the table
    summary: dict[str, Any]
    runs: list[RunResult] = field(repr=False, default_factory=list)

    def curves(self) -> dict[str, dict[str, np.ndarray]]:
        """task -> optimizer -> [seeds, steps] training losses of the evaluation runs."""
        out: dict[str, dict[str, list]] = {}
        for r in sorted(self.runs, key=lambda r: r.seed):
            out.setdefault(r.task, {}).setdefault(r.optimizer, []).append(r.train_loss)
        # Suite order for the panels, not the order runs happened to finish in.
        order = [t for t in self.config.get("suite", []) if t in out] + [t for t in out if t not in self.config.get("suite", [])]
        opt_order = self.config.get("optimizers", [])
        return {t: {o: np.stack(out[t][o]) for o in sorted(out[t], key=lambda o: opt_order.index(o) if o in opt_order else 99)}
                for t in order}

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "tuning": self.tuning, "rows": self.rows, "summary": self.summary}


def _as_seeds(seeds: int | Iterable[int], base: int = 0) -> list[int]:
    return list(range(base, base + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _resolve_suite(suite) -> tuple[list, list[str]]:
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
    # Fail before any run starts rather than in a worker half-way through.
    missing = [t.name for t in found if hasattr(t, "available") and not t.available()]
    if missing:
        raise EvaluationInputError(f"data for task(s) {', '.join(missing)} is not in the data directory "
                         "(see tasks/README.md, $L2O_DATA)")
    return found, []


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
    from tqdm.auto import tqdm

    optimizers = list(dict.fromkeys(optimizers))
    unknown = [o for o in optimizers if o not in OPTIMIZERS]
    if unknown:
        raise EvaluationInputError(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    task_list, skipped = _resolve_suite(suite)
    seeds = _as_seeds(seeds)
    tune_seeds = _as_seeds(tune_seeds, TUNE_SEED_BASE)
    if set(seeds) & set(tune_seeds):
        raise EvaluationInputError(f"tuning seeds {tune_seeds} overlap evaluation seeds {seeds}")
    grids = {o: tuple(float(x) for x in (lr_grids or {}).get(o, DEFAULT_GRIDS[o]))
             for o in optimizers if o in HAND_DESIGNED}
    weights, weight_labels = {}, {}
    for kind, path in (("gmn", gmn_weights), ("mlp", mlp_weights)):
        if kind in optimizers:
            weights[kind], weight_labels[kind] = resolve_weights(kind, path, allow_untrained)

    on_cpu = torch.device(device).type == "cpu"
    cores = os.cpu_count() or 1
    registered = all(_is_registered(t) for t in task_list)
    if workers is None:
        workers = cores if on_cpu and registered else 1
    if not on_cpu or not registered:
        workers = 1   # one accelerator / unpicklable stand-in tasks: run in this process
    if threads is None:
        threads = max(1, cores // workers) if on_cpu else torch.get_num_threads()
    task_ref = (lambda t: t.name) if workers > 1 else (lambda t: t)

    tune_jobs = [Job(task_ref(t), o, lr, s, "tune") for t in task_list for o, grid in grids.items()
                 for lr in grid for s in tune_seeds]
    learned_jobs = [Job(task_ref(t), o, None, s, "eval", weights[o]) for t in task_list
                    for o in optimizers if o in LEARNED for s in seeds]
    n_hand_eval = len(task_list) * len(grids) * len(seeds)
    total = len(tune_jobs) + len(learned_jobs) + n_hand_eval

    config = dict(suite=[t.name for t in task_list], skipped_no_data=skipped, optimizers=optimizers, steps=steps, seeds=seeds,
                  tune_seeds=tune_seeds, lr_grids={o: list(g) for o, g in grids.items()}, weights=weight_labels,
                  device=str(device), workers=workers, threads_per_worker=threads, test_every=test_every,
                  test_batches=TEST_BATCHES, smooth_frac=SMOOTH_FRAC, diverge_factor=DIVERGE_FACTOR,
                  adamw_weight_decay=ADAMW_WEIGHT_DECAY, sgd_momentum=SGD_MOMENTUM, torch=torch.__version__)
    start = time.perf_counter()
    pool = None
    if workers > 1:
        import multiprocessing as mp
        # spawn: forking a process whose torch thread pools are live can deadlock.
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                   initializer=_worker_init, initargs=(threads,))
    saved_threads = torch.get_num_threads()
    if pool is None and on_cpu:
        torch.set_num_threads(threads)
    try:
        with tqdm(total=total, desc="evaluate", unit="run", disable=not progress, dynamic_ncols=True) as bar:
            # Learned-optimizer runs need no tuning: interleave them with the grid.
            # Longest runs first so the last worker is not left with a big one.
            first = _run_jobs(_longest_first(learned_jobs + tune_jobs), steps, str(device), test_every, workers, threads, bar, pool)
            tuning = _tuning_table(task_list, grids, [r for r in first if r.seed in tune_seeds])
            hand_jobs = [Job(task_ref(t), o, tuning[t.name][o]["chosen"], s, "eval") for t in task_list
                         for o in grids for s in seeds]
            second = _run_jobs(_longest_first(hand_jobs), steps, str(device), test_every, workers, threads, bar, pool)
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
    config["wall_time_s"] = round(time.perf_counter() - start, 1)
    config["cpu_time_s"] = round(sum(r.cpu_time for r in first + second), 1)
    eval_runs = [r for r in first if r.seed in seeds and r.optimizer in LEARNED] + second
    rows = _table_rows(task_list, optimizers, eval_runs, tuning, weight_labels)
    results = EvalResults(config, tuning, rows, _summary(rows, optimizers), runs=eval_runs)
    if out_dir is not None:
        write_report(results, out_dir)
    return results


def _longest_first(jobs: list[Job]) -> list[Job]:
    # Rough cost model: step time grows with parameter count, and a learned
    # optimizer step costs a few hand-designed ones (measured on CPU).
    def cost(job: Job) -> float:
        task = job.task
        if isinstance(task, str):
            import tasks as task_suite
            task = task_suite.get_task(task)
        n = task.num_params() if hasattr(task, "num_params") else 1
        return n * (3.0 if job.optimizer in LEARNED else 1.0)
    return sorted(jobs, key=cost, reverse=True)


def _is_registered(task) -> bool:
    if isinstance(task, str):
        return True
    try:
        import tasks as task_suite
        return task_suite.get_task(task.name) is task
    except KeyError:
        return False


def _tuning_table(task_list, grids, runs: list[RunResult]) -> dict:
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


def _metric_name(test: dict[str, float]) -> str | None:
    names = [k for k in test if k != "loss"]
    return names[0] if names else None


def _table_rows(task_list, optimizers, runs: list[RunResult], tuning, weight_labels) -> list[dict]:
    by = {}
    for r in runs:
        by.setdefault((r.task, r.optimizer), []).append(r)
    rows = []
    for t in task_list:
        adam = by.get((t.name, "adam"))
        adam_curve = _mean_curve(adam) if adam else None
        for o in optimizers:
            rs = sorted(by.get((t.name, o), []), key=lambda r: r.seed)
            if not rs:
                continue
            finals = np.array([r.final_train_loss for r in rs])
            n_div = sum(r.diverged for r in rs)
            tests = [r.final_test for r in rs if r.final_test and not r.diverged]
            metric = _metric_name(rs[0].final_test or (tests[0] if tests else {}))
            test_loss_key = "loss" if tests and "loss" in tests[0] else metric
            row = {
                "task": t.name, "family": t.family, "optimizer": o,
                "lr": rs[0].lr if o in HAND_DESIGNED else None,
                "weights": weight_labels.get(o, ""),
                "seeds": len(rs), "steps": rs[0].steps,
                "final_train_loss": float(np.mean(finals)) if n_div == 0 else float("nan"),
                "final_train_loss_std": float(np.std(finals)) if n_div == 0 else float("nan"),
                "test_loss": float(np.mean([x[test_loss_key] for x in tests])) if tests and test_loss_key else float("nan"),
                "test_metric_name": metric or "",
                "test_metric": float(np.mean([x[metric] for x in tests])) if tests and metric else float("nan"),
                "diverged_seeds": int(n_div),
                "wall_time_s": float(np.mean([r.wall_time for r in rs])),
                "cpu_time_s": float(np.mean([r.cpu_time for r in rs])),
            }
            if adam_curve is not None and o != "adam" and n_div:
                # A run that blew up may have passed Adam's loss on the way: no credit.
                row.update(speedup_vs_adam=0.0, speedup_reached=False, adam_steps_to_final=None,
                           steps_to_adam_final=None, speedup_str="diverged")
            elif adam_curve is not None and o != "adam":
                sp = speedup(adam_curve, _mean_curve(rs))
                row.update(speedup_vs_adam=sp.value, speedup_reached=sp.reached,
                           adam_steps_to_final=sp.ref_steps, steps_to_adam_final=sp.steps,
                           speedup_str=str(sp))
            else:
                row.update(speedup_vs_adam=float("nan"), speedup_reached=None, adam_steps_to_final=None,
                           steps_to_adam_final=None, speedup_str="" if o == "adam" else "n/a")
            if o in HAND_DESIGNED and t.name in tuning:
                row["lr_at_grid_edge"] = tuning[t.name][o]["at_grid_edge"]
            rows.append(row)
    return rows


def _mean_curve(runs: list[RunResult]) -> np.ndarray:
    # Mean over seeds of the raw losses; a diverged seed makes the mean NaN
    # from its stop onwards, so a diverged optimizer cannot look fast.
    return np.mean(np.stack([r.train_loss for r in runs]), axis=0)


TIE_RTOL = 0.005   # final losses within 0.5% are a tie, not a win (noise between seeds is larger)


def _beats(a: dict | None, b: dict | None, key: str = "final_train_loss") -> str | None:
    """"win" / "tie" / "loss" of a against b on ``key`` (final train loss or
    test loss); a diverged run never wins and beats any diverged one."""
    if a is None or b is None:
        return None
    fa, fb = a[key], b[key]
    if not math.isfinite(fa):
        return "loss"
    if not math.isfinite(fb):
        return "win"
    if abs(fa - fb) <= TIE_RTOL * max(abs(fa), abs(fb)):
        return "tie"
    return "win" if fa < fb else "loss"


def _summary(rows: list[dict], optimizers) -> dict[str, Any]:
    idx = {(r["task"], r["optimizer"]): r for r in rows}
    task_names = list(dict.fromkeys(r["task"] for r in rows))
    summary: dict[str, Any] = {"tasks": len(task_names), "wins": {}, "test_wins": {},
                               "median_speedup_vs_adam": {}, "speedup_reached": {}, "diverged_runs": {},
                               "best_on": {}}
    pairs = [(a, b) for a in LEARNED for b in ("adam", "adamw", "sgd", "adam_default", "mlp")
             if a != b and a in optimizers and b in optimizers and not (a == "mlp" and b == "gmn")]
    for a, b in pairs:
        for table, key in (("wins", "final_train_loss"), ("test_wins", "test_loss")):
            outcomes = [_beats(idx.get((t, a)), idx.get((t, b)), key) for t in task_names]
            outcomes = [x for x in outcomes if x is not None]
            summary[table][f"{a}_vs_{b}"] = {"wins": outcomes.count("win"), "ties": outcomes.count("tie"),
                                             "of": len(outcomes)}
    for o in optimizers:
        sp = [idx[(t, o)] for t in task_names if (t, o) in idx and math.isfinite(idx[(t, o)]["speedup_vs_adam"])]
        if sp:
            summary["median_speedup_vs_adam"][o] = float(np.median([r["speedup_vs_adam"] for r in sp]))
            summary["speedup_reached"][o] = {"reached": sum(bool(r["speedup_reached"]) for r in sp), "of": len(sp)}
        summary["diverged_runs"][o] = int(sum(idx[(t, o)]["diverged_seeds"] for t in task_names if (t, o) in idx))
    for t in task_names:
        cands = [idx[(t, o)] for o in optimizers if (t, o) in idx and math.isfinite(idx[(t, o)]["final_train_loss"])]
        summary["best_on"][t] = min(cands, key=lambda r: r["final_train_loss"])["optimizer"] if cands else None
    return summary


# ----------------------------------------------------------------------------- report
CSV_COLUMNS = ["task", "family", "optimizer", "lr", "weights", "seeds", "steps", "final_train_loss",
               "final_train_loss_std", "test_loss", "test_metric_name", "test_metric", "diverged_seeds",
               "speedup_vs_adam", "speedup_reached", "adam_steps_to_final", "steps_to_adam_final",
               "lr_at_grid_edge", "wall_time_s", "cpu_time_s"]


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if not math.isfinite(x):
            return "—"
        return f"{x:.{digits}g}"
    return str(x)


def format_table(results: EvalResults) -> str:
    """The per-(task, optimizer) Markdown table."""
    head = ["task", "optimizer", "lr", "final train loss", "test loss", "test metric", "diverged", "speedup vs Adam"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = results.summary.get("best_on", {})
    for r in results.rows:
        loss = _fmt(r["final_train_loss"])
        if math.isfinite(r["final_train_loss"]) and r["seeds"] > 1:
            loss += f" ± {_fmt(r['final_train_loss_std'], 2)}"
        if best.get(r["task"]) == r["optimizer"]:
            loss = f"**{loss}**"
        metric = f"{r['test_metric_name']} {_fmt(r['test_metric'])}" if r["test_metric_name"] else ""
        div = f"{r['diverged_seeds']}/{r['seeds']}" if r["diverged_seeds"] else "no"
        lr = _fmt(r["lr"], 2) if r["lr"] is not None else "learned"
        if r.get("lr_at_grid_edge"):
            lr += " (edge)"
        lines.append("| " + " | ".join([r["task"], r["optimizer"], lr, loss, _fmt(r["test_loss"]), metric, div,
                                        r.get("speedup_str", "")]) + " |")
    return "\n".join(lines)


def format_summary(results: EvalResults) -> str:
    s, cfg = results.summary, results.config
    out = []
    for key, w in s["wins"].items():
        a, b = key.split("_vs_")
        other = {"mlp": "the MLP learned-optimizer baseline", "adam_default": "Adam at its default lr 1e-3"}.get(
            b, f"tuned {b.upper()}")
        t = s.get("test_wins", {}).get(key)
        out.append(f"- {a.upper()} beats {other} on final train loss on "
                   f"**{w['wins']}/{w['of']}** tasks" + (f" ({w['ties']} ties: within {TIE_RTOL:.1%})" if w["ties"] else "")
                   + (f"; on test loss on **{t['wins']}/{t['of']}**" if t else ""))
    for o, med in s["median_speedup_vs_adam"].items():
        reached = s["speedup_reached"][o]
        out.append(f"- median speedup of {o.upper()} vs tuned Adam: **{med:.2f}x** (reached Adam's final loss "
                   f"on {reached['reached']}/{reached['of']} tasks; where not, the value is an upper bound)")
    div = ", ".join(f"{o}: {n}" for o, n in s["diverged_runs"].items())
    out.append(f"- diverged evaluation runs: {div} (of {len(cfg['seeds'])} seeds x {s['tasks']} tasks each)")
    if cfg.get("skipped_no_data"):
        out.append(f"- skipped (dataset not in the data directory): {', '.join(cfg['skipped_no_data'])}")
    return "\n".join(out)


def format_protocol(results: EvalResults) -> str:
    cfg = results.config
    grids = "\n".join(f"  - {o}: {', '.join(_fmt(x, 2) for x in g)}" for o, g in cfg["lr_grids"].items())
    weights = "\n".join(f"  - {o}: {w}" for o, w in cfg["weights"].items())
    return f"""- budget: {cfg['steps']} steps per run; evaluation seeds {cfg['seeds']} (model init and batch stream);
  tuning seeds {cfg['tune_seeds']}
- learned optimizers (lr multiplier 1.0, not tuned):
{weights or '  - none'}
- learning-rate grids (Adam/AdamW: default betas, AdamW weight decay {cfg['adamw_weight_decay']}; SGD momentum {cfg['sgd_momentum']}):
{grids or '  - none'}
- tuning rule: per task and optimizer, the grid value with the lowest mean final train loss on the tuning
  seeds; values where a tuning run diverged are excluded. "(edge)" marks a choice at the end of the grid.
- final train loss: mean of the last {int(cfg['smooth_frac'] * 100)}% of per-step minibatch losses, mean ± std over seeds
  (bold: best on the task; win counts treat a difference under {TIE_RTOL:.1%} as a tie). Test loss/metric: mean over {cfg['test_batches']} held-out test batches after training.
- diverged: a non-finite loss or the smoothed loss above {cfg['diverge_factor']:g}x the initial loss; such runs stop
  and lose every comparison.
- speedup vs Adam: steps tuned Adam needs to reach its own final smoothed loss / steps the optimizer needs to reach
  it (seed-averaged curves, trailing {int(cfg['smooth_frac'] * 100)}% window). "<x" = never reached within the
  budget; x is an upper bound.
- device {cfg['device']}, {cfg['workers']} worker(s) x {cfg['threads_per_worker']} thread(s), torch {cfg['torch']};
  wall time {cfg.get('wall_time_s', '?')} s, CPU time of all runs {cfg.get('cpu_time_s', '?')} s"""


def format_report(results: EvalResults, command: str | None = None) -> str:
    parts = ["# l2o evaluation", ""]
    if command:
        parts += ["Command:", "", f"    {command}", ""]
    untrained = [o for o, w in results.config["weights"].items() if w.startswith("UNTRAINED")]
    if untrained:
        parts += [f"> **Note:** {', '.join(o.upper() for o in untrained)} ran with an UNTRAINED metanetwork "
                  "(no pretrained weights installed); these numbers say nothing about the learned optimizer.", ""]
    parts += ["## Summary", "", format_summary(results), "", "## Results", "", format_table(results), "",
              "## Protocol", "", format_protocol(results), ""]
    return "\n".join(parts)


def write_report(results: EvalResults, out_dir, command: str | None = None) -> Path:
    """results.md, results.csv, results.json, curves.png, speedup.png and TensorBoard scalars."""
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(format_report(results, command))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in results.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})
    payload = results.to_json()
    payload["command"] = command
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    curves = results.curves()
    if curves:
        plots.plot_curves(curves, out / "curves.png",
                          title=f"Training loss, held-out evaluation ({results.config['steps']} steps)")
    sp = {r["task"]: {} for r in results.rows}
    reached = {r["task"]: {} for r in results.rows}
    for r in results.rows:
        if r["optimizer"] in LEARNED and math.isfinite(r["speedup_vs_adam"]):
            sp[r["task"]][r["optimizer"]] = r["speedup_vs_adam"]
            reached[r["task"]][r["optimizer"]] = bool(r["speedup_reached"])
    if any(sp.values()):
        plots.plot_speedup({t: v for t, v in sp.items() if v}, out / "speedup.png", reached)
    _write_tensorboard(results, curves, out / "tb")
    return out


def _write_tensorboard(results: EvalResults, curves, tb_dir: Path) -> None:
    # Start from an empty tb/: event files of an earlier evaluation into the same
    # --out would otherwise sit beside these and TensorBoard would overlay both.
    # Only this subdirectory is cleared; the rest of --out is overwritten file by file.
    if tb_dir.is_dir():
        shutil.rmtree(tb_dir)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # tensorboard is optional for the report; say so rather than fail
        print("tensorboard not installed: skipped TensorBoard scalars", file=sys.stderr)
        return
    rows = {(r["task"], r["optimizer"]): r for r in results.rows}
    tests: dict[tuple[str, str], dict[int, list[dict]]] = {}
    for run in results.runs:
        for step, m in zip(run.test_steps, run.test):
            if m:
                tests.setdefault((run.task, run.optimizer), {}).setdefault(step, []).append(m)
    for task, opts in curves.items():
        for opt, runs in opts.items():
            # One writer per (task, optimizer): TensorBoard overlays optimizers per task.
            with SummaryWriter(log_dir=str(tb_dir / task / opt)) as w:
                sm = np.mean(np.stack([smooth(r) for r in runs]), axis=0)
                stride = max(1, len(sm) // 500)
                for i in range(0, len(sm), stride):
                    if math.isfinite(sm[i]):
                        w.add_scalar(f"{task}/train_loss_smoothed", float(sm[i]), i + 1)
                for step, ms in sorted(tests.get((task, opt), {}).items()):
                    for k in ms[0]:
                        w.add_scalar(f"{task}/test_{k}", float(np.mean([m[k] for m in ms])), step)
                row = rows.get((task, opt))
                if row and math.isfinite(row["speedup_vs_adam"]):
                    w.add_scalar(f"{task}/speedup_vs_adam", row["speedup_vs_adam"], row["steps"])


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ----------------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _parse_grid(items: list[str] | None) -> dict[str, list[float]]:
    grids: dict[str, list[float]] = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        if not sep or name not in HAND_DESIGNED:
            raise SystemExit(f"--lr-grid expects NAME=v1,v2,... with NAME in {', '.join(HAND_DESIGNED)}, got {item!r}")
        grids[name] = _floats(values)
        if not grids[name]:
            raise SystemExit(f"--lr-grid {name}: empty grid")
    return grids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m l2o.evaluate",
        description="Evaluate the learned optimizers against per-task LR-tuned Adam, AdamW and SGD.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("tasks", nargs="*", help="task names (default: the --suite split)")
    p.add_argument("--suite", default="heldout", choices=["heldout", "valid", "train", "all"],
                   help="heldout = the test split (report only); valid = the split every choice is made on")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per run (the budget)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="evaluation seeds 0..N-1")
    p.add_argument("--tune-seeds", type=int, default=DEFAULT_TUNE_SEEDS,
                   help=f"LR-tuning seeds {TUNE_SEED_BASE}..{TUNE_SEED_BASE}+N-1 (disjoint from evaluation)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--gmn-weights", default=None, help="GMN weights file (default: shipped pretrained)")
    p.add_argument("--mlp-weights", default=None, help="MLP weights file (default: shipped pretrained)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="if pretrained weights are missing, evaluate an untrained metanetwork instead of stopping")
    p.add_argument("--lr-grid", action="append", metavar="NAME=v1,v2,...",
                   help="override a grid, e.g. --lr-grid adam=1e-3,3e-3 (repeatable). Defaults: "
                        + "; ".join(f"{o}: {','.join(f'{v:g}' for v in g)}" for o, g in DEFAULT_GRIDS.items()))
    p.add_argument("--out", default="out/eval", help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--test-every", type=int, default=0, help="also log test metrics every N steps (0: only at the end)")
    p.add_argument("--workers", type=int, default=None, help="parallel runs on CPU (default: one per core)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from tasks.data import UnknownDatasetError
    from tasks.registry import UnknownTaskError

    from .checkpoint import WeightsFileError

    args = build_parser().parse_args(argv)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    suite = args.tasks or args.suite
    command = "python -m l2o.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        results = evaluate(suite, optimizers, steps=args.steps, seeds=args.seeds, tune_seeds=args.tune_seeds,
                           lr_grids=_parse_grid(args.lr_grid), gmn_weights=args.gmn_weights,
                           mlp_weights=args.mlp_weights, allow_untrained=args.allow_untrained, device=args.device,
                           test_every=args.test_every, workers=args.workers, threads=args.threads, out_dir=None,
                           progress=not args.no_progress)
    # Only the errors meant for users (bad names, arguments, missing data or weights)
    # become one line; anything else is a bug and keeps its traceback.
    except (MissingWeightsError, FileNotFoundError, UnknownTaskError, UnknownDatasetError, EvaluationInputError,
            WeightsFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = write_report(results, args.out, command=command.strip())
    print(format_report(results, command.strip()))
    print(f"wrote {out}/results.md, results.csv, results.json, curves.png, speedup.png, tb/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

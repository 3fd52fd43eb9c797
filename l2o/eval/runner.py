"""Running training runs: one run of one optimizer on one task, and a list of
such runs (jobs) in this process or in a pool of worker processes.

Two optimizers given the same seed see the same initial weights and the same
stream of training batches, so their curves can be compared step by step.
"""
from __future__ import annotations

import copy
import math
import time
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .metrics import DIVERGE_FACTOR, final_loss, is_diverged, smooth_window
from .optimizers import LEARNED, EvaluationInputError, MakeOptimizer, optimizer_factory

TEST_BATCHES = 8


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


def run_training(task, make_optimizer: MakeOptimizer, steps: int,
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
    result = RunResult(task.name, name, lr, seed, steps, np.empty(0), False, steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    losses = _train(task, model, make_optimizer(model), result, device, test_every, test_batches)
    result.train_loss = losses.cpu().numpy().astype(float)
    if not result.diverged:
        result.diverged = is_diverged(result.train_loss, window=smooth_window(steps))
    if result.diverged:
        result.train_loss[result.stopped_at:] = np.nan
    if not result.diverged or all(math.isfinite(p.detach().float().sum().item()) for p in model.parameters()):
        result.final_test = evaluate_test(task, model, seed, test_batches, device)
    result.test_steps.append(result.stopped_at)
    result.test.append(result.final_test)
    result.wall_time = time.perf_counter() - start
    result.cpu_time = time.process_time() - cpu_start
    return result


def _train(task, model: nn.Module, opt: torch.optim.Optimizer, result: RunResult, device,
           test_every: int, test_batches: int) -> torch.Tensor:
    """The training loop of :func:`run_training`: per-step losses (NaN after an
    early stop); sets ``result.diverged`` / ``stopped_at`` and the intermediate tests."""
    steps, seed = result.steps, result.seed
    stream = task.batches("train", seed=seed, device=device)
    losses = torch.full((steps,), float("nan"), device=device)
    window = smooth_window(steps)
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
    return losses


# ----------------------------------------------------------------------------- jobs
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


def task_object(task):
    """A Task from a registered name (workers receive names), or ``task`` itself."""
    if isinstance(task, str):
        import tasks as task_suite
        return task_suite.get_task(task)
    return task


def run_job(job: Job, steps: int, device: str, test_every: int) -> RunResult:
    """One job (picklable: what a worker process runs)."""
    task = task_object(job.task)
    make = optimizer_factory(job.optimizer, task, job.lr, job.weights)
    # Tuning runs only need the train curve: skip intermediate test passes.
    return run_training(task, make, steps, seed=job.seed, device=device,
                        test_every=test_every if job.purpose == "eval" else 0, name=job.optimizer, lr=job.lr)


def worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: list[Job], steps: int, device: str, test_every: int, bar,
             pool: Executor | None) -> list[RunResult]:
    """Every job's result (in completion order), ticking the progress ``bar``;
    in this process when ``pool`` is None."""
    from tasks.data import DatasetFormatError, DatasetNotFoundError

    results: list[RunResult] = []
    if pool is None:
        for job in jobs:
            bar.set_postfix_str(f"{job.task_name}/{job.optimizer}", refresh=False)
            results.append(run_job(job, steps, device, test_every))
            bar.update()
        return results
    futures = {pool.submit(run_job, job, steps, device, test_every): job for job in jobs}
    for fut in as_completed(futures):
        job = futures[fut]
        try:
            results.append(fut.result())
        except (DatasetFormatError, DatasetNotFoundError):
            # A bad data file is the user's to fix and its message names the
            # file: pass it on as it is, like an in-process run would.
            raise
        except Exception as err:
            raise RuntimeError(f"run {job.task_name}/{job.optimizer} lr={job.lr} seed={job.seed} failed: "
                               f"{type(err).__name__}: {err}") from err
        bar.set_postfix_str(f"{job.task_name}/{job.optimizer}", refresh=False)
        bar.update()
    return results


def longest_first(jobs: list[Job]) -> list[Job]:
    """Jobs by decreasing estimated cost, so the last worker is not left with a big one."""
    # Rough cost model: step time grows with parameter count, and a learned
    # optimizer step costs a few hand-designed ones (measured on CPU).
    def cost(job: Job) -> float:
        task = task_object(job.task)
        n = task.num_params() if hasattr(task, "num_params") else 1
        return n * (3.0 if job.optimizer in LEARNED else 1.0)
    return sorted(jobs, key=cost, reverse=True)

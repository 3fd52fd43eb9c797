"""Meta-train a learned optimizer (the GMN, or the per-parameter MLP baseline).

    python meta_train.py --preset tiny --out runs/tiny              # seconds on a CPU
    python meta_train.py --lopt mlp --preset tiny --out runs/tiny_mlp
    python meta_train.py --config configs/small.yaml --out runs/gmn  # a real run
    python meta_train.py --out runs/gmn --resume                    # continue it exactly
    torchrun --nproc_per_node=4 meta_train.py --config configs/small.yaml --device cuda --out runs/gmn4

Reads top to bottom: the command line, the configuration
(:class:`l2o.meta.config.MetaConfig`), the setup, the outer loop, the end.
Each outer step unrolls every inner run of the meta-batch by ``unroll``
learned-optimizer steps, estimates the meta-gradient (an estimator object:
truncated backprop or evolution strategies, :mod:`l2o.meta.estimator`),
averages it over processes, clips it and takes an Adam step
(:func:`l2o.meta.outer.outer_update`). Inner runs carry their state across
outer steps and are replaced by a freshly drawn task when they finish
(``inner_steps``) or diverge. The pieces live in ``l2o/meta/``.

Meta-objective (``meta_objective: norm``, the default): the mean over the
unroll of the inner training loss divided by the run's loss at
initialisation, each loss on a batch that did not produce the parameters it
is evaluated at. Dividing by the initial loss makes cross-entropy and MSE
tasks weigh alike; ``log`` does that too but its gradient (dL / L) grows
without bound on nearly solved tasks.

Estimators: ``tbptt`` (default; first-order unless ``--second-order``), ``es``
(antithetic, truncated) and ``pes`` (persistent ES, unbiased across
truncations). On the tiny preset (GMN, 24 outer steps, same settings) TBPTT
lowered the meta-loss 0.94 -> 0.82 and beat Adam on the held-out quick eval
in 42 s, while ES with 2 pairs took 7x longer and barely moved (0.94 -> 0.935):
with ~10k metanetwork weights a few antithetic pairs give a very noisy
gradient. The shipped weights therefore use TBPTT with short unrolls
(K = 10, inner runs of a few hundred steps); ES/PES are for long unrolls
where backprop through the unroll explodes.

Outputs in ``--out``: ``lopt.safetensors`` (load with
``l2o.GMNOptimizer(model, weights=DIR/"lopt.safetensors")``),
the last checkpoint ``ckpt-<step>/`` named by the pointer file ``latest``
(``lopt.safetensors`` + ``train_state.{json,safetensors}``, for exact resume;
switched atomically, see :mod:`l2o.meta.state`), ``summary.json`` and
TensorBoard logs in ``tb/``.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from l2o.checkpoint import atomic_write_json, make_lopt  # noqa: F401 (make_lopt: public here too)
from l2o.meta import config as C
from l2o.meta import dist as D
from l2o.meta import guard as G
from l2o.meta import state as S
from l2o.meta.config import MetaConfig
from l2o.meta.estimator import GradientEstimator
from l2o.meta.inner import InnerRun, advance, start_run
from l2o.meta.metanet import SCALAR_STEP_SIZES, freeze, new_lopt, outer_optimizer, warm_start  # noqa: F401
from l2o.meta.outer import OuterStep, make_estimator, outer_update
from l2o.meta.quick_eval import check_eval_task, quick_eval
from l2o.meta.schedule import outer_lr
from l2o.meta.summary import summarize, summarize_checkpoint  # noqa: F401 (public here too)
from l2o.meta.tasks_pool import TaskPool, check_local_data, draw_length, suite_specs

# ---------------------------------------------------------------------- command line
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --preset < --config < flags. Every config key (see "
               "l2o/meta/config.py) can be set in the config file; the common ones have flags.")
    # Flags default to None so that only the ones actually given override the config.
    p.add_argument("--config", help="YAML or JSON file of config keys")
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="named preset (tiny: seconds on CPU)")
    p.add_argument("--out", help=f"output directory (default {MetaConfig.out})")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the checkpoint in --out (config comes from it; flags "
                        f"may change only {', '.join(C.RESUMABLE_OVERRIDES)})")
    p.add_argument("--lopt", choices=C.CHOICES["lopt"], help="metanetwork: gmn (graph) or mlp (per-parameter)")
    p.add_argument("--init-from", help="warm start from another run's lopt.safetensors (matching weights copied)")
    p.add_argument("--suite", help="train | heldout | families | mix | comma-separated task names")
    p.add_argument("--outer-steps", type=int, help="outer (meta) optimisation steps")
    p.add_argument("--unroll", type=int, help="inner steps per truncation (K)")
    p.add_argument("--inner-steps", type=int, help="length of one inner run before a new task is drawn (T)")
    p.add_argument("--inner-steps-max", type=int,
                   help="draw each run's length log-uniformly in [inner-steps, this] (mixed horizons)")
    p.add_argument("--meta-data", choices=C.CHOICES["meta_data"],
                   help="meta-loss on fresh training batches (train) or the inner task's held-out data (valid)")
    p.add_argument("--meta-batch", type=int, help="inner runs per outer step (split across processes)")
    p.add_argument("--estimator", choices=C.CHOICES["estimator"], help="meta-gradient estimator")
    p.add_argument("--es-pairs", type=int, help="antithetic pairs per run (es)")
    p.add_argument("--es-sigma", type=float, help="perturbation scale (es)")
    p.add_argument("--meta-objective", choices=C.CHOICES["meta_objective"],
                   help="norm: loss/initial loss (default) | log | raw")
    p.add_argument("--batch-runs", action="store_const", const=True,
                   help="tbptt: unroll the meta-batch's runs together (one metanetwork pass per step over the "
                        "union of their graphs; the same estimate, faster)")
    p.add_argument("--second-order", action="store_const", const=True,
                   help="backprop through the inner gradient too (create_graph=True)")
    p.add_argument("--lr", type=float, help="outer learning rate (peak)")
    p.add_argument("--weight-decay", type=float, help="outer AdamW decoupled weight decay")
    p.add_argument("--warmup", type=int, help="outer warmup steps")
    p.add_argument("--clip", type=float, help="meta-gradient norm clip (0: off)")
    p.add_argument("--nominal-lr-mult", type=float,
                   help="outer lr multiplier of the learned nominal (Adam-term) step size")
    p.add_argument("--device", help="cpu | cuda | cuda:N (under torchrun: cuda = this rank's GPU)")
    p.add_argument("--seed", type=int, help="seed of everything (tasks, data, noise, init)")
    p.add_argument("--checkpoint-every", type=int, help="outer steps between checkpoints (0: only the one at the end)")
    p.add_argument("--eval-every", type=int, help="outer steps between quick evaluations on --eval-task (0: off)")
    p.add_argument("--eval-steps", type=int, help="inner steps of a quick evaluation")
    p.add_argument("--eval-task",
                   help="validation task of the quick evaluation (test tasks are refused: they must never choose)")
    p.add_argument("--stop-after", type=int,
                   help="checkpoint and stop after this many steps in this process (this invocation only: "
                        "a later --resume runs on to --outer-steps; 0: off)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (0: default)")
    p.add_argument("--progress", dest="progress", action="store_const", const=True,
                   help="progress bar (the default; overrides a config file's progress: false)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    """Meta-train as the command line says; the summary (rank 0; None on other ranks)."""
    cfg, ckpt = configure(parse_args(argv))
    D.check_device(cfg.device)
    info = D.setup(cfg.device)
    if ckpt:
        if info.is_main:
            G.resumed(cfg, ckpt["counters"]["outer_step"])
        if ckpt["counters"]["outer_step"] >= cfg.outer_steps:     # nothing to do (said)
            D.cleanup(info)
            return (summarize(cfg, ckpt["counters"], ckpt["history"], Path(cfg.out) / S.LOPT_FILE,
                              info.world_size, None) if info.is_main else None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    training = setup(cfg, ckpt, info)
    try:
        train(training)
    except KeyboardInterrupt:
        # Close the logs; rank 0's message says where the run stands and how to continue it.
        if training.writer is not None:
            training.writer.close()
        raise G.Interrupted(G.interrupted(training.out, training.counters["outer_step"], training.last_checkpoint)
                            if info.is_main else "") from None
    return finish(training)


def configure(args: argparse.Namespace) -> tuple[MetaConfig, dict | None]:
    """(the config, the checkpoint to resume or None): defaults < preset < file < flags
    for a new run; the checkpoint's config (with the resumable flags) for --resume."""
    flags = {k: v for k, v in vars(args).items() if v is not None and k in C.KEYS}
    out = Path(args.out or MetaConfig.out)
    flags["out"] = str(out)
    G.check_out(out)
    if args.resume:
        if args.config or args.preset:
            raise C.ConfigError("--resume takes its config from the checkpoint; drop --config/--preset")
        ckpt = S.load(out)
        return C.resume(ckpt["config"], flags), ckpt
    if S.checkpoint_dir(out) is not None:
        raise C.ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or pick another --out")
    cfg = C.resolve(args.preset, C.load_file(args.config) if args.config else None, flags)
    G.check_fresh_out(out, (args.config, cfg.init_from))
    return cfg, None


# ---------------------------------------------------------------------- setup
@dataclass
class Training:
    """What the outer loop works on: this process's share of the meta-training."""
    cfg: MetaConfig
    info: D.DistInfo
    out: Path
    lopt: torch.nn.Module
    opt: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    pool: TaskPool
    specs: list[str]
    estimator: GradientEstimator
    runs: list[InnerRun]            # this rank's slots of the meta-batch
    counters: dict[str, Any]
    history: dict[str, list]
    writer: Any = None              # TensorBoard (rank 0)
    resumed: bool = False
    last_checkpoint: int | None = None  # outer step of the newest checkpoint in ``out``


def setup(cfg: MetaConfig, ckpt: dict | None, info: D.DistInfo) -> Training:
    # Checks of the inputs first: each would otherwise surface only hours into the run.
    specs = suite_specs(cfg.suite)
    if ckpt:
        G.check_pool(cfg, ckpt.get("tasks"), specs)
    elif info.is_main:
        G.warn_skipped(cfg)
    if cfg.eval_every:
        check_eval_task(cfg.eval_task)
    check_local_data(specs + ([f"task:{cfg.eval_task}"] if cfg.eval_every else []))
    lopt = build_lopt(cfg, ckpt, info)
    opt = outer_optimizer(lopt, cfg, ckpt)
    pool = TaskPool(cfg.lopt, info.device)
    if ckpt:
        runs = [InnerRun.restore(ckpt["run_scalars"][s], ckpt["run_tensors"][s], info.device)
                for s in D.my_slots(info, cfg.meta_batch)]
        D.restore_rng(info, ckpt["rng"], ckpt["world_size"])
        counters, history = ckpt["counters"], ckpt["history"]
    else:
        runs = first_runs(cfg, info, pool, specs, lopt)
        counters = {"outer_step": 0, "skipped": 0, "resets": 0, "finished_runs": 0, "inner_steps": 0,
                    "nonfinite_pairs": 0, "wall_time_s": 0.0}
        history = {"meta_loss": [], "grad_norm": [], "eval": []}
    return Training(cfg, info, Path(cfg.out), lopt, opt, [p for p in lopt.parameters() if p.requires_grad],
                    pool, specs, make_estimator(cfg, pool, info.device), runs, counters, history,
                    resumed=ckpt is not None, last_checkpoint=counters["outer_step"] if ckpt else None)


def build_lopt(cfg: MetaConfig, ckpt: dict | None, info: D.DistInfo) -> torch.nn.Module:
    """The metanetwork: the checkpoint's, or a new one (warm-started if ``init_from``)."""
    lopt = ckpt["lopt"] if ckpt else new_lopt(cfg)
    if not ckpt and cfg.init_from:
        warm_start(lopt, cfg.init_from)
    lopt = lopt.to(info.device).train()
    freeze(lopt, cfg.freeze)
    D.broadcast_module(info, lopt)  # identical replicas (same seed already gives them; be certain)
    return lopt


def run_length(cfg: MetaConfig, slot: int, index: int) -> int:
    """Inner steps of the ``index``-th run of meta-batch slot ``slot``."""
    return draw_length(cfg.inner_steps, cfg.inner_steps_max, cfg.seed, slot, index)


def first_runs(cfg: MetaConfig, info: D.DistInfo, pool: TaskPool, specs: list[str], lopt) -> list[InnerRun]:
    """Fresh runs of this rank's slots with staggered first lengths (slot i ends after
    (i+1)/B of a run), so afterwards the meta-batch holds tasks at every stage of
    training, not B runs all at step 0."""
    b = cfg.meta_batch
    return [start_run(pool, specs, lopt, cfg.seed, s, 0, max(1, round(run_length(cfg, s, 0) * (s + 1) / b)))
            for s in D.my_slots(info, b)]


# ---------------------------------------------------------------------- the outer loop
def train(t: Training) -> None:
    """Outer steps until ``outer_steps`` (or ``stop_after`` steps in this process)."""
    from tqdm import tqdm
    cfg = t.cfg
    if t.info.is_main:
        t.out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events logged after the checkpoint by a run that was then killed. The
        # events of step N were logged before checkpoint N was written, so they stay: purge from N + 1.
        t.writer = SummaryWriter(str(t.out / "tb"),
                                 purge_step=t.counters["outer_step"] + 1 if t.resumed else None)
    bar = tqdm(total=cfg.outer_steps, initial=t.counters["outer_step"], dynamic_ncols=True,
               disable=not (t.info.is_main and cfg.progress), desc=f"meta-train {cfg.lopt}")
    try:
        loop(t, bar)
    finally:
        bar.close()
    if t.info.is_main:
        G.stopped(cfg, t.counters["outer_step"])


def loop(t: Training, bar) -> None:
    cfg = t.cfg
    session_start, wall_at_start, steps_here = time.time(), t.counters["wall_time_s"], 0
    while t.counters["outer_step"] < cfg.outer_steps:
        step, t0 = t.counters["outer_step"], time.time()
        lr = outer_lr(step, cfg.lr, cfg.warmup, cfg.outer_steps, cfg.min_lr_frac)
        for group in t.opt.param_groups:
            group["lr"] = lr * group["lr_mult"]
        result = outer_update(t.estimator, t.lopt, t.opt, t.trainable, t.runs, t.info, cfg.meta_batch,
                              cfg.clip, step)
        t.runs = next_runs(t, result.results)
        record(t, result, wall_at_start + (time.time() - session_start))
        steps_here += 1
        if t.info.is_main:
            log(t, bar, result, lr, time.time() - t0)
        stopping = bool(cfg.stop_after) and steps_here >= cfg.stop_after
        if stopping or t.counters["outer_step"] >= cfg.outer_steps or every(cfg.checkpoint_every, step + 1):
            checkpoint(t)   # every rank takes part (it gathers their inner runs)
        if stopping:
            break
    if steps_here == 0 and not t.resumed:
        checkpoint(t)   # outer_steps 0: the initialisation is the result (an untrained baseline)


def every(period: int, step: int) -> bool:
    return bool(period) and step % period == 0


def next_runs(t: Training, results) -> list[InnerRun]:
    """Each run carried forward; a finished or diverged one replaced by a freshly drawn task."""
    runs = []
    for run, res in zip(t.runs, results):
        if res.diverged or res.finished:
            index = run.index + 1
            run = start_run(t.pool, t.specs, t.lopt, t.cfg.seed, run.slot, index, run_length(t.cfg, run.slot, index))
        else:
            run = advance(run, res)
        runs.append(run)
    return runs


def record(t: Training, result: OuterStep, wall_time: float) -> None:
    """Counters (totals over all ranks) and the meta-loss history after one outer step."""
    c = t.counters
    c["skipped"] += int(result.skipped)   # poisoned estimate: weights and Adam moments untouched
    c["resets"] += result.diverged
    c["finished_runs"] += result.finished
    c["nonfinite_pairs"] = c.get("nonfinite_pairs", 0) + result.dropped_pairs   # ES/PES
    c["outer_step"] += 1
    c["inner_steps"] += result.inner_steps
    c["wall_time_s"] = wall_time
    t.history["meta_loss"].append(result.meta_loss if math.isfinite(result.meta_loss) else None)
    t.history["grad_norm"].append(result.grad_norm if math.isfinite(result.grad_norm) else None)


def log(t: Training, bar, result: OuterStep, lr: float, dt: float) -> None:
    """Progress bar, TensorBoard scalars and the quick evaluation (rank 0)."""
    cfg, w, c, step = t.cfg, t.writer, t.counters, t.counters["outer_step"]
    bar.update(1)
    bar.set_postfix(meta_loss=f"{result.meta_loss:.4f}", inner_per_s=f"{result.inner_steps / dt:.0f}",
                    skipped=c["skipped"])
    if every(cfg.log_every, step):
        if math.isfinite(result.meta_loss):
            w.add_scalar("meta/loss", result.meta_loss, step)
        if math.isfinite(result.grad_norm):
            w.add_scalar("meta/grad_norm", result.grad_norm, step)
        w.add_scalar("meta/skipped_steps", c["skipped"], step)
        w.add_scalar("meta/lr", lr, step)
        w.add_scalar("inner/resets", c["resets"], step)
        if cfg.estimator in ("es", "pes"):
            w.add_scalar("meta/nonfinite_pairs", c["nonfinite_pairs"], step)
        w.add_scalar("perf/inner_steps_per_s", result.inner_steps / dt, step)
        w.add_scalar("perf/outer_steps_per_s", 1.0 / dt, step)
    if every(cfg.eval_every, step):
        evaluation = quick_eval(t.lopt, t.pool, cfg.eval_task, cfg.eval_steps)
        t.history["eval"].append({"outer_step": step, **evaluation})
        for k, v in evaluation.items():
            w.add_scalar(f"eval/{cfg.eval_task}/{k}", v, step)
        bar.write(f"step {step}: {cfg.eval_task} after {cfg.eval_steps} steps: "
                  f"lopt {evaluation['lopt_final']:.4f} vs adam {evaluation['adam_final']:.4f}")


def checkpoint(t: Training) -> None:
    """Rank 0 writes every rank's inner runs and RNG state (:mod:`l2o.meta.state`)."""
    gathered = D.gather(t.info, ([InnerRun.restore(r.scalars(), r.tensors(), "cpu") for r in t.runs],
                                 torch.get_rng_state()))
    if t.info.is_main:
        all_runs = [r for rank_runs, _ in gathered for r in rank_runs]
        S.save(t.out, t.lopt, t.opt, C.stored(t.cfg), t.counters, all_runs, [rng for _, rng in gathered],
               t.history, tasks=t.specs)
    D.barrier(t.info)
    t.last_checkpoint = t.counters["outer_step"]


# ---------------------------------------------------------------------- the end
def finish(t: Training) -> dict | None:
    """Check the replicas agree bitwise (every rank applied the same all-reduced
    updates), write summary.json (rank 0) and leave the process group."""
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in t.lopt.parameters())).hexdigest()
    digests = D.gather(t.info, digest)
    summary = None
    if t.info.is_main:
        summary = summarize(t.cfg, t.counters, t.history, t.out / S.LOPT_FILE, t.info.world_size,
                            len(set(digests)) == 1)
        atomic_write_json(t.out / "summary.json", summary)
        t.writer.close()
        G.finished(t.cfg, t.counters["outer_step"])
    D.cleanup(t.info)
    return summary


def cli(argv=None) -> int:
    """Console entry point (``l2o-meta-train``): exit status 0 on success, a one-line error for bad input."""
    # Only the errors meant for users become one line; anything else is a bug and keeps its traceback.
    try:
        main(argv)
    except G.user_errors() as err:
        sys.exit(f"meta_train.py: error: {err}")
    except KeyboardInterrupt as err:
        # 130: the shell's status of a process ended by SIGINT; no traceback, where to resume instead.
        message = str(err) if isinstance(err, G.Interrupted) else "interrupted before training started"
        if message:
            print(f"meta_train.py: {message}", file=sys.stderr)
        return 130
    if D.launched_with_ranks():
        D.exit_finished_rank()
    return 0


if __name__ == "__main__":
    sys.exit(cli())

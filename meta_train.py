"""Meta-train a learned optimizer (the GMN, or the per-parameter MLP baseline).

    python meta_train.py --preset tiny --out runs/tiny              # ~1 minute on a CPU
    python meta_train.py --lopt mlp --preset tiny --out runs/tiny_mlp
    python meta_train.py --config configs/small.yaml --out runs/gmn  # a real run
    python meta_train.py --out runs/gmn --resume                    # continue it exactly
    torchrun --nproc_per_node=4 meta_train.py --config configs/small.yaml --device cuda --out runs/gmn4

Reads top to bottom: configuration, setup, then the outer loop. Each outer
step unrolls every inner run of the meta-batch by ``unroll`` learned-optimizer
steps, estimates the meta-gradient (truncated backprop or evolution
strategies), averages it over processes, clips it and takes an Adam step. Inner
runs carry their state across outer steps and are replaced by a freshly drawn
task when they finish (``inner_steps``) or diverge. The pieces live in
``l2o/meta/``.

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
from pathlib import Path

import torch

from l2o.checkpoint import make_lopt
from l2o.meta import config as C
from l2o.meta import dist as D
from l2o.meta import es, pes, tbptt
from l2o.meta import state as S
from l2o.meta.inner import advance, start_run, InnerRun
from l2o.meta.quick_eval import quick_eval
from l2o.meta.schedule import outer_lr
from l2o.meta.tasks_pool import TaskPool, draw_length, suite_specs

ESTIMATORS = {"tbptt": tbptt.estimate, "es": es.estimate, "pes": pes.estimate}


def warm_start(lopt, path: str) -> None:
    """Start from another run's metanetwork weights (``init_from``): every
    weight of the same name and shape is copied; the rest (e.g. a parameter
    the other config lacked) keeps its initialisation. Says what it did."""
    from l2o.checkpoint import load_lopt

    source = load_lopt(path).state_dict()
    own = lopt.state_dict()
    copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    lopt.load_state_dict(copied, strict=False)
    fresh = sorted(set(own) - set(copied))
    print(f"meta_train.py: warm start from {path}: {len(copied)} weights copied"
          + (f", kept at initialisation: {', '.join(fresh)}" if fresh else ""), file=sys.stderr)


def freeze(lopt, names: list[str]) -> None:
    """Keep the named metanetwork parameters (``freeze``: names or name prefixes) at
    their current values: they get no meta-gradient and no outer-optimizer slot."""
    own = dict(lopt.named_parameters())
    for name in names:
        hits = [n for n in own if n == name or n.startswith(name + ".")]
        if not hits:
            raise C.ConfigError(f"freeze: {name!r} names no parameter of the {type(lopt).__name__}; "
                                f"its parameters: {sorted(own)}")
        for n in hits:
            own[n].requires_grad_(False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --preset < --config < flags. Every config key (see "
               "l2o/meta/config.py) can be set in the config file; the common ones have flags.")
    # Flags default to None so that only the ones actually given override the config.
    p.add_argument("--config", help="YAML or JSON file of config keys")
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="named preset (tiny: ~1 minute on CPU)")
    p.add_argument("--out", help=f"output directory (default {C.DEFAULTS['out']})")
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
    p.add_argument("--checkpoint-every", type=int, help="outer steps between checkpoints")
    p.add_argument("--eval-every", type=int, help="outer steps between quick held-out evaluations (0: off)")
    p.add_argument("--eval-steps", type=int, help="inner steps of a quick evaluation")
    p.add_argument("--eval-task", help="held-out task of the quick evaluation")
    p.add_argument("--stop-after", type=int, help="checkpoint and stop after this many steps in this process")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (0: default)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    # ------------------------------------------------------------------ config
    args = parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None and k in C.DEFAULTS}
    out = Path(args.out or C.DEFAULTS["out"])
    flags["out"] = str(out)
    ckpt = None
    if args.resume:
        if args.config or args.preset:
            raise C.ConfigError("--resume takes its config from the checkpoint; drop --config/--preset")
        ckpt = S.load(out)
        cfg = dict(ckpt["config"])
        changed = sorted(k for k, v in flags.items() if cfg.get(k) != v and k not in C.RESUMABLE_OVERRIDES)
        if changed:
            raise C.ConfigError(f"cannot change {changed} when resuming (would not continue the same run); "
                                f"resumable overrides: {C.RESUMABLE_OVERRIDES}")
        cfg = C.validate({**cfg, **flags})
    else:
        if S.checkpoint_dir(out) is not None:
            raise C.ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or pick another --out")
        cfg = C.resolve(args.preset, C.load_file(args.config) if args.config else None, flags)

    # ------------------------------------------------------------------ setup
    info = D.setup(cfg["device"])
    device = info.device
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    lopt = ckpt["lopt"] if ckpt else make_lopt(cfg["lopt"], **cfg["lopt_config"])
    if not ckpt and cfg["init_from"]:
        warm_start(lopt, cfg["init_from"])
    lopt = lopt.to(device).train()
    freeze(lopt, cfg["freeze"])
    D.broadcast_module(info, lopt)  # identical replicas (same seed already gives them; be certain)
    trainable = [p for p in lopt.parameters() if p.requires_grad]
    named = [(n, p) for n, p in lopt.named_parameters() if p.requires_grad]
    # The scalar step-size parameters (nominal weight, controller rate) get a faster outer lr:
    # one scalar otherwise moves ~lr per step, far slower than what it controls.
    scalars = ("log_nominal", "log_adapt_rate")
    groups = [{"params": [p for n, p in named if n not in scalars], "lr_mult": 1.0}]
    nominal = [p for n, p in named if n in scalars]
    if cfg.get("nominal_lr_mult", 1.0) != 1.0 and nominal:
        groups.append({"params": nominal, "lr_mult": cfg["nominal_lr_mult"]})
    else:
        groups[0]["params"] = trainable
    opt_cls = torch.optim.AdamW if cfg["weight_decay"] > 0 else torch.optim.Adam
    opt = opt_cls(groups, lr=cfg["lr"], **({"weight_decay": cfg["weight_decay"]} if cfg["weight_decay"] > 0 else {}))
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
    pool = TaskPool(cfg["lopt"], device)
    specs = suite_specs(cfg["suite"])
    estimate = ESTIMATORS[cfg["estimator"]]

    # Inner runs: this rank's slots of the meta-batch. Fresh runs get staggered first
    # lengths (slot i ends after (i+1)/B of a run), so afterwards the meta-batch holds
    # tasks at every stage of training, not B runs all at step 0.
    slots = D.my_slots(info, cfg["meta_batch"])

    def run_length(slot: int, index: int) -> int:
        return draw_length(cfg["inner_steps"], cfg["inner_steps_max"], cfg["seed"], slot, index)

    if ckpt:
        runs = [InnerRun.restore(ckpt["run_scalars"][s], ckpt["run_tensors"][s], device) for s in slots]
        if info.rank in ckpt["rng"]:
            torch.set_rng_state(ckpt["rng"][info.rank])
        counters, history = ckpt["counters"], ckpt["history"]
    else:
        B = cfg["meta_batch"]
        runs = [start_run(pool, specs, lopt, cfg["seed"], s, 0, max(1, round(run_length(s, 0) * (s + 1) / B)))
                for s in slots]
        counters = {"outer_step": 0, "skipped": 0, "resets": 0, "finished_runs": 0, "inner_steps": 0,
                    "nonfinite_pairs": 0, "wall_time_s": 0.0}
        history = {"meta_loss": [], "grad_norm": [], "eval": []}

    writer = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events logged after the checkpoint by a run that was then killed.
        writer = SummaryWriter(str(out / "tb"), purge_step=counters["outer_step"] if ckpt else None)

    def checkpoint():
        gathered = D.gather(info, ([InnerRun.restore(r.scalars(), r.tensors(), "cpu") for r in runs],
                                   torch.get_rng_state()))
        if info.is_main:
            all_runs = [r for rank_runs, _ in gathered for r in rank_runs]
            S.save(out, lopt, opt, cfg, counters, all_runs, [rng for _, rng in gathered], history)
        D.barrier(info)

    # ------------------------------------------------------------------ loop
    from tqdm import tqdm

    bar = tqdm(total=cfg["outer_steps"], initial=counters["outer_step"], dynamic_ncols=True,
               disable=not (info.is_main and cfg["progress"]), desc=f"meta-train {cfg['lopt']}")
    steps_this_process = 0
    t_session = time.time()
    wall_at_start = counters["wall_time_s"]
    while counters["outer_step"] < cfg["outer_steps"]:
        step = counters["outer_step"]
        t0 = time.time()
        lr = outer_lr(step, cfg["lr"], cfg["warmup"], cfg["outer_steps"], cfg["min_lr_frac"])
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_mult"]

        # Meta-gradient of this rank's runs (each already divided by the global meta-batch),
        # then one all-reduce of gradients + scalars so every rank takes the same decision.
        opt.zero_grad(set_to_none=True)
        total, results, nonfinite = estimate(lopt, runs, pool, cfg, device, cfg["meta_batch"], step)
        local = [total, float(nonfinite), sum(r.steps for r in results),
                 sum(r.diverged for r in results), sum(r.finished and not r.diverged for r in results),
                 sum(r.nonfinite_pairs for r in results)]
        total, nonfinite_count, inner_done, n_diverged, n_finished, n_dropped = D.all_reduce_grads(
            info, trainable, local)
        meta_loss = total / cfg["meta_batch"]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg["clip"] if cfg["clip"] > 0 else float("inf")))
        if nonfinite_count > 0 or not math.isfinite(meta_loss) or not math.isfinite(grad_norm):
            counters["skipped"] += 1  # poisoned estimate: no update, weights and Adam moments untouched
        else:
            opt.step()

        # Carry each run forward; replace finished or diverged runs by a freshly drawn task.
        new_runs = []
        for run, res in zip(runs, results):
            if res.diverged or res.finished:
                run = start_run(pool, specs, lopt, cfg["seed"], run.slot, run.index + 1,
                                run_length(run.slot, run.index + 1))
            else:
                run = advance(run, res)
            new_runs.append(run)
        runs = new_runs
        counters["resets"] += int(n_diverged)          # totals over all ranks
        counters["finished_runs"] += int(n_finished)
        counters["nonfinite_pairs"] = counters.get("nonfinite_pairs", 0) + int(n_dropped)   # ES/PES

        counters["outer_step"] = step + 1
        counters["inner_steps"] += int(inner_done)
        counters["wall_time_s"] = wall_at_start + (time.time() - t_session)
        steps_this_process += 1
        dt = time.time() - t0
        history["meta_loss"].append(meta_loss if math.isfinite(meta_loss) else None)
        history["grad_norm"].append(grad_norm if math.isfinite(grad_norm) else None)

        # ---- logging, evaluation, checkpoints (rank 0 writes)
        if info.is_main:
            bar.update(1)
            bar.set_postfix(meta_loss=f"{meta_loss:.4f}", inner_per_s=f"{inner_done / dt:.0f}",
                            skipped=counters["skipped"])
            if (step + 1) % cfg["log_every"] == 0:
                if math.isfinite(meta_loss):
                    writer.add_scalar("meta/loss", meta_loss, step + 1)
                if math.isfinite(grad_norm):
                    writer.add_scalar("meta/grad_norm", grad_norm, step + 1)
                writer.add_scalar("meta/skipped_steps", counters["skipped"], step + 1)
                writer.add_scalar("meta/lr", lr, step + 1)
                writer.add_scalar("inner/resets", counters["resets"], step + 1)
                if cfg["estimator"] in ("es", "pes"):
                    writer.add_scalar("meta/nonfinite_pairs", counters["nonfinite_pairs"], step + 1)
                writer.add_scalar("perf/inner_steps_per_s", inner_done / dt, step + 1)
                writer.add_scalar("perf/outer_steps_per_s", 1.0 / dt, step + 1)
            if cfg["eval_every"] and (step + 1) % cfg["eval_every"] == 0:
                result = quick_eval(lopt, pool, cfg["eval_task"], cfg["eval_steps"])
                history["eval"].append({"outer_step": step + 1, **result})
                for k, v in result.items():
                    writer.add_scalar(f"eval/{cfg['eval_task']}/{k}", v, step + 1)
                bar.write(f"step {step + 1}: {cfg['eval_task']} after {cfg['eval_steps']} steps: "
                          f"lopt {result['lopt_final']:.4f} vs adam {result['adam_final']:.4f}")
        # every rank takes part in the checkpoint (it gathers their inner runs)
        stopping = cfg["stop_after"] and steps_this_process >= cfg["stop_after"]
        done = counters["outer_step"] >= cfg["outer_steps"]
        if done or stopping or (cfg["checkpoint_every"] and (step + 1) % cfg["checkpoint_every"] == 0):
            checkpoint()
        if stopping:
            break
    bar.close()

    # Every rank applied the same all-reduced updates: check the replicas agree bitwise.
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in lopt.parameters())).hexdigest()
    digests = D.gather(info, digest)
    summary = None
    if info.is_main:
        summary = summarize(cfg, counters, history, out / S.LOPT_FILE, info.world_size, len(set(digests)) == 1)
        from l2o.checkpoint import atomic_write_json

        atomic_write_json(out / "summary.json", summary)
        writer.close()
    D.cleanup(info)
    return summary


def summarize(cfg: dict, counters: dict, history: dict, weights, world_size: int = 1,
              replicas_identical: bool | None = True) -> dict:
    """The training-log summary written to ``summary.json`` (and shipped beside pretrained weights)."""
    losses = [x for x in history["meta_loss"] if x is not None]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    return {
        "lopt": cfg["lopt"], "estimator": cfg["estimator"], "outer_steps": counters["outer_step"],
        "inner_steps": counters["inner_steps"], "skipped": counters["skipped"],
        "resets": counters["resets"], "finished_runs": counters["finished_runs"],
        "wall_time_s": counters["wall_time_s"], "world_size": world_size,
        "meta_loss_first": losses[0] if losses else None, "meta_loss_last": losses[-1] if losses else None,
        "meta_loss_first10pct_mean": sum(head) / len(head) if losses else None,
        "meta_loss_last10pct_mean": sum(tail) / len(tail) if losses else None,
        "meta_loss_min": min(losses) if losses else None,
        "last_eval": history["eval"][-1] if history["eval"] else None,
        "weights": str(weights),
        "replicas_identical": replicas_identical,
    }


def summarize_checkpoint(out) -> dict:
    """:func:`summarize` of the checkpoint in ``out`` (a run stopped or still going)."""
    ckpt = S.load(Path(out))
    return summarize(ckpt["config"], ckpt["counters"], ckpt["history"], Path(out) / S.LOPT_FILE,
                     replicas_identical=None)


def cli(argv=None) -> int:
    """Console entry point (``l2o-meta-train``): exit status 0 on success, a one-line error for bad input."""
    from tasks.data import UnknownDatasetError
    from tasks.registry import UnknownTaskError

    from l2o.checkpoint import WeightsFileError

    # Only the errors meant for users become one line; anything else is a bug and keeps its traceback.
    try:
        main(argv)
    except (C.ConfigError, FileNotFoundError, UnknownTaskError, UnknownDatasetError, WeightsFileError) as err:
        sys.exit(f"meta_train.py: error: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""The summary of a meta-training run (``summary.json``, shipped beside pretrained weights)."""
from __future__ import annotations

from pathlib import Path

from . import state as S
from .config import MetaConfig, from_checkpoint


def summarize(cfg: MetaConfig, counters: dict, history: dict, weights, world_size: int = 1,
              replicas_identical: bool | None = True) -> dict:
    """The training-log summary written to ``summary.json`` (and shipped beside pretrained weights)."""
    losses = [x for x in history["meta_loss"] if x is not None]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    return {
        "lopt": cfg.lopt, "estimator": cfg.estimator, "outer_steps": counters["outer_step"],
        # A run stopped early (--stop-after, Ctrl-C) must not pass for a finished one.
        "outer_steps_planned": cfg.outer_steps, "finished": counters["outer_step"] >= cfg.outer_steps,
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
    return summarize(from_checkpoint(ckpt["config"]), ckpt["counters"], ckpt["history"],
                     Path(out) / S.LOPT_FILE, replicas_identical=None)

"""What ``meta_train.py`` checks before it builds anything, and what it tells its user.

A mistake in a run's inputs (an output directory holding something else, a task pool that differs from the one the
checkpoint drew from) must stop the run at once with one line naming the
problem, not surface as a traceback or hours later. A run that stops short
(``stop_after``, Ctrl-C) says where it stands and the command that continues it.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from . import state as S
from .config import ConfigError, MetaConfig
from .tasks_pool import pool_mismatch, skipped_for_data


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while training; its message (rank 0, empty elsewhere) says where to continue from."""


def say(line: str) -> None:
    print(f"meta_train.py: {line}", file=sys.stderr)


def resume_command(out) -> str:
    return f"python meta_train.py --resume --out {shlex.quote(str(out))}"


# ---------------------------------------------------------------------- the output directory
def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; pick another --out")


def check_fresh_out(out: Path, inputs: tuple[str, ...]) -> None:
    """Refuse a fresh run into a directory holding anything but what a run leaves before
    its first checkpoint (:func:`state.foreign_entries`) or the run's own ``inputs``
    (a config file copied there to start it): the run would write over it."""
    own = {Path(f).resolve() for f in inputs if f}
    foreign = [name for name in S.foreign_entries(out) if (out / name).resolve() not in own]
    if foreign:
        raise ConfigError(f"--out {out} is not empty and holds no meta_train.py run (found: "
                          f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); pass --resume "
                          "if it is a run to continue, or pick another --out")


# ---------------------------------------------------------------------- the task pool
def _data_env() -> str:
    return os.environ.get("L2O_DATA") or "unset"


def check_pool(cfg: MetaConfig, saved: list[str] | None, specs: list[str]) -> None:
    """Refuse to resume with another task pool than the checkpoint's runs drew from: a
    named suite leaves out the tasks whose data is missing, so the pool depends on
    $L2O_DATA, and draws index the pool (checkpoints older than the stored pool: unchecked)."""
    why = None if saved is None else pool_mismatch(saved, specs)
    if why:
        raise ConfigError(f"cannot resume {cfg.out}: suite {cfg.suite!r} gives another task pool here than "
                          f"the run drew from ({why}); a task whose data is missing drops out of a named "
                          f"suite: set $L2O_DATA as when the run started (now {_data_env()})")


def warn_skipped(cfg: MetaConfig) -> None:
    """One line listing the suite's tasks a fresh run leaves out for lack of data."""
    skipped = skipped_for_data(cfg.suite)
    if skipped:
        say(f"warning: suite {cfg.suite!r} leaves out {len(skipped)} task(s) whose data is missing "
            f"($L2O_DATA {_data_env()}): {', '.join(skipped)}")


# ---------------------------------------------------------------------- where the run stands
def resumed(cfg: MetaConfig, step: int) -> None:
    """Say what --resume continues, or that it has nothing left to do (a silent exit 0
    would read as "trained on" when nothing was trained)."""
    if step >= cfg.outer_steps:
        say(f"nothing to do: {cfg.out} is already at step {step} and outer_steps is {cfg.outer_steps}; "
            "pass a larger --outer-steps to train on")
    else:
        say(f"resuming {cfg.out} at step {step} of {cfg.outer_steps} (from {S.checkpoint_dir(Path(cfg.out))})")


def finished(cfg: MetaConfig, step: int) -> None:
    """Where a finished run's weights and summary are, and how to use the weights."""
    optimizer = "GMNOptimizer" if cfg.lopt == "gmn" else "MLPOptimizer"
    say(f"at step {step} of {cfg.outer_steps}: weights {Path(cfg.out) / S.LOPT_FILE} "
        f"(l2o.{optimizer}(model, weights=...)), summary {Path(cfg.out) / 'summary.json'}")


def user_errors() -> tuple[type[Exception], ...]:
    """The errors meant for users (bad config, names, data, weights, checkpoints):
    meta_train.py prints them as one line."""
    from tasks.data import DatasetFormatError, UnknownDatasetError
    from tasks.registry import UnknownTaskError

    from ..checkpoint import WeightsFileError

    return (ConfigError, FileNotFoundError, UnknownTaskError, UnknownDatasetError, WeightsFileError,
            DatasetFormatError, S.CheckpointError)


def stopped(cfg: MetaConfig, step: int) -> None:
    if step < cfg.outer_steps:
        say(f"stopped at step {step} of {cfg.outer_steps}; continue with --resume --out {shlex.quote(cfg.out)}")


def interrupted(out, step: int, last_checkpoint: int | None) -> str:
    if last_checkpoint is None:
        return (f"interrupted at step {step}, before the first checkpoint; nothing to resume: "
                "run the same command again to start over")
    return (f"interrupted at step {step}; last checkpoint: step {last_checkpoint}; "
            f"continue with: {resume_command(out)}")

"""Checkpoint and resume of the whole outer training state.

A checkpoint is one directory ``ckpt-<step>/`` inside the output directory
holding three files:

* ``lopt.safetensors``    -- the metanetwork, loadable by ``GMNOptimizer(model,
  weights=...)``; ``extra`` holds the config and counters;
* ``train_state.safetensors`` -- every tensor needed to continue: the outer
  optimizer's moments, each inner run's parameters / buffers / optimizer state
  / carried gradient, and each rank's torch RNG state;
* ``train_state.json``    -- config, counters, outer optimizer scalars, inner
  run scalars, meta-loss history, the pool of task specs the runs draw from.

The whole checkpoint is atomic: the files are written (and fsynced) into a
fresh ``ckpt.tmp-<step>/``, the directory is renamed to ``ckpt-<step>/``, and
only then is the small pointer file ``latest`` replaced (``os.replace``) to
name it. A crash at any point leaves ``latest`` naming the previous, complete
checkpoint, which is deleted only after the pointer has moved. After the
switch ``lopt.safetensors`` is also copied (atomically) to the top of the
output directory, where users load it from; resuming never reads that copy.
:func:`checkpoint_dir` gives the current checkpoint directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..checkpoint import atomic_write_bytes, atomic_write_json, load_lopt, save_lopt

STATE_VERSION = 1
LOPT_FILE, TENSORS_FILE, JSON_FILE = "lopt.safetensors", "train_state.safetensors", "train_state.json"
LATEST_FILE = "latest"


def checkpoint_dir(out: Path) -> Path | None:
    """The directory of the last complete checkpoint in ``out`` (None if there is none).

    Falls back to the files at the top of ``out`` for output directories
    written before checkpoints became directories.
    """
    out = Path(out)
    pointer = out / LATEST_FILE
    if pointer.is_file():
        return out / pointer.read_text().strip()
    if (out / JSON_FILE).is_file():
        return out
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"outer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[key] = value
    return tensors, scalars


def _optimizer_join(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("outer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in scalars["state"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": scalars["param_groups"]}


# The directories save() writes: ckpt-<step>, ckpt-<step>.<pid> (a same-step rewrite) and
# ckpt.tmp-<step> (being written). Only these are ever deleted: a user's ckpt-old-experiment
# or ckpt-8-keep beside them is not ours.
_CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)(?:\.\d+)?")
_TMP_NAME = re.compile(r"ckpt\.tmp-\d+")


def _stale(path: Path, final: Path, step: int) -> bool:
    """Whether ``path`` is a directory save() wrote that ``final`` (step ``step``) supersedes:
    an earlier generation, another copy of this step, or the leftover of a crashed write."""
    if path == final or not path.is_dir() or path.is_symlink():
        return False
    if _TMP_NAME.fullmatch(path.name):
        return True
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return match is not None and int(match.group(1)) <= step


def foreign_entries(out: Path) -> list[str]:
    """Names in ``out`` that a run without a checkpoint yet does not explain: anything
    but ``tb/`` and the checkpoint directories of a write that crashed (dotfiles ignored).
    A fresh run must not write over such a directory (summary.json, lopt.safetensors)."""
    out = Path(out)
    if not out.is_dir():
        return []
    ours = lambda p: p.is_dir() and (p.name == "tb" or _TMP_NAME.fullmatch(p.name)  # noqa: E731
                                     or _CHECKPOINT_NAME.fullmatch(p.name))
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and not ours(p))


def save(out: Path, lopt, opt, cfg: dict, counters: dict, runs: list, rng_states: list[torch.Tensor],
         history: dict, tasks: list[str] | None = None) -> None:
    """``runs``: every rank's InnerRun objects; ``rng_states``: one per rank; ``tasks``: the
    pool of task specs drawn from (a resume checks it gets the same one)."""
    out = Path(out)
    step = int(counters["outer_step"])
    tensors, opt_scalars = _optimizer_split(opt)
    for run in runs:
        for name, value in run.tensors().items():
            tensors[f"run.{run.slot}.{name}"] = value
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.{rank}"] = rng.cpu()
    tmp = out / f"ckpt.tmp-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    atomic_write_bytes(tmp / TENSORS_FILE, safetensors_bytes(tensors, metadata={"outer_step": str(step)}))
    save_lopt(lopt, tmp / LOPT_FILE, extra={"meta_train_config": cfg, "counters": counters})
    atomic_write_json(tmp / JSON_FILE, {
        "version": STATE_VERSION, "config": cfg, "counters": counters, "outer_optimizer": opt_scalars,
        "runs": sorted((r.scalars() for r in runs), key=lambda s: s["slot"]), "world_size": len(rng_states),
        "history": history, "tasks": tasks,
    })
    _fsync_dir(tmp)
    final = out / f"ckpt-{step}"
    previous = checkpoint_dir(out)
    if final.exists():          # a checkpoint of the same step, e.g. written before a crash and resumed
        if previous is not None and previous.resolve() == final.resolve():
            # Never delete the checkpoint the pointer names before the pointer has moved.
            final = out / f"ckpt-{step}.{os.getpid()}"
            if final.exists():
                shutil.rmtree(final)
        else:
            shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(out)
    atomic_write_bytes(out / LATEST_FILE, (final.name + "\n").encode())    # the switch
    _fsync_dir(out)
    atomic_write_bytes(out / LOPT_FILE, (final / LOPT_FILE).read_bytes())
    for old in out.iterdir():   # earlier generations and leftovers of crashed writes
        if _stale(old, final, step):
            shutil.rmtree(old, ignore_errors=True)
    if previous is not None and previous == out:    # legacy top-level files, now superseded
        for name in (TENSORS_FILE, JSON_FILE):
            (out / name).unlink(missing_ok=True)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: a file corrupted or truncated, or files that disagree."""


# what save() writes into the train state, by type: a file without them was edited or is not l2o's
_TRAIN_STATE = {"config": dict, "counters": dict, "history": dict, "world_size": int, "outer_optimizer": dict,
                "runs": list}


def _check_train_state(meta: Any, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: unsupported train-state version "
                              f"{meta.get('version') if isinstance(meta, dict) else None!r} "
                              f"(this l2o writes version {STATE_VERSION})")
    wrong = [key for key, kind in _TRAIN_STATE.items() if not isinstance(meta.get(key), kind)]
    if "counters" not in wrong and not isinstance(meta["counters"].get("outer_step"), int):
        wrong.append("counters.outer_step")
    if "outer_optimizer" not in wrong and not {"state", "param_groups"} <= meta["outer_optimizer"].keys():
        wrong.append("outer_optimizer.state/param_groups")
    if "runs" not in wrong and not all(isinstance(r, dict) and "slot" in r for r in meta["runs"]):
        wrong.append("runs[].slot")
    if wrong:
        raise CheckpointError(f"{path}: not a train state l2o wrote (missing or mistyped: {', '.join(wrong)}; "
                              "edited or corrupted?)")


def load(out: Path) -> dict[str, Any]:
    """Everything :func:`save` wrote in the last complete checkpoint, checked for
    consistency; a file that cannot be read is a :class:`CheckpointError` naming it."""
    out = Path(out)
    found = checkpoint_dir(out)
    if found is None:
        raise FileNotFoundError(f"cannot resume: no checkpoint in {out} (no {out / LATEST_FILE})")
    out = found
    for name in (JSON_FILE, TENSORS_FILE, LOPT_FILE):
        if not (out / name).is_file():
            raise FileNotFoundError(f"cannot resume: {out / name} is missing (no checkpoint in {out}?)")
    try:
        meta = json.loads((out / JSON_FILE).read_text())
    except ValueError as err:   # JSONDecodeError, or bytes that are not UTF-8
        raise CheckpointError(f"{out / JSON_FILE} is not readable JSON (truncated or corrupted?): {err}") from err
    _check_train_state(meta, out / JSON_FILE)
    try:
        with safe_open(str(out / TENSORS_FILE), framework="pt") as f:
            file_step = int((f.metadata() or {}).get("outer_step", -1))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise CheckpointError(f"{out / TENSORS_FILE} is not a readable safetensors file "
                              f"(truncated or corrupted?): {err}") from err
    lopt = load_lopt(out / LOPT_FILE)
    from ..checkpoint import lopt_extra

    lopt_step = int(lopt_extra(out / LOPT_FILE).get("counters", {}).get("outer_step", -1))
    step = int(meta["counters"]["outer_step"])
    if not (file_step == lopt_step == step):
        raise CheckpointError(f"checkpoint files in {out} disagree on the outer step (json {step}, tensors "
                              f"{file_step}, weights {lopt_step}): they come from different checkpoints; "
                              "restore the files from one checkpoint")
    runs = {}
    for name, value in tensors.items():
        if name.startswith("run."):
            _, slot, key = name.split(".", 2)
            runs.setdefault(int(slot), {})[key] = value
    return {
        "config": meta["config"], "counters": meta["counters"], "history": meta["history"],
        "world_size": meta["world_size"], "lopt": lopt,
        "optimizer": _optimizer_join(tensors, meta["outer_optimizer"]),
        "run_scalars": {s["slot"]: s for s in meta["runs"]}, "run_tensors": runs,
        "rng": {int(k.split(".")[1]): v for k, v in tensors.items() if k.startswith("rng.")},
        "tasks": meta.get("tasks"),     # None in checkpoints written before pools were stored
    }

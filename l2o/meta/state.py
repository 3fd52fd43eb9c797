"""Checkpoint and resume of the whole outer training state.

Three files in the output directory, each written atomically (temp + fsync +
rename, :mod:`l2o.checkpoint`):

* ``lopt.safetensors``    -- the metanetwork, loadable by ``GMNOptimizer(model,
  weights=...)``; ``extra`` holds the config and counters;
* ``train_state.safetensors`` -- every tensor needed to continue: the outer
  optimizer's moments, each inner run's parameters / buffers / optimizer state
  / carried gradient, and each rank's torch RNG state;
* ``train_state.json``    -- config, counters, outer optimizer scalars, inner
  run scalars, meta-loss history.

The JSON is written last and records the outer step; the two tensor files
record it too, and a mismatch (a crash between the writes) is reported
instead of silently resuming from a mixed state.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..checkpoint import atomic_write_bytes, atomic_write_json, load_lopt, save_lopt

STATE_VERSION = 1
LOPT_FILE, TENSORS_FILE, JSON_FILE = "lopt.safetensors", "train_state.safetensors", "train_state.json"


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


def save(out: Path, lopt, opt, cfg: dict, counters: dict, runs: list, rng_states: list[torch.Tensor],
         history: dict) -> None:
    """``runs``: every rank's InnerRun objects; ``rng_states``: one per rank."""
    out = Path(out)
    step = int(counters["outer_step"])
    tensors, opt_scalars = _optimizer_split(opt)
    for run in runs:
        for name, value in run.tensors().items():
            tensors[f"run.{run.slot}.{name}"] = value
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.{rank}"] = rng.cpu()
    atomic_write_bytes(out / TENSORS_FILE, safetensors_bytes(tensors, metadata={"outer_step": str(step)}))
    save_lopt(lopt, out / LOPT_FILE, extra={"meta_train_config": cfg, "counters": counters})
    atomic_write_json(out / JSON_FILE, {
        "version": STATE_VERSION, "config": cfg, "counters": counters, "outer_optimizer": opt_scalars,
        "runs": sorted((r.scalars() for r in runs), key=lambda s: s["slot"]), "world_size": len(rng_states),
        "history": history,
    })


def load(out: Path) -> dict[str, Any]:
    """Everything :func:`save` wrote, checked for consistency."""
    out = Path(out)
    for name in (JSON_FILE, TENSORS_FILE, LOPT_FILE):
        if not (out / name).is_file():
            raise FileNotFoundError(f"cannot resume: {out / name} is missing (no checkpoint in {out}?)")
    meta = json.loads((out / JSON_FILE).read_text())
    if meta.get("version") != STATE_VERSION:
        raise ValueError(f"{out / JSON_FILE}: unsupported train-state version {meta.get('version')}")
    with safe_open(str(out / TENSORS_FILE), framework="pt") as f:
        file_step = int((f.metadata() or {}).get("outer_step", -1))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lopt = load_lopt(out / LOPT_FILE)
    from ..checkpoint import lopt_extra

    lopt_step = int(lopt_extra(out / LOPT_FILE).get("counters", {}).get("outer_step", -1))
    step = int(meta["counters"]["outer_step"])
    if not (file_step == lopt_step == step):
        raise ValueError(f"checkpoint files in {out} disagree on the outer step (json {step}, tensors "
                         f"{file_step}, weights {lopt_step}): the run was killed mid-checkpoint; restore "
                         "the files from one checkpoint")
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
    }

"""``state_dict()`` / ``load_state_dict()`` of the learned optimizers.

torch.optim's state dict (``state[i]``: ``step``, ``m``, ``v``, and with the
step-size controller ``log_lr``, of the i-th grouped tensor) plus ``lopt``,
the metanetwork's kind, config and weights, so a restored optimizer continues
identically even when it was built with ``weights=None``. It loads with
``torch.load(weights_only=True)``. The optimizer keeps its statistics in flat
buffers (``m`` [num_momenta, n], ``v`` [n]) and per-tensor counters
(``_steps``, ``_log_lr``); these functions translate.
"""
from __future__ import annotations

from collections import OrderedDict
from itertools import chain

import torch
from torch import Tensor

from . import optim_fsdp

_OURS = ("step", "m", "v", "log_lr")


def state_dict(opt, torch_state_dict) -> dict:
    """The optimizer's state dict; ``torch_state_dict`` is torch.optim's
    (bound to ``opt``). State-dict hooks see the finished dict."""
    post_hooks = opt._optimizer_state_dict_post_hooks
    opt._optimizer_state_dict_post_hooks = OrderedDict()
    try:
        sd = torch_state_dict()
    finally:
        opt._optimizer_state_dict_post_hooks = post_hooks
    # A snapshot, not views: m may live in a larger workspace (torch.save would
    # write it whole) and both would keep changing with later steps.
    sd["state"] = {k: {name: t.clone() for name, t in v.items()} for k, v in sd["state"].items()}
    sd["lopt"] = {"kind": opt.lopt.kind, "config": opt.lopt.config(),
                  "weights": {k: v.detach().clone() for k, v in opt.lopt.state_dict().items()}}
    for hook in post_hooks.values():
        result = hook(opt, sd)
        if result is not None:
            sd = result
    return sd


def load_state_dict(opt, state_dict: dict, torch_load_state_dict, owned) -> None:
    """Restores ``state_dict`` into ``opt`` (``torch_load_state_dict``: torch.optim's, bound to it).
    ``owned(k)``: the flat entries ``[s, e)`` of tensor ``k`` whose statistics
    ``opt`` keeps (all of them, or a sharded optimizer's part)."""
    state_dict = dict(state_dict)
    for hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    state_dict = dict(state_dict)
    lopt_record = state_dict.pop("lopt", None)
    if lopt_record is not None and (lopt_record["kind"] != opt.lopt.kind or lopt_record["config"] != opt.lopt.config()):
        raise ValueError(
            f"state_dict was saved with a {lopt_record['kind']} metanetwork of config "
            f"{lopt_record['config']}, this optimizer has {opt.lopt.kind} {opt.lopt.config()}")
    raw = state_dict.get("state", {})
    saved_groups = state_dict["param_groups"]
    post = opt._optimizer_load_state_dict_post_hooks
    _load_groups(opt, state_dict, raw, torch_load_state_dict)
    saved_of = dict(zip((id(p) for g in opt.param_groups for p in g["params"]),
                        chain.from_iterable(g["params"] for g in saved_groups)))
    # state dicts from before per-tensor counters and groups: one counter
    # in the (single) group, no weight_decay / betas
    legacy_step = [g.pop("step", None) for g in opt.param_groups][0]
    for g in opt.param_groups:
        for key, default in opt.defaults.items():
            g.setdefault(key, default)
    m, v, steps, log_lr = _flat_statistics(opt, raw, saved_of, legacy_step, owned)
    if lopt_record is not None:
        opt.lopt.load_state_dict(lopt_record["weights"])
    device = opt.graph.device
    opt._flat_state = {"m": m.to(device), "v": v.to(device)}
    opt._steps = steps
    opt._log_lr = log_lr.to(device) if opt.lopt.adapt else None
    opt._prepare_backend()
    for hook in post.values():
        hook(opt)


def _load_groups(opt, state_dict: dict, raw: dict, torch_load_state_dict) -> None:
    """torch's loader checks the groups' sizes and copies their options; it
    would cast m / v to the parameters' dtype (rounding the float32 statistics
    of fp16/bf16 models), so it gets the rest of the state only, hooks off."""
    stripped = {k: {n: t for n, t in v.items() if n not in _OURS} for k, v in raw.items()}
    pre, post = opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks
    opt._optimizer_load_state_dict_pre_hooks = opt._optimizer_load_state_dict_post_hooks = OrderedDict()
    try:
        torch_load_state_dict({**state_dict, "state": stripped})
    finally:
        opt._optimizer_load_state_dict_pre_hooks, opt._optimizer_load_state_dict_post_hooks = pre, post


def _flat_statistics(opt, raw: dict, saved_of: dict, legacy_step, owned) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat ``m``, ``v`` (CPU) over the kept entries and per-tensor ``steps``,
    ``log_lr`` from the saved per-tensor entries (fresh for tensors in no
    group). A saved entry is either a whole tensor's or, with ``shard``, one
    rank's part of it (``ShardedGMNOptimizer``), which must be exactly the
    part kept here."""
    graph = opt.graph
    num_momenta = opt._flat_state["m"].shape[0]
    dtensor = optim_fsdp.dtensor_class()
    m_parts, v_parts = [], []
    # float32 whatever the caller's default dtype (the step runs in float32)
    steps = torch.zeros(graph.num_tensors, dtype=torch.float32)
    log_lr = torch.zeros(graph.num_tensors, dtype=torch.float32)
    missing = []
    for k, p in enumerate(opt._flat_params):
        name, shape = graph.param_names[graph.flat_order[k]], graph.param_shapes[graph.flat_order[k]]
        start = graph.tensor_slices[k].start
        s, e = owned(k)
        # within the tensor, clamped to it (a rank keeping none of it: an empty range at one end)
        s, e = (min(max(i - start, 0), shape.numel()) for i in (s, max(s, e)))
        if id(p) not in saved_of:  # in no group: fresh
            m_parts.append(torch.zeros(num_momenta, e - s, dtype=torch.float32))
            v_parts.append(torch.zeros(e - s, dtype=torch.float32))
            continue
        entry = raw.get(saved_of[id(p)], {})
        if "m" not in entry or "v" not in entry:
            missing.append(k)
            continue
        m, v = entry["m"], entry["v"]
        if dtensor is not None and isinstance(m, dtensor):   # this rank's rows (FSDP2; as saved, or resharded)
            m, v = optim_fsdp.local(m).reshape(num_momenta, -1), optim_fsdp.local(v).reshape(-1)
            if tuple(m.shape) != (num_momenta, e - s) or tuple(v.shape) != (e - s,):
                raise ValueError(f"optimizer state for {name!r} holds {v.numel()} entries on this rank, which "
                                 f"owns {e - s} of the tensor: sharded another way than its parameter")
            m_parts.append(m.to("cpu", torch.float32))
            v_parts.append(v.to("cpu", torch.float32))
        elif "shard" in entry:   # one rank's part, flat
            saved = [int(i) for i in entry["shard"]]
            if saved != [s, e] or tuple(m.shape) != (num_momenta, e - s) or tuple(v.shape) != (e - s,):
                raise ValueError(
                    f"optimizer state for {name!r} is one rank's shard (entries [{saved[0]}, {saved[1]}) of the "
                    f"tensor), this optimizer keeps [{s}, {e}): restore a shard on the same rank of the same "
                    "world size, or save with ShardedGMNOptimizer.full_state_dict() to restore anywhere")
            m_parts.append(m.to("cpu", torch.float32))
            v_parts.append(v.to("cpu", torch.float32))
        else:
            want_m, want_v = (num_momenta, *shape), tuple(shape)
            if tuple(m.shape) != want_m or tuple(v.shape) != want_v:
                raise ValueError(
                    f"optimizer state for {name!r} has m {tuple(m.shape)} / v {tuple(v.shape)}, expected "
                    f"{want_m} / {want_v} (a state_dict of another model, or from l2o before momenta were "
                    "stored feature-major)")
            m_parts.append(m.reshape(num_momenta, -1)[:, s:e].to("cpu", torch.float32))
            v_parts.append(v.reshape(-1)[s:e].to("cpu", torch.float32))
        steps[k] = float(entry.get("step", legacy_step if legacy_step is not None else 0))
        log_lr[k] = float(entry.get("log_lr", 0.0))
    if missing:
        raise ValueError(f"optimizer state_dict lacks learned-optimizer state for {len(missing)} tensors")
    return torch.cat(m_parts, dim=1), torch.cat(v_parts), steps, log_lr

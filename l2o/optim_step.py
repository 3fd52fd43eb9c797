"""One step of the learned optimizers, from the gradients to the parameters.

``LearnedOptimizerBase.step`` (:mod:`l2o.optim_base`) collects the gradients
of the tensors that may move and calls one of the two functions here, by
what its backend (:mod:`l2o.fast.backend`) takes:

* :func:`step_by_runs` (the chunked and fused backends): parameters and
  gradients are read tensor by tensor, :meth:`ChunkedBackend.step_entries`
  computes the update run by run and hands each run to :class:`UpdateApplier`,
  which applies ``p <- p (1 - lr wd) + lr u`` at once: no flat copies;
* :func:`step_flat` (the forward backend): flat copies of the parameters and
  gradients, one flat update, applied group by group.

Both skip tensors whose gradient is missing, non-finite or whose square
overflows float32 (with a warning; their state is left alone), zero and warn
about non-finite updates, and advance the per-tensor step counters of the
tensors stepped.

The route of one ``GMNOptimizer.step()`` on a CPU with the fused kernels, top
to bottom (each file calls only into the ones below it; the sink is the one
callback up):

1. ``l2o/optim_base.py`` -- ``step`` / ``_learned_step``: the gradients;
2. here -- :func:`step_by_runs`: skipped tensors, the step's state, the sink;
3. ``l2o/fast/backend.py`` -- ``ChunkedBackend.step_entries``: the step-size
   controller, then the metanetwork's chunked step;
4. ``l2o/fast/gmn.py`` -- ``run_step``: the passes of ``GMNChunkedStep``
   (feature sums, node encoder, message-passing rounds, read-out), over the
   runs of the backend's ``ChunkPlan`` (``l2o/fast/plan.py``), features from
   ``l2o/fast/features.py``, node terms from ``l2o/fast/gmn_terms.py``;
5. ``l2o/fast/kernel_calls.py`` -- the checked C calls (``kernels.c``), or
   torch ops on scatter runs;
6. ``l2o/update_rule.py`` / ``l2o/features.py`` -- the math both evaluate,
   defined once (the metanetwork's own layers: ``l2o/gmn.py``, ``gmn_conv.py``);
7. back here: :class:`UpdateApplier` applies each run's update, or, for a
   float32 parameter, tells the fused kernel that computes it where to apply
   it itself (:meth:`UpdateApplier.direct`).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .fast.features import DirectApply
from .fast.shard import param_starts

# warnings.warn's stacklevel from the functions here to the code calling opt.step():
# here <- _learned_step <- step <- torch.no_grad's wrapper <- torch.optim's step hook wrapper <- caller
CALLER = 6


def all_finite(t: Tensor) -> bool:
    """Whether every entry is finite. NaN and inf propagate through a sum, so a
    finite sum settles it in one streaming reduction (isfinite is several
    passes); only a sum that overflowed needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def warn_skipped(opt, names: list[str]) -> None:
    warnings.warn(f"{type(opt).__name__}: non-finite gradient (or one whose square overflows float32) "
                  f"in {', '.join(names)}; skipped the update of these tensors this step",
                  RuntimeWarning, stacklevel=CALLER + 1)


def warn_nonfinite_updates(opt) -> None:
    warnings.warn(f"{type(opt).__name__}: the learned optimizer produced non-finite updates; "
                  "those entries were not changed", RuntimeWarning, stacklevel=CALLER + 1)


def bad_gradients(grads: list[Tensor | None], all_reduce=None, device: torch.device | None = None) -> list[int]:
    """Indices (flat order) of tensors whose gradient is non-finite or whose
    sum of squares overflows float32; one norm per tensor, no flat copy.
    ``all_reduce`` (gradients sharded over ranks, ``device`` the collective's
    where this rank has no gradient): a tensor bad on any rank is bad on all."""
    present = [k for k, g in enumerate(grads) if g is not None]
    if not present and all_reduce is None:
        return []
    bad = torch.zeros(len(grads), device=grads[present[0]].device if present else device)
    if present:
        norms = torch.stack(torch._foreach_norm([grads[k].float() if grads[k].dtype != torch.float32 else grads[k]
                                                 for k in present])).float()
        bad[present] = (~torch.isfinite(norms * norms)).float()
    if all_reduce is not None:
        all_reduce(bad)
    return bad.nonzero().flatten().tolist()


def step_state(opt, active: list[int], per_entry: bool) -> dict[str, Tensor]:
    """The metanetwork's state for this step: the flat statistics, the clock
    ``step`` (the largest counter among the ``active`` tensors), the
    controller's ``log_lr`` and, when those tensors' counters differ (or a
    skipped tensor that stepped before is behind the clock), each tensor's
    own count for its bias correction (:mod:`l2o.features`):
    ``entry_step`` [n] (``per_entry``, the forward's form) or ``tensor_step`` [T]."""
    counts = opt._steps[active]
    clock = float(counts.max())
    device = opt.graph.device
    state = dict(opt._flat_state, step=torch.tensor(clock, device=device))
    if opt._log_lr is not None:
        state["log_lr"] = opt._log_lr
    # a skipped tensor's statistics still feed the others' updates (message
    # passing): bias-corrected with its own count too, unless it never stepped
    # (zero statistics: any count gives the same features)
    if bool((counts != clock).any()) or bool(((opt._steps != clock) & (opt._steps > 0)).any()):
        if per_entry:
            numels = torch.tensor(opt.graph.numels)
            state["entry_step"] = opt._steps.repeat_interleave(numels, output_size=opt.graph.num_params).to(device)
        else:
            state["tensor_step"] = opt._steps.clone()
    return state


class UpdateApplier:
    """The sink of a chunked step: ``p <- p (1 - lr wd) + lr u`` for each run
    ``u`` of tensor ``k`` as soon as it exists (through the fused ``apply``
    kernel where there is one, or inside the fused read-out: :meth:`direct`),
    non-finite entries of ``u`` dropped.
    Non-contiguous parameters are updated in a copy, written back by :meth:`finish`."""

    def __init__(self, flat_params: list[Tensor], starts: list[int], hyper: dict[int, tuple[float, float]], kernels):
        self.flat_params, self.starts, self.hyper, self.kernels = flat_params, starts, hyper, kernels
        self.pending: dict[int, Tensor] = {}   # updated copies of non-contiguous parameters
        self.nonfinite = False

    def direct(self, k: int, s: int, e: int) -> DirectApply | None:
        """Where the fused kernel that computes run ``[s, e)`` of tensor ``k``
        may apply it itself: that run of a float32 contiguous parameter, with
        the group's lr and decay (:class:`l2o.fast.features.DirectApply`)."""
        lr, wd = self.hyper[k]
        p = self.flat_params[k]
        if self.kernels is None or lr == 0.0 or p.dtype != torch.float32 or not p.is_contiguous():
            return None
        return DirectApply(p.detach().view(-1)[s - self.starts[k]:e - self.starts[k]], lr, 1.0 - lr * wd,
                           self._dropped)

    def _dropped(self, count: int) -> None:
        self.nonfinite |= count > 0

    def __call__(self, k: int, s: int, e: int, u: Tensor) -> None:
        lr, wd = self.hyper[k]
        p = self.flat_params[k]
        if p.is_contiguous():
            target = p.detach().view(-1)
        else:
            if k not in self.pending:
                self.pending[k] = p.detach().reshape(-1).clone()
            target = self.pending[k]
        seg = target[s - self.starts[k]:e - self.starts[k]]
        if self.kernels is not None and lr != 0.0 and seg.dtype == torch.float32 and u.is_contiguous():
            # one pass on this thread: p = p (1 - lr wd) + lr u, non-finite u -> 0
            self.nonfinite |= self.kernels.apply(seg, u, lr, 1.0 - lr * wd) > 0
            return
        if not all_finite(u):
            self.nonfinite = True
            torch.nan_to_num_(u, nan=0.0, posinf=0.0, neginf=0.0)
        if lr == 0.0:
            return
        if wd != 0.0:  # decoupled, from the parameters the update was computed at
            seg.mul_(1.0 - lr * wd)
        seg.add_(u.to(p.dtype), alpha=lr)

    def finish(self) -> None:
        for k, flat in self.pending.items():
            self.flat_params[k].detach().copy_(flat.view_as(self.flat_params[k]))


def hyperparameters(opt, ks: list[int], group_of: list[int]) -> dict[int, tuple[float, float]]:
    """``(lr, weight_decay)`` of the group holding each tensor ``k``."""
    out = {}
    for k in ks:
        group = opt.param_groups[group_of[k]]
        out[k] = (float(group["lr"]), float(group["weight_decay"]))
    return out


def step_by_runs(opt, grads: list[Tensor | None], group_of: list[int], shard=None,
                 params: list[Tensor] | None = None) -> None:
    """The chunked step without flat copies: the step's working set is a few
    run-sized blocks beside the statistics (``shard``: a sharded optimizer's
    part; ``params``: the tensors to read and update, default the
    optimizer's, a rank's local shards where ``shard.local_params``)."""
    grads = list(grads)
    params = opt._flat_params if params is None else params
    local = shard is not None and shard.local_params
    bad = bad_gradients(grads, shard.all_reduce if local else None, opt.graph.device)
    if bad:
        warn_skipped(opt, [opt.graph.param_names[opt.graph.flat_order[k]] for k in bad])
        for k in bad:
            grads[k] = None
    active = [k for k, g in enumerate(grads) if g is not None]
    if not active:
        return
    state = step_state(opt, active, per_entry=False)
    params_1d = [p.detach().reshape(-1) for p in params]   # views where contiguous
    grads_1d = [g.reshape(-1) if g is not None else None for g in grads]
    applier = UpdateApplier(params, param_starts(opt.backend.plan, shard), hyperparameters(opt, active, group_of),
                            opt.backend.kernels)
    with torch.autocast(device_type=opt.graph.device.type, enabled=False):
        opt.backend.step_entries(params_1d, grads_1d, state, applier, [g is not None for g in grads], shard)
    applier.finish()
    if opt._log_lr is not None:  # skipped tensors keep their multiplier
        opt._log_lr[active] = state["log_lr"][active]
    if applier.nonfinite:
        warn_nonfinite_updates(opt)
    opt._steps[active] += 1.0  # in place: self.state[p]["step"] are views


def _skipped_tensors(opt, grads: list[Tensor | None], flat_g: Tensor) -> tuple[list[int], list[str]]:
    """Indices (in flat order) of tensors to leave alone this step, and
    names of those skipped for non-finite (or square-overflowing) gradients."""
    inactive = [g is None for g in grads]
    bad_names: list[str] = []
    # A square that overflows float32 poisons the second moment and the
    # tensor's feature RMS as surely as a NaN does (and message passing would
    # spread it to every tensor), so a tensor whose sum of squares is not
    # finite is skipped; one sum of squares settles the common case where none
    # is (not a norm: the norm of one entry is its magnitude, never squared).
    if not bool(torch.isfinite(torch.dot(flat_g, flat_g))):
        sq_sums = torch.zeros(opt.graph.num_tensors, device=flat_g.device).index_add_(
            0, opt.graph.tensor_id, flat_g * flat_g)
        for k in (~torch.isfinite(sq_sums)).nonzero().flatten().tolist():
            inactive[k] = True
            bad_names.append(opt.graph.param_names[opt.graph.flat_order[k]])
    return [k for k, off in enumerate(inactive) if off], bad_names


def _flat_buffer(opt, name: str) -> Tensor:
    """A persistent float32 vector over all entries: a fresh one per step
    would cost page faults on large models."""
    buffers = opt.__dict__.setdefault("_flat_buffers", {})
    device = opt.graph.device
    if name not in buffers or buffers[name].device != device:
        buffers[name] = torch.empty(opt.graph.num_params, device=device)
    return buffers[name]


def step_flat(opt, grads: list[Tensor | None], group_of: list[int]) -> None:
    """The step through flat copies and one flat update (the forward backend)."""
    flat_g = torch.cat([g.reshape(-1).float() if g is not None else p.new_zeros(p.numel(), dtype=torch.float32)
                        for p, g in zip(opt._flat_params, grads)], out=_flat_buffer(opt, "grad"))
    inactive, bad = _skipped_tensors(opt, grads, flat_g)
    if bad:
        warn_skipped(opt, bad)
    if len(inactive) == opt.graph.num_tensors:
        return
    off = set(inactive)
    active = [k for k in range(opt.graph.num_tensors) if k not in off]
    flat_p = torch.cat([p.detach().reshape(-1).float() for p in opt._flat_params], out=_flat_buffer(opt, "param"))
    ranges = [opt.graph.tensor_slices[k] for k in inactive]
    for r in ranges:
        flat_g[r] = 0.0
    # a backend may update the statistics in place: keep what skipped tensors must get back
    kept = [(r, opt._flat_state["m"][:, r].clone(), opt._flat_state["v"][r].clone()) for r in ranges]
    state = step_state(opt, active, per_entry=True)
    # the metanetwork always runs in float32, even inside a caller's autocast region
    with torch.autocast(device_type=flat_p.device.type, enabled=False):
        update, new_state = opt.backend.step_flat(flat_p, flat_g, state)
    for r, m, v in kept:
        new_state["m"][:, r] = m
        new_state["v"][r] = v
        update[r] = 0.0
    if not all_finite(update):
        warn_nonfinite_updates(opt)
        update = torch.nan_to_num(update, nan=0.0, posinf=0.0, neginf=0.0)
    for key in ("m", "v"):
        if new_state[key] is not opt._flat_state[key]:
            opt._flat_state[key].copy_(new_state[key])
    if opt._log_lr is not None:  # skipped tensors keep their multiplier
        opt._log_lr[active] = new_state["log_lr"][active]
    opt._steps[active] += 1.0  # in place: self.state[p]["step"] are views
    _apply_flat(opt, update.split(opt.graph.numels), active, group_of)


def _apply_flat(opt, chunks: list[Tensor], active: list[int], group_of: list[int]) -> None:
    """``p <- p (1 - lr wd) + lr u`` group by group (foreach ops)."""
    by_group: dict[int, list[int]] = {}
    for k in active:
        by_group.setdefault(group_of[k], []).append(k)
    for gi, ks in by_group.items():
        group = opt.param_groups[gi]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        if lr == 0.0:
            continue
        params = [opt._flat_params[k] for k in ks]
        if wd != 0.0:  # decoupled, from the parameters the update was computed at
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, [chunks[k].view(p.shape).to(p.dtype) for k, p in zip(ks, params)], alpha=lr)

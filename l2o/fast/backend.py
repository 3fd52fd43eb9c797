"""The no-grad step's backends and the one function that picks one.

A backend evaluates a metanetwork's function (its differentiable forward,
:mod:`l2o.lopt`) for the optimizers, which need no autograd:

* ``"forward"`` (:class:`ForwardBackend`): the forward itself under
  ``no_grad``; any metanetwork, any device. Flat vectors in, flat update out.
* ``"chunked"`` (:class:`ChunkedBackend`, no kernels): the same function
  reorganised into passes over runs of entries (:mod:`.gmn`, :mod:`.mlp`),
  torch ops, run-sized workspaces; parameters and gradients read tensor by
  tensor, each run's update handed to a sink.
* ``"fused"`` (:class:`ChunkedBackend` with kernels): the chunked passes
  through the C kernels of ``kernels.c`` (:mod:`.kernel_calls`), CPU float32.

:func:`select_impl` decides which one ``impl="auto"`` means for a graph and
a device; :func:`make_backend` builds it. A backend owns its workspace (the
:class:`~.plan.ChunkPlan` and its run-sized buffers): the optimizer that made
it keeps it, nothing is cached on the graph.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .. import features as F_
from ..gmn import GMNLOpt
from ..graph.param_graph import ParamGraph
from ..lopt import LearnedOptimizer
from ..mlp_lopt import MLPLOpt
from . import gmn as gmn_chunked
from .gmn import check_edge_states
from . import mlp as mlp_chunked
from . import native, plan as plan_module
from .features import Sink, flat_sink
from .kernel_calls import FusedKernels, load
from .lean import lean_graph
from .shard import Shard

IMPLS = ("forward", "chunked", "fused")
# The chunked implementation of each metanetwork class (exact classes: a
# subclass may change the math, so it gets the forward) and the run lengths
# of its plan: with torch ops, with the fused kernels, and with the fused
# kernels over dense edge blocks (``ChunkPlan``'s ``dense_chunk``). Runs are
# sized to keep a run's intermediates in cache: the MLP's hidden activations
# are entry-major (half the GMN's runs). The GMN's fused passes keep no
# run-sized intermediate but the update (none where the read-out applies it
# itself) and float32 copies of parameters and gradients that are not float32
# already, so their runs are long, and longest over dense blocks, to cut the
# per-call overhead: GPT-2 small's 124M parameters take 52 calls per pass
# instead of 146 at the fused runs' length, and its step 0.9x the time
# (bench/gpt2_step.py). Run lengths in multiples of :data:`.plan.DEFAULT_CHUNK`.
CHUNKED = {GMNLOpt: (gmn_chunked, 1, 16, 256), MLPLOpt: (mlp_chunked, 1 / 2, 1 / 2, 1 / 2)}

# When "auto" takes the chunked step, on CPU. The chunked step loops in
# Python over runs (at least one per tensor), the forward runs a fixed number
# of large ops: below these sizes the loop costs more than the memory traffic
# it saves. With torch ops per pass (bench/fast_step.py: a 22k-parameter CNN
# with 28 tensors is 1.5x slower chunked, a 56k one with 8 tensors 2x faster):
CHUNKED_MIN_PARAMS = 20_000
CHUNKED_MIN_PARAMS_PER_TENSOR = 2_000
# With the fused kernels: from 8k parameters (a 5k-parameter ResNet of 20
# tensors is 1.3x slower fused), and per tensor, by metanetwork: each pass
# makes a checked kernel call per run, which on many small tensors costs more
# than the forward's few large ops. bench/impl_thresholds.py times both steps
# on the task samplers' 8k+ models; chosen on the validation split's (two
# runs: GMN least at 3,000, 301-302 ms in total vs 347-370 at the earlier
# 500; MLP 119-120 ms at 500-1,000), reported on the held-out split's (GMN
# 215 vs 250 ms, MLP 76 vs 81).
FUSED_MIN_PARAMS = 8_000
FUSED_MIN_PARAMS_PER_TENSOR = {GMNLOpt: 3_000, MLPLOpt: 1_000}


def fused_kernels(lopt: LearnedOptimizer, device: torch.device | str) -> FusedKernels | None:
    """The fused kernels of ``lopt`` on ``device`` (built once per widths), or
    None: not a chunked metanetwork, not CPU, not float32, ``L2O_NATIVE=0``,
    or no working C compiler (:func:`l2o.fast.native.status` says why)."""
    if type(lopt) not in CHUNKED or torch.device(device).type != "cpu":
        return None
    if any(p.dtype != torch.float32 for p in lopt.parameters()):
        return None
    module = CHUNKED[type(lopt)][0]
    return load(F_.NUM_ENTRY_FEATURES, **module.kernel_widths(lopt))


def select_impl(lopt: LearnedOptimizer, graph: ParamGraph, device: torch.device | str, impl: str = "auto") -> str:
    """The backend ``impl`` stands for: itself when named (an error when it
    cannot run here), else (``"auto"``) the cheapest for this graph on this
    device: ``"fused"`` where the kernels exist and the model is large enough
    (``FUSED_MIN_*``), ``"chunked"`` above ``CHUNKED_MIN_*``, otherwise (and
    always off CPU, where the one-shot forward launches far fewer kernels)
    ``"forward"``. Two documented environment overrides: ``L2O_IMPL`` (one
    of ``IMPLS``) replaces what ``"auto"`` means for the metanetworks with a
    chunked step, and ``L2O_NATIVE=0`` keeps ``"auto"`` off ``"fused"``."""
    if impl not in ("auto", *IMPLS):
        raise ValueError(f"impl must be 'auto' or one of {IMPLS}, got {impl!r}")
    if impl == "auto" and os.environ.get("L2O_IMPL", "auto") != "auto":
        impl = os.environ["L2O_IMPL"]
        if impl not in IMPLS:
            raise ValueError(f"L2O_IMPL must be 'auto' or one of {IMPLS}, got {impl!r}")
        if type(lopt) not in CHUNKED:   # the override applies where there is a chunked step
            return "forward"
    if impl == "forward":
        return impl
    if type(lopt) not in CHUNKED:
        if impl == "auto":
            return "forward"
        raise ValueError(f"{type(lopt).__name__} has no {impl} implementation (only {sorted(c.__name__ for c in CHUNKED)}"
                         " do); use impl='forward'")
    if impl == "chunked":
        return impl
    if impl == "fused":
        if fused_kernels(lopt, device) is None:
            raise RuntimeError(f"impl='fused' needs the C kernels on a CPU with float32 weights: {native.status()}")
        return impl
    n, t = graph.num_params, graph.num_tensors
    if torch.device(device).type != "cpu":
        return "forward"
    if (n >= FUSED_MIN_PARAMS and n >= FUSED_MIN_PARAMS_PER_TENSOR[type(lopt)] * t
            and fused_kernels(lopt, device) is not None):
        return "fused"
    if n >= CHUNKED_MIN_PARAMS and n >= CHUNKED_MIN_PARAMS_PER_TENSOR * t:
        return "chunked"
    return "forward"


class ForwardBackend:
    """The metanetwork's differentiable forward, run under ``no_grad``."""
    name = "forward"
    per_tensor = False
    kernels = None

    def __init__(self, lopt: LearnedOptimizer, graph: ParamGraph):
        self.lopt, self.graph = lopt, graph

    @torch.no_grad()
    def step_flat(self, params: Tensor, grad: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``lopt(graph, params, grad, state)``: the update ``[n]`` and the new state."""
        return self.lopt(self.graph, params, grad, state)


class ChunkedBackend:
    """The chunked step of ``lopt`` over ``graph`` (``kernels``: fused).

    ``lean``: after the plan is built, keep the graph without its per-entry
    index tensors (:func:`.lean.lean_graph`; the optimizers do) as ``self.graph``.
    ``chunk``: the plan's run length, dense runs included (default:
    :data:`CHUNKED`'s, longer over dense blocks with the kernels).
    ``edge_states``: where the GMN keeps its edge states between passes
    (:data:`.gmn.EDGE_STATES`; "auto": by size)."""
    per_tensor = True

    def __init__(self, lopt: LearnedOptimizer, graph: ParamGraph, kernels: FusedKernels | None = None,
                 chunk: int | None = None, lean: bool = False, edge_states: str = "auto", cuts: list[int] = ()):
        _, torch_runs, fused_runs, fused_dense_runs = CHUNKED[type(lopt)]
        if check_edge_states(edge_states) != "auto" and not isinstance(lopt, GMNLOpt):
            raise ValueError(f"edge_states={edge_states!r}: only the GMN has edge states, not {type(lopt).__name__}")
        dense_chunk = chunk
        if chunk is None:
            runs, dense_runs = (torch_runs, torch_runs) if kernels is None else (fused_runs, fused_dense_runs)
            chunk, dense_chunk = (int(plan_module.DEFAULT_CHUNK * r) for r in (runs, dense_runs))
        self.lopt, self.kernels, self.edge_states = lopt, kernels, edge_states
        self.name = "fused" if kernels is not None else "chunked"
        self.plan = plan_module.ChunkPlan(graph, max(1, chunk), max(1, dense_chunk), cuts)
        self.graph = lean_graph(graph) if lean else graph

    def step_entries(self, params: list[Tensor], grads: list[Tensor | None], state: dict[str, Tensor], sink: Sink,
                     write: list[bool] | None = None, shard: Shard | None = None) -> dict[str, Tensor]:
        """One step without flat copies: ``params`` / ``grads`` are 1-D tensors
        per tensor of the graph's flat order (a ``None`` gradient reads as
        zeros); ``state`` (flat ``m``, ``v``, ``step``, optionally
        ``tensor_step`` [T] / ``entry_step`` [n], each tensor's count before
        this step, and ``log_lr``) advances in place for the tensors ``write``
        allows (default all), and each update run of those tensors goes to
        ``sink(k, start, stop, update)`` (flat indices; the update is a
        workspace, valid during the call, relative scale and step-size
        controller included). Every update is computed from ``params`` as
        they were when the step began: a sink may change a run's parameters
        once it has its update."""
        kwargs = {} if self.edge_states == "auto" else {"edge_states": self.edge_states}
        steps = CHUNKED[type(self.lopt)][0]
        return steps.run_step(self.lopt, self.plan, self.graph, params, grads, state, sink, write,
                                   self.kernels, shard, **kwargs)

    def step_flat(self, params: Tensor, grad: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The flat form (what :meth:`ForwardBackend.step_flat` returns);
        ``state``'s buffers are advanced in place."""
        update = torch.empty(self.plan.num_params, device=params.device)
        split = self.graph.numels
        state = self.step_entries(list(params.split(split)), list(grad.split(split)), state, flat_sink(update))
        return update, state


def make_backend(lopt: LearnedOptimizer, graph: ParamGraph, device: torch.device | str, impl: str = "auto",
                 **options) -> ForwardBackend | ChunkedBackend:
    """The backend :func:`select_impl` picks, built for ``graph`` (``options``:
    :class:`ChunkedBackend`'s keywords, for the chunked ones)."""
    chosen = select_impl(lopt, graph, device, impl)
    if chosen == "forward":
        return ForwardBackend(lopt, graph)
    return ChunkedBackend(lopt, graph, fused_kernels(lopt, device) if chosen == "fused" else None, **options)

"""Differential test: every backend of the no-grad step follows the same trajectory.

``GMNOptimizer.step`` and ``MLPOptimizer.step`` have three implementations
of one function:

* ``forward``: the metanetwork's differentiable forward, run under no_grad;
* ``chunked``: ``l2o/fast``, run by run over the flat entries, torch ops;
* ``fused``: the same runs through the C kernels of ``l2o/fast/kernels.c``.

The optimizers take a backend through their ``impl`` argument
(:func:`l2o.fast.select_impl`); these tests name it.

A reference run on ``forward`` trains a model drawn by a task sampler on its
data for ``STEPS`` steps, with faults injected at fixed steps (a NaN, an inf,
an entry whose square overflows float32, a missing gradient, a step where
every gradient is NaN). The gradients it handed the optimizer are replayed
into the other backends, so their trajectories can differ only by what the
backends compute. (Training each backend on its own gradients amplifies
rounding through the loss landscape: after 24 steps a transformer's
parameters differ by ~1e-2 of their displacement with no bug anywhere.)
After every step the parameters, the step's update and the optimizer state
(``m``, ``v``, per-tensor ``step``, the controller's ``log_lr``) are compared
with the reference, and the route each step took (forward, chunked runs,
which C kernels) is checked, so a backend that silently falls back to another
cannot pass as itself.

A backend this machine should have must be there: the fused kernels are
expected wherever there is a C compiler (:func:`l2o.fast.native.compiler`),
and a compiler that fails to build them fails these tests; only a machine
without a compiler skips the fused comparisons.

``L2O_TEST_DEVICE=cuda`` runs the trajectories on a GPU (``bench/gpu_check.sh``
does): there the backends are ``forward`` (what the optimizers take on a GPU)
and ``chunked`` forced onto it; the fused kernels are CPU code.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

import l2o
import tasks
from l2o import checkpoint
from l2o.fast import make_backend, native
from l2o.fast import plan as plan_mod
from l2o.fast.backend import fused_kernels
from l2o.layout import tensor_layout

STEPS = 24
BACKENDS = ("forward", "chunked", "fused")
DEVICE = torch.device(os.environ.get("L2O_TEST_DEVICE", "cpu"))

# Step -> fault: what is done to the gradients the optimizer gets at that step
# (tensor picked by _fault_tensor). "none" is a tensor without a gradient.
FAULTS = {3: "nan", 7: "inf", 10: "overflow", 13: "none", 16: "all_nan"}
WARNS = {"nan", "inf", "overflow", "all_nan"}

# Tolerances, as fractions of the reference's own scale (see _compare; parameters
# and updates also get the float32 rounding units of _error). Worst seen over
# every case here, slow ones included (x86-64 AVX2, gcc -march=native, one
# thread): parameters 2.8e-5, update 3.8e-5 (1.7e-5 for the shipped weights),
# m 5.5e-7, v 6.6e-7 (the gradients are identical), log_lr 5.1e-6. A wrong
# constant in one term of one backend shows as 1e-3 to 1e-1.
PARAM_TOL = 2e-4     # of the tensor's displacement from its initial value
UPDATE_TOL = 3e-4    # of the step's largest update entry of the tensor
STAT_TOL = 5e-6      # of the largest |m| / |v| entry of the tensor
LOG_LR_TOL = 5e-5    # absolute (log_lr is O(1))


# ----------------------------------------------------------------- backends
def fused_expected() -> bool:
    """Whether this machine should have the fused kernels: it has a C compiler."""
    return native.compiler() is not None


def machine_backends(device: torch.device = DEVICE) -> list[str]:
    if device.type != "cpu":
        return ["forward", "chunked"]
    return [b for b in BACKENDS if b != "fused" or fused_expected()]


class _Route:
    """Spies on an optimizer's backend: which implementation each step ran."""

    def __init__(self, opt):
        self.forward_calls, self.run_steps, self.kernel_calls = 0, 0, Counter()
        lopt, backend = opt.lopt, opt.backend
        forward = lopt.forward

        def counted_forward(*args, **kwargs):
            self.forward_calls += 1
            return forward(*args, **kwargs)
        lopt.forward = counted_forward
        if backend.per_tensor:
            step_entries = backend.step_entries

            def counted_step_entries(*args, **kwargs):
                self.run_steps += 1
                return step_entries(*args, **kwargs)
            backend.step_entries = counted_step_entries
        if backend.kernels is not None:
            backend.kernels.lib = _CountingLibrary(backend.kernels.lib, self.kernel_calls)

    def check(self, backend: str, opt, steps_taken: int) -> None:
        assert opt.backend.name == backend, f"asked for {backend}, the optimizer runs {opt.backend.name}"
        if backend == "forward":
            assert self.run_steps == 0 and not self.kernel_calls
            assert self.forward_calls == steps_taken
            return
        assert self.forward_calls == 0, f"{backend}: a step went through the differentiable forward"
        assert self.run_steps == steps_taken
        if backend == "chunked":
            assert not self.kernel_calls, f"chunked: the C kernels ran ({dict(self.kernel_calls)})"
            return
        network = ("l2o_gmn_pass",) if opt.lopt.kind == "gmn" else ("l2o_mlp_step",)
        # no l2o_apply: the fused read-outs apply the update to float32 parameters themselves
        for name in ("l2o_stats", *network):
            assert self.kernel_calls[name] > 0, f"fused: kernel {name} never ran ({dict(self.kernel_calls)})"


class _CountingLibrary:
    def __init__(self, lib, calls: Counter):
        self._lib, self._calls = lib, calls

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def call(*args):
            self._calls[name] += 1
            return fn(*args)
        return call


# -------------------------------------------------------------- trajectories
@dataclass(frozen=True)
class Case:
    family: str
    seed: int
    chunk: int | None = None        # plan.DEFAULT_CHUNK for the chunked backends (None: the default)
    groups: bool = False            # two groups (one with lr 0.5 and weight decay) and a tensor in none

    @property
    def task(self) -> tasks.Task:
        return tasks.sample_task(self.family, self.seed, "heldout" if self.family == "conv1d" else "train")

    def __str__(self) -> str:
        return f"{self.family}{self.seed}-chunk{self.chunk or 'default'}{'-groups' if self.groups else ''}"


@dataclass
class Trajectory:
    names: list[str]
    params: list[list[torch.Tensor]] = field(default_factory=list)   # [step][tensor], step 0: initial
    states: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)  # after each step
    warned: list[bool] = field(default_factory=list)
    grads: list[list[torch.Tensor | None]] = field(default_factory=list)  # what the optimizer got


def _fault_tensor(num_tensors: int, step: int) -> int:
    """Never the last tensor: with ``Case.groups`` it is in no group (never stepped, never warned about)."""
    return (7 * step + 1) % max(1, num_tensors - 1)


def _inject(fault: str | None, step: int, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    if fault is None:
        return grads
    if fault == "all_nan":
        return [None if g is None else torch.full_like(g, float("nan")) for g in grads]
    k = _fault_tensor(len(grads), step)
    grads = list(grads)
    if fault == "none":
        grads[k] = None
    elif grads[k] is not None:
        g = grads[k].clone()
        g.view(-1)[g.numel() // 2] = {"nan": float("nan"), "inf": float("inf"), "overflow": 1e30}[fault]
        grads[k] = g
    return grads


def _make_optimizer(kind: str, task: tasks.Task, model: torch.nn.Module, lopt, groups: bool, impl: str):
    named = list(model.named_parameters())
    params = model
    if groups:  # the first third in a group of its own, the last tensor in no group
        third = max(1, len(named) // 3)
        params = [{"params": [p for _, p in named[:third]], "lr": 0.5, "weight_decay": 0.1},
                  {"params": [p for _, p in named[third:-1]]}]
    if kind == "gmn":
        example = tuple(x.to(DEVICE) for x in task.example_inputs())
        return l2o.GMNOptimizer(params, weights=lopt, example_inputs=example,
                                model=model if groups else None, impl=impl)
    return l2o.MLPOptimizer(params, weights=lopt, model=model if groups else None, impl=impl)


def run_trajectory(monkeypatch, case: Case, kind: str, backend: str, lopt="pretrained",
                   replay: Trajectory | None = None) -> Trajectory:
    """``STEPS`` steps of the optimizer on ``backend``: on the task's data with
    the faults of ``FAULTS`` (``replay=None``), or fed ``replay``'s gradients."""
    if case.chunk is not None:
        monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK", case.chunk)
    task = case.task
    model = task.init(0).to(DEVICE)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    opt = _make_optimizer(kind, task, model, lopt, case.groups, backend)
    route = _Route(opt)
    traj = Trajectory(names)
    traj.params.append([p.detach().clone() for p in params])
    batches = task.batches("train", seed=0, device=DEVICE) if replay is None else None
    taken = 0
    for t in range(STEPS):
        if replay is None:
            opt.zero_grad()
            task.loss(model, next(batches)).backward()
            grads = _inject(FAULTS.get(t), t, [p.grad for p in params])
        else:
            grads = replay.grads[t]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        traj.grads.append([None if g is None else g.clone() for g in grads])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        messages = [str(w.message) for w in caught]
        assert not any("produced non-finite updates" in m for m in messages), messages
        traj.warned.append(any("non-finite gradient" in m for m in messages))
        taken += FAULTS.get(t) != "all_nan"
        traj.params.append([p.detach().clone() for p in params])
        traj.states.append({n: {k: v.clone() for k, v in opt.state[p].items()}
                            for n, p in zip(names, params) if p in opt.state})
    route.check(backend, opt, taken)
    return traj


def _skipped(traj: Trajectory, t: int) -> set[int]:
    """Tensors the optimizer must have left alone at step ``t`` (a fault, or no gradient)."""
    return {k for k, g in enumerate(traj.grads[t]) if g is None or not bool(torch.isfinite(g * g).all())}


def _error(got: torch.Tensor, ref: torch.Tensor, scale: float, ulps_of: torch.Tensor | None = None,
           ulps: float = 0.0) -> float:
    """``max |got - ref|`` as a fraction of ``scale``, less ``ulps`` float32
    rounding units of ``ulps_of`` per entry: a parameter is stored in float32,
    so two updates that differ by far less than a unit of the parameter can
    round it one unit apart (on a tensor whose updates are small next to its
    entries, that unit is ~1e-4 of an update)."""
    if not got.numel():
        return 0.0
    diff = (got.double() - ref.double()).abs()
    if ulps_of is not None:
        diff = (diff - ulps * _EPS * ulps_of.double().abs()).clamp(min=0.0)
    diff = float(diff.max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


_EPS = torch.finfo(torch.float32).eps


def _compare(ref: Trajectory, got: Trajectory, label: str) -> dict[str, float]:
    """Asserts ``got`` follows ``ref``; returns the worst relative errors seen."""
    worst = Counter()

    def check(what: str, t: int, name: str, err: float, tol: float) -> None:
        worst[what] = max(worst[what], err)
        assert err <= tol, f"{label}: {what} of {name} at step {t} differs by {err:.2e} of its scale (tol {tol:.0e})"

    for t in range(STEPS):
        assert got.warned[t] == ref.warned[t] == (FAULTS.get(t) in WARNS), f"{label}: warning at step {t}"
        skipped = _skipped(ref, t)
        assert skipped == _skipped(got, t)
        for k, name in enumerate(ref.names):
            p0, before, after, ref_before, ref_after = (
                ref.params[0][k], got.params[t][k], got.params[t + 1][k], ref.params[t][k], ref.params[t + 1][k])
            if k in skipped:
                assert torch.equal(after, before), f"{label}: {name} moved at step {t}, where it was skipped"
                if t > 0 and name in got.states[t]:
                    for key, value in got.states[t][name].items():
                        assert torch.equal(value, got.states[t - 1][name][key]), f"{label}: {name} state {key}"
            # rounding a parameter to float32 may differ by a unit per step, and those units persist
            check("parameters", t, name, _error(after, ref_after, float((ref_after - p0).abs().max()),
                                                ref_after, t + 1), PARAM_TOL)
            check("update", t, name, _error(after - before, ref_after - ref_before,
                                            float((ref_after - ref_before).abs().max()), ref_after, 2), UPDATE_TOL)
        assert got.states[t].keys() == ref.states[t].keys()
        for name, state in ref.states[t].items():
            assert state.keys() == got.states[t][name].keys()
            assert torch.equal(got.states[t][name]["step"], state["step"]), f"{label}: {name} step at {t}"
            for key in ("m", "v"):
                check(key, t, name, _error(got.states[t][name][key], state[key], float(state[key].abs().max())),
                      STAT_TOL)
            if "log_lr" in state:
                check("log_lr", t, name, _error(got.states[t][name]["log_lr"], state["log_lr"], 1.0), LOG_LR_TOL)
    return dict(worst)


def check_backends_agree(monkeypatch, case: Case, kind: str, lopt="pretrained") -> dict[str, dict[str, float]]:
    ref = run_trajectory(monkeypatch, case, kind, "forward", lopt)
    assert any(ref.warned) and not torch.equal(ref.params[-1][0], ref.params[0][0])
    errors = {}
    for backend in machine_backends()[1:]:
        got = run_trajectory(monkeypatch, case, kind, backend, lopt, replay=ref)
        errors[backend] = _compare(ref, got, f"{kind} on {case}, {backend} vs forward")
    return errors


# -------------------------------------------------------------------- tests
def test_this_machine_has_every_backend_it_should(monkeypatch):
    """Fails, not skips, where a compiler is present but the kernels do not
    build or load; skips only on a machine without a C compiler."""
    monkeypatch.setenv("L2O_NATIVE", "1")
    if not fused_expected():
        pytest.skip("no C compiler on this machine: the fused backend is not expected")
    for kind in ("gmn", "mlp"):
        lopt = checkpoint.load_pretrained(kind)
        assert fused_kernels(lopt, "cpu") is not None, f"{kind}: {native.status()}"


# Quick cases: every layer kind the samplers produce that matters to the
# step (dense, conv with spatial edges, residual, attention, recurrent),
# chunks of 5 entries (runs of single rows, many runs per tensor), 37 and
# the default (one run per tensor), two with param groups.
QUICK = [Case("mlp", 3, chunk=5), Case("cnn", 1, chunk=37, groups=True), Case("resnet", 0, chunk=5),
         Case("transformer", 1, groups=True), Case("rnn", 2, chunk=37)]
# Slow cases: every family once more, on another seed, with the chunk sizes and
# param groups taken in turn. (The full product, 3 seeds x 3 chunk sizes per
# family, was ~100 trajectories: most of `make test`'s time, issue 17.)
def _rotated(i: int, family: str) -> Case:
    seed, chunk = (i + 1) % 3, (37, None, 5)[i % 3]
    if any(q.family == family and q.seed == seed for q in QUICK):
        seed = (seed + 1) % 3
    if chunk == 5 and Case(family, seed).task.num_params() > 3_000:
        chunk = 37   # tiny chunks cost a Python loop per 5 entries
    return Case(family, seed, chunk=chunk, groups=i % 2 == 0)


SLOW = [case for case in (_rotated(i, f) for i, f in enumerate(tasks.FAMILIES)) if case not in QUICK]


def _params(cases, slow: bool):
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(c, id=str(c), marks=marks) for c in cases]


@pytest.mark.parametrize("kind", ["gmn", "mlp"])
@pytest.mark.parametrize("case", _params(QUICK, False) + _params(SLOW, True))
def test_shipped_optimizers_follow_the_same_trajectory_on_every_backend(monkeypatch, case, kind):
    """The shipped metanetworks (per-tensor ``adapt`` controller on) on task-sampler models."""
    check_backends_agree(monkeypatch, case, kind)


def _other_width(kind: str, seed: int, **widths) -> l2o.LearnedOptimizer:
    """The shipped configuration at other widths, weights scrambled away from
    the near-zero output initialisation so the learned terms matter."""
    lopt = checkpoint.make_lopt(kind, **{**checkpoint.load_pretrained(kind).config(), **widths})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lopt.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return lopt


# The widths matter to the kernels' register blocks, not to the model: the quick
# widths run on both tasks, the slow ones on one each, taken in turn.
WIDTH_TASKS = (Case("conv1d", 1, chunk=37), Case("transformer", 0, groups=True))
WIDTHS = [  # (kind, widths, slow): not multiples of the kernels' register blocks, 1-3 rounds, relative updates
    ("gmn", dict(node_dim=12, edge_dim=6, hidden=5, num_layers=3), False),
    ("gmn", dict(node_dim=16, edge_dim=4, hidden=8, num_layers=1, relative=True), False),
    ("mlp", dict(hidden=7, relative=True), False),
    ("gmn", dict(node_dim=48, edge_dim=16, hidden=32, num_layers=2), True),
    ("gmn", dict(node_dim=8, edge_dim=3, hidden=1, num_layers=2, relative=True), True),
    ("mlp", dict(hidden=64), True),
    ("mlp", dict(hidden=1), True),
]


@pytest.mark.parametrize("kind, widths, cases", [
    pytest.param(kind, w, WIDTH_TASKS[i % 2:i % 2 + 1] if slow else WIDTH_TASKS,
                 id=f"{kind}-" + "-".join(f"{k}{v}" for k, v in w.items()),
                 marks=[pytest.mark.slow] if slow else []) for i, (kind, w, slow) in enumerate(WIDTHS)])
def test_metanetworks_of_other_widths_follow_the_same_trajectory(monkeypatch, kind, widths, cases):
    lopt = _other_width(kind, 0, **widths)
    for case in cases:
        check_backends_agree(monkeypatch, case, kind, lopt)


def test_the_flat_no_grad_step_follows_the_forward(monkeypatch):
    """Each backend's flat form (``step_flat``) against ``forward`` over a
    trajectory with per-entry step counts that differ between tensors and the
    controller on."""
    task = Case("cnn", 1).task
    model = task.init(0)
    graph = l2o.build_graph(model, task.example_inputs())
    flat = graph.gather([p.detach() for p in model.parameters()])
    counts = torch.tensor([float(k % 3) for k in range(graph.num_tensors)])[graph.tensor_id]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(flat.shape, generator=g) * (1 + 0.1 * t) for t in range(STEPS)]
    for kind, layout in (("gmn", graph), ("mlp", tensor_layout(graph.param_shapes))):
        lopt = _other_width(kind, 1).requires_grad_(False)
        x = layout.gather(graph.scatter(flat))
        results = {}
        for backend in machine_backends():
            step = make_backend(lopt, layout, x.device, backend)
            assert step.name == backend and (step.kernels is not None) == (backend == "fused"), native.status()
            p, state = x.clone(), dict(lopt.init_state(x), entry_step=layout.gather(graph.scatter(counts)))
            for t in range(STEPS):
                with torch.no_grad():
                    update, state = step.step_flat(p, layout.gather(graph.scatter(grads[t])), state)
                p = p + update
            results[backend] = p, state
        p_ref, s_ref = results["forward"]
        for backend in machine_backends()[1:]:
            p_got, s_got = results[backend]
            assert _error(p_got, p_ref, float((p_ref - x).abs().max())) <= PARAM_TOL, (kind, backend)
            for key in ("m", "v"):
                assert _error(s_got[key], s_ref[key], float(s_ref[key].abs().max())) <= STAT_TOL, (kind, backend, key)
            assert _error(s_got["log_lr"], s_ref["log_lr"], 1.0) <= LOG_LR_TOL, (kind, backend)

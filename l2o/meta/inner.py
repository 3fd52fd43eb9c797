"""One inner training run and its K-step functional unroll.

The inner problem is trained functionally: the model's parameters are one flat
tensor laid out by the task's ParamGraph, the loss is
``task.loss_fn(module)(params_dict, buffers, batch)`` and the learned optimizer
maps (params, grad, state) to an update. When the metanetwork's weights
require grad, the parameters after each update depend on them, so the losses
along the unroll can be backpropagated into the metanetwork (truncated BPTT).

Batches: each unroll draws from a stream seeded by ``(data_seed, step at the
start of the unroll)``, so a run's batches are a pure function of its counters
and of where its truncations fall (exact resume, since checkpoints sit on
truncation boundaries, and ES can replay the same batches for every
perturbation). Two unrolls of K steps and one of 2K therefore see different
(equally distributed) batches.

Cost: one forward/backward of the task per inner step. The loss at the new
parameters is both a meta-loss term and the source of the next gradient (its
batch was not used to produce those parameters, so the term is on a fresh
batch); the gradient of the last step is carried into the next unroll rather
than recomputed.

With ``meta_data: valid`` the meta-loss term is instead the loss at the new
parameters on a batch of the inner task's *held-out* data (one extra forward
per step), while the gradient the optimizer sees still comes from training
batches. An optimizer meta-trained on training loss is rewarded for fitting
the training batches at any cost (FINDINGS: inflated normalisation gains and
logits); on held-out batches it is rewarded only for what generalises
(Metz et al. 2019).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import MetaConfig
from .tasks_pool import TaskEntry, TaskPool, draw_spec


@dataclass
class InnerRun:
    slot: int                 # meta-batch slot this run occupies
    index: int                # how many runs this slot has started (seeds the task draw)
    spec: str                 # task spec (see tasks_pool)
    init_seed: int
    length: int               # inner steps before the run ends and a new task is drawn
    step: int = 0
    init_loss: float = float("nan")     # loss at the initial parameters (normalises the meta-loss)
    last_loss: float = float("nan")     # loss at the current parameters
    params: Tensor | None = None        # flat, detached
    buffers: dict[str, Tensor] = field(default_factory=dict)   # BatchNorm running stats etc.
    lopt_state: dict[str, Tensor] = field(default_factory=dict)
    grad: Tensor | None = None          # gradient at ``params`` on batch ``step`` (carried)
    # PES only: per antithetic pair, the two perturbed copies of the state above and the
    # accumulated noise: [{"+": state, "-": state, "xi": {weight name: Tensor}}]
    particles: list = field(default_factory=list)

    @property
    def data_seed(self) -> int:
        return self.init_seed ^ 0x5EED

    def tensors(self) -> dict[str, Tensor]:
        """Tensor part of the state, for checkpoints."""
        out = state_tensors(self.state())
        for j, pair in enumerate(self.particles):
            for sign in ("+", "-"):
                for name, value in state_tensors(pair[sign]).items():
                    out[f"pes.{j}.{sign}.{name}"] = value
            out.update({f"pes.{j}.xi.{n}": v for n, v in pair["xi"].items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def scalars(self) -> dict:
        return {"slot": self.slot, "index": self.index, "spec": self.spec, "init_seed": self.init_seed,
                "length": self.length, "step": self.step, "init_loss": self.init_loss,
                "last_loss": self.last_loss}

    @classmethod
    def restore(cls, scalars: dict, tensors: dict[str, Tensor], device) -> "InnerRun":
        run = cls(**scalars)
        own = {k: v for k, v in tensors.items() if not k.startswith("pes.")}
        st = state_from_tensors(own, device)
        run.params, run.grad, run.buffers, run.lopt_state = st["params"], st["grad"], st["buffers"], st["lopt_state"]
        pes: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("pes."):
                _, j, part, name = key.split(".", 3)
                pes.setdefault(int(j), {}).setdefault(part, {})[name] = value
        run.particles = [{"+": state_from_tensors(pes[j]["+"], device), "-": state_from_tensors(pes[j]["-"], device),
                          "xi": {n: v.to(device) for n, v in pes[j]["xi"].items()}} for j in sorted(pes)]
        return run

    def state(self) -> dict:
        """The carried inner state (what a PES particle holds a perturbed copy of)."""
        return {"params": self.params, "grad": self.grad, "buffers": self.buffers, "lopt_state": self.lopt_state}

    def with_state(self, st: dict) -> "InnerRun":
        """This run (same task, step, batches) with another carried state."""
        return InnerRun(slot=self.slot, index=self.index, spec=self.spec, init_seed=self.init_seed,
                        length=self.length, step=self.step, init_loss=self.init_loss, last_loss=self.last_loss,
                        params=st["params"], grad=st["grad"], buffers=st["buffers"], lopt_state=st["lopt_state"])


def state_tensors(st: dict) -> dict[str, Tensor]:
    out = {"params": st["params"], "grad": st["grad"]}
    out.update({f"buffer.{k}": v for k, v in st["buffers"].items()})
    out.update({f"lopt_state.{k}": v for k, v in st["lopt_state"].items()})
    return out


def state_from_tensors(tensors: dict[str, Tensor], device) -> dict:
    return {"params": tensors["params"].to(device), "grad": tensors["grad"].to(device),
            "buffers": {k[len("buffer."):]: v.to(device) for k, v in tensors.items() if k.startswith("buffer.")},
            "lopt_state": {k[len("lopt_state."):]: v.to(device) for k, v in tensors.items()
                           if k.startswith("lopt_state.")}}


def start_run(pool: TaskPool, task_pool_specs: list[str], lopt, seed: int, slot: int, index: int,
              length: int) -> InnerRun:
    """A fresh run: draw a task, initialise the model, compute the first gradient."""
    spec, init_seed = draw_spec(task_pool_specs, seed, slot, index)
    return new_run(pool, spec, init_seed, lopt, slot, index, length)


def new_run(pool: TaskPool, spec: str, init_seed: int, lopt, slot: int, index: int, length: int) -> InnerRun:
    """A fresh run of task ``spec`` from ``task.init(init_seed)``, with its first gradient."""
    entry = pool.get(spec)
    model = entry.task.init(init_seed)
    params = entry.graph.gather([p.detach() for p in model.parameters()]).to(pool.device)
    run = InnerRun(slot=slot, index=index, spec=spec, init_seed=init_seed, length=length, params=params,
                   buffers={k: b.detach().clone().to(pool.device) for k, b in model.named_buffers()},
                   lopt_state=lopt.init_state(params))
    batch = next(batch_stream(entry, run, pool.device))
    loss, run.grad = loss_and_grad(entry, run.params, run.buffers, batch, meta=False)
    run.init_loss = run.last_loss = float(loss)
    return run


def batch_stream(entry: TaskEntry, run: InnerRun, device, split: str = "train"):
    # A new stream per (run, step): batches depend only on the run's counters.
    salt = 0 if split == "train" else 0x7E57
    seed = ((run.data_seed ^ salt) * 1_000_003 + run.step) % (2**63)
    return entry.task.batches(split, seed=seed, device=device)


def loss_and_grad(entry: TaskEntry, flat: Tensor, buffers: dict[str, Tensor], batch,
                  meta: bool, second_order: bool = False) -> tuple[Tensor, Tensor]:
    """Loss at ``flat`` and its gradient w.r.t. ``flat``.

    ``meta``: ``flat`` is part of the meta-graph; keep the loss differentiable
    (it is a meta-loss term) and, unless second order, detach the gradient --
    the learned optimizer sees it as an input, which drops the expensive and
    notoriously unstable second-order path (Metz et al. 2019).
    """
    if meta and flat.requires_grad:
        # Second order differentiates the attention backward again: only the math SDPA
        # kernel supports that (the fused CPU/CUDA kernels' backward is not differentiable).
        with sdpa_kernel(SDPBackend.MATH) if second_order else contextlib.nullcontext():
            loss = entry.loss_fn(dict(zip(entry.graph.param_names, entry.graph.scatter(flat))), buffers, batch)
            (grad,) = torch.autograd.grad(loss, flat, retain_graph=True, create_graph=second_order)
        return loss, (grad if second_order else grad.detach())
    with torch.enable_grad():
        leaf = flat.detach().requires_grad_(True)
        loss = entry.loss_fn(dict(zip(entry.graph.param_names, entry.graph.scatter(leaf))), buffers, batch)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def meta_term(loss: Tensor, init_loss: float, objective: str, log_floor: float = 0.0) -> Tensor:
    """One unroll step's contribution to the meta-loss.

    ``norm`` (default) divides by the run's initial loss: tasks with losses of
    very different scales (cross-entropy ~2, MSE ~0.01) then weigh alike, and
    unlike ``log`` it does not blow up the gradient of tasks that are nearly
    solved (d log L = dL / L).

    ``log`` is ``log(L + f L_0)`` with ``f = log_floor`` (0: plain ``log L``):
    a 10% reduction weighs alike at every stage until the loss is ~f times its
    initial value, after which further progress earns nothing. Without the floor
    the objective keeps rewarding ever-larger relative progress on a task that is
    already solved (the suspected source of late-run loss spikes; the floor
    delayed them but did not remove them: docs/experiments.md, v8 and v9).
    """
    if objective == "norm":
        return loss / max(init_loss, 1e-8)
    if objective == "log":
        return torch.log(loss.clamp(min=1e-8) + log_floor * init_loss)
    return loss


@dataclass
class UnrollResult:
    meta_loss: Tensor         # mean meta-loss term over the steps taken (differentiable when meta)
    steps: int                # inner steps taken
    diverged: bool            # loss non-finite or > diverge_factor x initial: reset the run
    finished: bool            # the run reached its length: draw a new task
    final: dict               # the run's state after the unroll (detached), see advance()
    nonfinite_pairs: int = 0  # ES/PES: antithetic pairs dropped from the estimate (non-finite loss)


class _Unrolling:
    """One run's working state during an unroll: what each step does after
    the learned optimizer has produced its update, and the result at the end.
    Shared by :func:`unroll` (one run) and :func:`unroll_batch` (several)."""

    def __init__(self, run: InnerRun, entry: TaskEntry, k: int, cfg: MetaConfig, device, meta: bool):
        self.run, self.entry, self.cfg, self.device, self.meta = run, entry, cfg, device, meta
        self.second_order = cfg.second_order
        self.flat, self.grad, self.state = run.params, run.grad, run.lopt_state
        # ES evaluates the same run several times: BatchNorm stats are updated in place, so copy.
        self.buffers = {n: b.clone() for n, b in run.buffers.items()}
        self.stream = batch_stream(entry, run, device)
        next(self.stream)  # batch ``step`` produced the carried gradient; the unroll starts at the next one
        self.on_valid = cfg.meta_data == "valid"
        self.valid_stream = batch_stream(entry, run, device, split="test") if self.on_valid else None
        self.steps = min(k, run.length - run.step)
        self.terms: list[Tensor] = []
        self.losses: list[Tensor] = []

    def apply(self, update: Tensor, state: dict[str, Tensor]) -> None:
        """Take the step ``update`` (with the optimizer's new ``state``) and
        measure the new parameters."""
        entry, graph = self.entry, self.entry.graph
        self.state = state
        self.flat = self.flat + update
        # On held-out batches the training loss is no meta-loss term: its gradient
        # needs no meta-graph unless it is differentiated (second order).
        loss, self.grad = loss_and_grad(entry, self.flat, self.buffers, next(self.stream),
                                        meta=self.meta and (self.second_order or not self.on_valid),
                                        second_order=self.second_order)
        measured = loss
        if self.on_valid:
            # BatchNorm running statistics must not see held-out data: a throwaway copy.
            spare = {n: b.clone() for n, b in self.buffers.items()}
            measured = entry.loss_fn(dict(zip(graph.param_names, graph.scatter(self.flat))), spare,
                                     next(self.valid_stream))
        self.terms.append(meta_term(measured, self.run.init_loss, self.cfg.meta_objective,
                                     self.cfg.meta_log_floor))
        self.losses.append(loss.detach())

    def result(self) -> UnrollResult:
        # One host sync per unroll (not per step) to find where the run diverged, if it did:
        # non-finite loss, or above diverge_factor x its initial loss. Later terms are dropped
        # (and a non-finite one too, so one blown-up run does not void the whole meta-batch);
        # a large finite one is kept: it is the signal that these weights diverge. The caller
        # resets the run.
        run, terms = self.run, self.terms
        values = torch.stack(self.losses).tolist() if self.losses else []
        limit = self.cfg.diverge_factor * run.init_loss
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v) or v > limit), None)
        diverged = bad is not None
        if diverged:
            terms = terms[: bad + (1 if math.isfinite(values[bad]) else 0)]
        steps = len(values) if not diverged else bad + 1
        last_loss = values[steps - 1] if values else run.last_loss
        meta_loss = torch.stack(terms).mean() if terms else torch.zeros((), device=self.device)
        final = {"params": self.flat.detach(), "grad": self.grad.detach(), "buffers": self.buffers,
                 "lopt_state": {n: v.detach() for n, v in self.state.items()}, "steps": steps,
                 "last_loss": last_loss}
        return UnrollResult(meta_loss, steps, diverged, run.step + steps >= run.length, final)


def unroll(lopt, run: InnerRun, entry: TaskEntry, k: int, cfg: MetaConfig, device, meta: bool,
           params_override: dict | None = None) -> UnrollResult:
    """Up to ``k`` learned-optimizer steps of ``run`` (which is not modified).

    ``cfg``: its ``meta_objective``, ``meta_data``, ``second_order`` and
    ``diverge_factor`` decide what is measured and when the run has diverged.
    ``params_override``: metanetwork weights to use instead of its own
    (evolution strategies evaluates perturbed copies functionally).
    """
    call = (lambda *a: torch.func.functional_call(lopt, params_override, a)) if params_override else lopt
    u = _Unrolling(run, entry, k, cfg, device, meta)
    for _ in range(u.steps):
        u.apply(*call(entry.graph, u.flat, u.grad, u.state))
    return u.result()


def unroll_batch(lopt, runs: list[InnerRun], pool: TaskPool, k: int, cfg: MetaConfig, device,
                 meta: bool) -> list[UnrollResult]:
    """:func:`unroll` of several runs at once: each step is one metanetwork
    pass over the disjoint union of the runs' graphs
    (:class:`~l2o.graph.batch.BatchedGraph`), with each run's own step count
    in the time features and the Adam bias correction. Results equal those of
    :func:`unroll` run by run (to float rounding); the tasks' own forward and
    backward passes stay per run.

    A run that blows up to non-finite values mid-unroll can make the shared
    metanetwork gradient non-finite (0 x NaN in the union's backward) where
    :func:`unroll` would only drop that run's terms: the outer step is then
    skipped and counted, as for any non-finite meta-gradient.
    """
    us = [_Unrolling(run, pool.get(run.spec), k, cfg, device, meta) for run in runs]
    for j in range(max((u.steps for u in us), default=0)):
        active = [u for u in us if j < u.steps]
        union = pool.union(tuple(u.run.spec for u in active))
        counts = [torch.full((u.entry.graph.num_params,), 1.0, device=device) * u.state["step"] for u in active]
        state = {"m": union.join([u.state["m"] for u in active], dim=1),
                 "v": union.join([u.state["v"] for u in active]),
                 "step": torch.stack([u.state["step"] for u in active]),
                 "entry_step": union.join(counts)}
        if getattr(lopt, "adapt", False):  # a fresh run's state has no multipliers yet: zeros
            state["log_lr"] = union.join_tensors([u.state.get("log_lr", u.flat.new_zeros(u.entry.graph.num_tensors))
                                                  for u in active])
        update, state = lopt(union, union.join([u.flat for u in active]), union.join([u.grad for u in active]),
                             state)
        ms, vs = union.split(state["m"], dim=1), union.split(state["v"])
        log_lrs = union.split_tensors(state["log_lr"]) if "log_lr" in state else None
        for i, (u, du) in enumerate(zip(active, union.split(update))):
            u.apply(du, {"m": ms[i], "v": vs[i], "step": state["step"][i],
                         **({"log_lr": log_lrs[i]} if log_lrs is not None else {})})
    return [u.result() for u in us]


def advance(run: InnerRun, result: UnrollResult) -> InnerRun:
    """The run after the unroll (carrying params, optimizer state, gradient, step)."""
    f = result.final
    return InnerRun(slot=run.slot, index=run.index, spec=run.spec, init_seed=run.init_seed, length=run.length,
                    step=run.step + f["steps"], init_loss=run.init_loss, last_loss=f["last_loss"],
                    params=f["params"], buffers=f["buffers"], lopt_state=f["lopt_state"], grad=f["grad"],
                    particles=f.get("particles", run.particles))

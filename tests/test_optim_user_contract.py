"""The user-facing classes of l2o/optim.py, pinned where the mutation run
(docs/mutation.md) found them unchecked: which weights each ``weights=``
form loads, the wrappers ``unwrap_model`` sees through, the two call forms
and their errors, the MLPOptimizer's layout without a model, and the
ShardedGMNOptimizer, whose only other test spawns gloo processes (slow):
here its ranks are threads of the test process, joined by a stand-in for
the four ``torch.distributed`` calls it makes."""
import copy
import threading

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import l2o
from l2o import checkpoint
from l2o.fast import native
from l2o.fast import plan as plan_mod
from l2o.graph import UnsupportedModuleError
from l2o.optim import ShardedGMNOptimizer, unwrap_model
from lopt_helpers import seeded_weights


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _backward(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    F.cross_entropy(model(torch.randn(8, 6, generator=g)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()


def _step(model, opt, seed=1):
    opt.zero_grad()
    _backward(model, seed)
    opt.step()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- weights=

@pytest.mark.parametrize("cls,kind", [(l2o.GMNOptimizer, "gmn"), (l2o.MLPOptimizer, "mlp")])
def test_the_default_weights_are_the_shipped_ones_of_the_optimizers_kind(cls, kind):
    """``Opt(model)`` loads ``l2o/pretrained/<kind>.safetensors``, as
    ``weights="pretrained"`` does."""
    shipped = checkpoint.load_pretrained(kind)
    for opt in (cls(_model()), cls(_model(), weights="pretrained")):
        assert type(opt.lopt) is type(shipped) and opt.lopt.config() == shipped.config()
        assert _same_weights(opt.lopt, shipped)


@pytest.mark.parametrize("cls,kind", [(l2o.GMNOptimizer, "gmn"), (l2o.MLPOptimizer, "mlp")])
def test_weights_none_is_a_fresh_metanetwork_of_the_optimizers_kind(cls, kind):
    opt = cls(_model(), weights=None)
    fresh = checkpoint.make_lopt(kind)
    assert type(opt.lopt) is type(fresh) and opt.lopt.config() == fresh.config()
    assert not _same_weights(opt.lopt, checkpoint.load_pretrained(kind))


@pytest.mark.parametrize("cls,lopt_cls", [(l2o.GMNOptimizer, l2o.GMNLOpt), (l2o.MLPOptimizer, l2o.MLPLOpt)])
def test_a_metanetwork_module_is_copied_and_the_callers_left_as_it_was(cls, lopt_cls):
    """The optimizer freezes, casts and moves its own copy: the module passed
    (e.g. one being meta-trained) keeps training mode and gradients."""
    lopt = seeded_weights(lopt_cls(), seed=1, scale=0.05)
    before = copy.deepcopy(lopt)
    model = _model()
    opt = cls(model, weights=lopt)
    _step(model, opt)
    assert opt.lopt is not lopt and _same_weights(opt.lopt, lopt)
    assert lopt.training and all(p.requires_grad for p in lopt.parameters())
    assert not opt.lopt.training and not any(p.requires_grad for p in opt.lopt.parameters())
    assert _same_weights(lopt, before)


@pytest.mark.parametrize("form", ["str", "Path"])
@pytest.mark.parametrize("cls,kind,other", [(l2o.GMNOptimizer, "gmn", "mlp"), (l2o.MLPOptimizer, "mlp", "gmn")])
def test_a_weights_path_loads_that_file_and_refuses_the_other_kind(tmp_path, form, cls, kind, other):
    mine, theirs = tmp_path / f"{kind}.safetensors", tmp_path / f"{other}.safetensors"
    saved = seeded_weights(checkpoint.make_lopt(kind), seed=2, scale=0.05)
    checkpoint.save_lopt(saved, mine)
    checkpoint.save_lopt(checkpoint.make_lopt(other), theirs)
    as_form = str if form == "str" else (lambda path: path)
    opt = cls(_model(), weights=as_form(mine))
    assert _same_weights(opt.lopt, saved)
    with pytest.raises(ValueError, match=f"expected '{kind}'"):
        cls(_model(), weights=as_form(theirs))


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_weights_of_another_type_are_refused_naming_the_forms_and_the_type(cls):
    with pytest.raises(TypeError) as err:
        cls(_model(), weights=3)
    assert str(err.value) == "weights must be 'pretrained', None, a path or a LearnedOptimizer module, got int"


# ---------------------------------------------------------------- models, wrappers, call forms

def test_nested_wrappers_and_compiled_wrappers_are_unwrapped():
    model = _model()
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(nn.DataParallel(model))) is model
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    assert unwrap_model(nn.DataParallel(torch.compile(model))) is model


def test_a_module_attribute_named_like_compiles_is_not_a_wrapper_unless_it_holds_a_module():
    model = _model()
    model._orig_mod = "not a module"
    assert unwrap_model(model) is model


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_two_different_models_are_refused_naming_the_optimizer(cls):
    model, other = _model(), _model()
    name = cls.__name__
    with pytest.raises(ValueError) as err:
        cls(model.parameters(), weights=None, model=model, graph_model=other)
    assert str(err.value) == f"{name} got two different models (model= and graph_model=)"
    with pytest.raises(ValueError) as err:
        cls(model, weights=None, model=other)
    assert str(err.value) == f"{name} got two different models (as params and as model=)"
    with pytest.raises(ValueError) as err:
        cls(model, weights=None, graph_model=other)
    assert str(err.value) == f"{name} got two different models (as params and as model=)"


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_the_same_model_given_twice_wrapped_or_not_is_one_model(cls):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    for opt in (cls(model, weights=None, model=nn.DataParallel(model)),
                cls(nn.DataParallel(model), weights=None, graph_model=model),
                cls(model.parameters(), weights=None, model=model, graph_model=nn.DataParallel(model))):
        assert opt.graph.param_names == names
        assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == len(names)


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_graph_model_is_model_under_another_name(cls):
    """HF Trainer's form: the layout covers the whole model whatever the
    groups, so the parameters left out can be added later."""
    lopt = seeded_weights(l2o.GMNLOpt() if cls is l2o.GMNOptimizer else l2o.MLPLOpt(), seed=5, scale=0.05)
    model, twin = _model(), _model()
    opt = cls(model[0].parameters(), weights=lopt, graph_model=model)
    ref = cls(twin[0].parameters(), weights=lopt, model=twin)
    assert opt.graph.param_names == ref.graph.param_names == [n for n, _ in model.named_parameters()]
    opt.add_param_group({"params": model[2].parameters()})
    ref.add_param_group({"params": twin[2].parameters()})
    _step(model, opt)
    _step(twin, ref)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_a_gmn_without_a_model_is_refused_saying_how_to_call_it():
    with pytest.raises(TypeError) as err:
        l2o.GMNOptimizer(_model().parameters(), weights=None)
    assert str(err.value) == (
        "GMNOptimizer needs the model (an nn.Module) to build its parameter graph: "
        "GMNOptimizer(model) or GMNOptimizer(params, model=model); "
        "for a bare parameter list use l2o.MLPOptimizer")


def test_an_mlp_optimizer_over_nothing_is_refused():
    with pytest.raises(ValueError) as err:
        l2o.MLPOptimizer(nn.Sequential(nn.ReLU()), weights=None)
    assert str(err.value) == "MLPOptimizer got an empty parameter list"
    with pytest.raises(ValueError) as err:
        l2o.MLPOptimizer([{"params": []}], weights=None)
    assert str(err.value) == "MLPOptimizer got an empty parameter list"


def test_a_tensor_listed_twice_is_one_tensor_of_the_mlp_layout():
    """Tied weights listed once per module that uses them (an embedding tied
    to the output layer): one tensor of the layout, stepped once."""
    lopt = seeded_weights(l2o.MLPLOpt(), seed=6, scale=0.05)
    model, twin = _model(), _model()
    a, b = model[0].weight, model[0].bias
    with pytest.warns(UserWarning, match="duplicate"):        # torch.optim's own warning
        opt = l2o.MLPOptimizer([a, b, a], weights=lopt)
    ref = l2o.MLPOptimizer([twin[0].weight, twin[0].bias], weights=lopt)
    assert [tuple(s) for s in opt.graph.param_shapes] == [tuple(a.shape), tuple(b.shape)]
    _step(model, opt)
    _step(twin, ref)
    assert torch.equal(a, twin[0].weight) and torch.equal(b, twin[0].bias)


def test_the_graph_of_a_model_of_a_million_parameters_or_more_is_not_cached():
    """The builder's cache would keep a large model's graph, with its
    per-entry index tensors (32 bytes per parameter), alive beside the
    optimizer's lean copy: from 10**6 parameters on, the GMNOptimizer builds
    it uncached; smaller models keep the cache (a second optimizer reuses the
    graph)."""
    from l2o.graph import builder
    large = nn.Sequential(nn.Linear(1000, 1000, bias=False))          # 1,000,000
    small = nn.Sequential(nn.Linear(999, 1001, bias=False))           # 999,999
    l2o.GMNOptimizer(large, weights=None)
    l2o.GMNOptimizer(small, weights=None)
    assert builder._CACHE.get(large) is None
    assert builder._CACHE.get(small) is not None


# ---------------------------------------------------------------- ShardedGMNOptimizer

class ThreadRanks:
    """``torch.distributed``'s get_rank / get_world_size / all_reduce /
    broadcast for ranks that are threads of this process: each thread builds
    its own ShardedGMNOptimizer, the collectives meet at a barrier (sums in
    rank order, so every rank gets the same bits). Checks that every call
    names the optimizer's process group."""

    def __init__(self, world: int, group):
        self.world, self.group = world, group
        self.local = threading.local()
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots = [None] * world

    def _check(self, group):
        assert group is self.group, "a collective outside the optimizer's process group"

    def get_rank(self, group=None):
        self._check(group)
        return self.local.rank

    def get_world_size(self, group=None):
        self._check(group)
        return self.world

    def all_reduce(self, t, op=None, group=None, async_op=False):
        self._check(group)
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for s in self.slots[1:]:
            total += s
        self.barrier.wait()
        t.copy_(total)

    def reduce(self, t, dst=None, op=None, group=None, async_op=False):
        """The sum on ``dst`` (the other ranks' tensors: left as all_reduce leaves them)."""
        self.all_reduce(t, op=op, group=group)

    def get_global_rank(self, group, group_rank):
        self._check(group)
        return group_rank

    def broadcast(self, t, src, group=None, async_op=False):
        self._check(group)
        if self.local.rank == src:
            self.slots[src] = t.clone()
        self.barrier.wait()
        if self.local.rank != src:
            t.copy_(self.slots[src])
        self.barrier.wait()

    def run(self, fn):
        """``fn(rank)`` on every rank, each in its own thread; their results."""
        results, errors = [None] * self.world, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


@pytest.fixture
def thread_ranks(monkeypatch):
    """``thread_ranks(world)``: a ThreadRanks installed as torch.distributed."""
    def install(world: int) -> ThreadRanks:
        ranks = ThreadRanks(world, group=object())
        for name in ("get_rank", "get_world_size", "all_reduce", "reduce", "get_global_rank", "broadcast"):
            monkeypatch.setattr(dist, name, getattr(ranks, name))
        ranks.local.rank = 0    # the test's own thread: rank 0 (world 1 runs there)
        return ranks
    return install


def _sharded_impls():
    fused = native.enabled() and native.load(8, 8, 16) is not None
    return ["chunked", "fused"] if fused else ["chunked"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_sharded_step_equals_the_unsharded_one_with_threads_as_ranks(thread_ranks, monkeypatch, world, impl):
    """The in-process twin of test_optim_sharded.py's gloo test: the ranks
    split the entries (about equally, every entry owned once, a tensor cut
    between two ranks), each holds the
    statistics of its share only, and after three steps every rank's model
    equals the unsharded optimizer's, the ranks bit for bit; each state view
    covers the rank's part of its tensor, with the replicated controller
    multipliers of the unsharded optimizer. Groups: a frozen group and a
    tensor in no group (no state, never changed)."""
    if impl not in _sharded_impls():
        pytest.skip(native.status())
    monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK", 16)   # several runs per tensor and per shard
    ranks = thread_ranks(world)
    lopt = seeded_weights(l2o.GMNLOpt(adapt=True), seed=3, scale=0.05)

    def groups(model):
        return [{"params": [model[0].weight, model[2].weight], "weight_decay": 1e-2},
                {"params": [model[2].bias], "lr": 0.5}]     # model[0].bias: in no group

    def make():    # the second weight matrix [30, 70) is cut by the shard bounds at both worlds
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 8))

    ref_model = make()
    ref = l2o.GMNOptimizer(groups(ref_model), model=ref_model, weights=lopt, impl=impl)
    for seed in range(3):
        _step(ref_model, ref, seed)

    models = [make() for _ in range(world)]     # here: torch.manual_seed is global to the threads

    def rank_run(rank):
        model = models[rank]
        opt = ShardedGMNOptimizer(groups(model), model=model, weights=lopt, impl=impl,
                                  process_group=ranks.group)
        assert opt.backend.name == impl
        for seed in range(3):
            _step(model, opt, seed)
        owned = {id(p): opt.state[p] for p in model.parameters() if p in opt.state}
        return model, opt, owned

    results = ranks.run(rank_run)
    n = sum(p.numel() for p in ref_model.parameters())
    locals_ = [opt._flat_state["v"].numel() for _, opt, _ in results]
    assert sum(locals_) == n
    assert all(abs(k - n / world) <= 0.3 * n for k in locals_), locals_
    for _, opt, _ in results:
        assert opt._flat_state["m"].shape == (4, opt._flat_state["v"].numel())
    for model, _, _ in results:
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
        for p, q in zip(model.parameters(), results[0][0].parameters()):
            assert torch.equal(p, q)
    assert torch.equal(results[0][0][0].bias, make()[0].bias)     # in no group: never changed
    for k, (p, q) in enumerate(zip(results[0][0].parameters(), ref_model.parameters())):
        if k == 1:
            assert all(m[0].bias not in o.state for m, o, _ in results)
            continue
        covered = torch.zeros(p.numel(), dtype=torch.int64)
        for model, opt, owned in results:
            mine = list(model.parameters())[k]
            s, e = opt.state[mine]["shard"].tolist()
            assert 0 <= s <= e <= p.numel()   # within p, empty on a rank that owns none of it
            assert opt.state[mine]["m"].shape == (4, e - s) and opt.state[mine]["v"].shape == (e - s,)
            covered[s:e] += 1
            assert float(opt.state[mine]["step"]) == float(ref.state[q]["step"]) == 3.0
            torch.testing.assert_close(opt.state[mine]["log_lr"], ref.state[q]["log_lr"], rtol=1e-5, atol=1e-6)
            assert float(ref.state[q]["log_lr"]) != 0.0
            # the owned statistics are the unsharded optimizer's over the same entries
            torch.testing.assert_close(opt.state[mine]["v"], ref.state[q]["v"].reshape(-1)[s:e],
                                       rtol=1e-5, atol=1e-12)
            torch.testing.assert_close(opt.state[mine]["m"], ref.state[q]["m"].reshape(4, -1)[:, s:e],
                                       rtol=1e-5, atol=1e-12)
        assert torch.equal(covered, torch.ones_like(covered))


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_sharded_state_restores_per_rank_and_whole_at_any_world_size(thread_ranks, monkeypatch, tmp_path, impl):
    """Three steps on 2 ranks, then each rank's own state_dict() (through
    torch.save / torch.load) and the whole one full_state_dict() gathers on rank
    0 (the unsharded optimizer's, to float rounding): every restore -- per rank
    on 2 ranks, whole on 3 ranks, whole into an unsharded GMNOptimizer --
    continues for two more steps as the unsharded optimizer does uninterrupted.
    A shard restored on the wrong rank, or into an unsharded optimizer, is a
    ValueError that names the tensor."""
    if impl not in _sharded_impls():
        pytest.skip(native.status())
    monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK", 16)   # several runs per tensor and per shard
    lopt = seeded_weights(l2o.GMNLOpt(adapt=True), seed=3, scale=0.05)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 8))

    ref_model = make()
    ref = l2o.GMNOptimizer(ref_model, weights=lopt, impl=impl)
    for seed in range(3):
        _step(ref_model, ref, seed)
    ref_at_3 = ref.state_dict()
    for seed in range(3, 5):
        _step(ref_model, ref, seed)

    ranks = thread_ranks(2)
    models = [make() for _ in range(2)]

    def train_and_save(rank):
        opt = ShardedGMNOptimizer(models[rank], weights=lopt, impl=impl, process_group=ranks.group)
        for seed in range(3):
            _step(models[rank], opt, seed)
        torch.save(opt.state_dict(), tmp_path / f"rank{rank}.pt")
        return opt.full_state_dict()

    whole, nothing = ranks.run(train_and_save)
    assert nothing is None
    for i, p in enumerate(ref_model.parameters()):
        assert "shard" not in whole["state"][i]
        for name in ("m", "v", "log_lr"):
            torch.testing.assert_close(whole["state"][i][name], ref_at_3["state"][i][name], rtol=1e-4, atol=1e-8)
        assert float(whole["state"][i]["step"]) == 3.0

    def resume(world, state_of):
        ranks = thread_ranks(world)
        copies = [copy.deepcopy(models[0]) for _ in range(world)]

        def run(rank):
            opt = ShardedGMNOptimizer(copies[rank], weights=lopt, impl=impl, process_group=ranks.group)
            opt.load_state_dict(state_of(rank))
            for seed in range(3, 5):
                _step(copies[rank], opt, seed)
            return opt

        ranks.run(run)
        for model in copies:
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)

    resume(2, lambda rank: torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
    resume(3, lambda rank: whole)
    unsharded_model = copy.deepcopy(models[0])
    unsharded = l2o.GMNOptimizer(unsharded_model, weights=lopt, impl=impl)
    unsharded.load_state_dict(whole)
    for seed in range(3, 5):
        _step(unsharded_model, unsharded, seed)
    for p, q in zip(unsharded_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"optimizer state for '.*' is one rank's shard .*full_state_dict"):
        l2o.GMNOptimizer(copy.deepcopy(models[0]), weights=lopt, impl=impl).load_state_dict(rank0)
    ranks = thread_ranks(2)
    with pytest.raises(ValueError, match=r"one rank's shard .* this optimizer keeps"):
        ranks.run(lambda rank: ShardedGMNOptimizer(copy.deepcopy(models[0]), weights=lopt, impl=impl,
                                                   process_group=ranks.group).load_state_dict(rank0))


def test_sharded_optimizer_on_one_rank_is_the_unsharded_one(thread_ranks):
    """World 1 (the test's own thread): impl "auto" takes the chunked step
    (fused where the kernels build), and the step is the unsharded one."""
    ranks = thread_ranks(1)
    lopt = seeded_weights(l2o.GMNLOpt(), seed=4, scale=0.05)
    model, twin = _model(), _model()
    opt = ShardedGMNOptimizer(model, weights=lopt, weight_decay=1e-2, process_group=ranks.group)
    expected = "fused" if "fused" in _sharded_impls() else "chunked"
    assert opt.backend.name == expected
    ref = l2o.GMNOptimizer(twin, weights=lopt, weight_decay=1e-2, impl=expected)
    for seed in range(2):
        _step(model, opt, seed)
        _step(twin, ref, seed)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert opt.state[p]["shard"].tolist() == [0, p.numel()]


def _graph_changing_model():
    """Its forward branches on an input: the graph from a recorded run with
    ``example_inputs`` leaves the branch not taken unstructured; without them
    fx fails on the root (and strict=True refuses the model)."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(4, 3)

        def forward(self, x, flag):
            if flag.sum() > 0:
                return self.b(torch.relu(self.a(x)))
            return self.c(x)

    torch.manual_seed(0)
    return Branchy()


def test_sharded_optimizer_takes_gmn_optimizers_defaults_and_graph_options(thread_ranks):
    """Same defaults as GMNOptimizer (shipped weights, lr 1, no weight decay,
    non-strict graph), and ``example_inputs`` / ``strict`` reach the graph
    builder."""
    ranks = thread_ranks(1)
    model = _graph_changing_model()
    with pytest.warns(UserWarning, match="wiring"):
        opt = ShardedGMNOptimizer(model, process_group=ranks.group)
    assert _same_weights(opt.lopt, checkpoint.load_pretrained("gmn"))
    assert opt.param_groups[0]["lr"] == 1.0 and opt.param_groups[0]["weight_decay"] == 0.0
    # betas: stored for schedulers that cycle momentum (a documented no-op)
    opt = ShardedGMNOptimizer(model, weights=None, betas=(0.8, 0.95), process_group=ranks.group)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    inputs = (torch.randn(2, 4), torch.ones(1))
    opt = ShardedGMNOptimizer(model, weights=None, example_inputs=inputs, process_group=ranks.group)
    ref = l2o.GMNOptimizer(model, weights=None, example_inputs=inputs)
    assert opt.graph.unstructured == ref.graph.unstructured == ["c.weight", "c.bias"]
    with pytest.raises(UnsupportedModuleError):
        l2o.GMNOptimizer(_graph_changing_model(), weights=None, strict=True)
    with pytest.raises(UnsupportedModuleError):
        ShardedGMNOptimizer(_graph_changing_model(), weights=None, strict=True, process_group=ranks.group)


def test_sharded_optimizer_auto_takes_the_chunked_step_fused_where_the_kernels_build(thread_ranks, kernels):
    """World 1: the step is the unsharded one, and impl "auto" is the fused
    step with the C kernels, the chunked torch step without; the optimizer
    keeps the lean graph (no per-entry index tensors), as the unsharded one
    on the chunked step. A one-tensor model, group options given per group."""
    from l2o.fast.lean import LeanGraph
    ranks = thread_ranks(1)
    expected = "fused" if kernels == "native" else "chunked"
    lopt = seeded_weights(l2o.GMNLOpt(), seed=4, scale=0.05)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3, bias=False))
    twin = copy.deepcopy(model)
    opt = ShardedGMNOptimizer(model, weights=lopt, weight_decay=1e-2, lr=0.5, process_group=ranks.group)
    ref = l2o.GMNOptimizer(twin, weights=lopt, weight_decay=1e-2, lr=0.5, impl=expected)
    assert opt.backend.name == expected
    assert isinstance(opt.graph, LeanGraph) and isinstance(ref.graph, LeanGraph)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(2):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    p, q = model[0].weight, twin[0].weight
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert opt.state[p]["shard"].tolist() == [0, p.numel()]
    assert torch.equal(opt.state[p]["v"], ref.state[q]["v"].reshape(-1))


def test_sharded_optimizer_accepts_the_chunked_impls_and_refuses_others(thread_ranks):
    ranks = thread_ranks(1)
    for impl in _sharded_impls():
        assert ShardedGMNOptimizer(_model(), weights=None, impl=impl, process_group=ranks.group).backend.name == impl
    with pytest.raises(ValueError) as err:
        ShardedGMNOptimizer(_model(), weights=None, impl="forward", process_group=ranks.group)
    assert str(err.value) == "ShardedGMNOptimizer runs the chunked step: impl 'auto', 'chunked' or 'fused', got 'forward'"


def test_sharded_optimizer_groups_form_needs_the_model_like_gmn_optimizer(thread_ranks):
    ranks = thread_ranks(1)
    model = _model()
    with pytest.raises(TypeError, match="GMNOptimizer needs the model"):
        ShardedGMNOptimizer(model.parameters(), weights=None, process_group=ranks.group)
    opt = ShardedGMNOptimizer(model[0].parameters(), weights=None, graph_model=model, process_group=ranks.group)
    assert opt.graph.param_names == [n for n, _ in model.named_parameters()]
    assert set(opt.state) == set(model[0].parameters())


def test_sharded_optimizer_refuses_what_it_does_not_support_by_name(thread_ranks, to_meta_device):
    """A later add_param_group, a model moved after construction, sparse
    gradients, non-contiguous parameters: each a clear
    error naming the optimizer, before anything changes."""
    ranks = thread_ranks(1)
    model = _model()
    opt = ShardedGMNOptimizer(model[0].parameters(), weights=None, model=model, process_group=ranks.group)
    with pytest.raises(NotImplementedError) as err:
        opt.add_param_group({"params": model[2].parameters()})
    assert str(err.value) == "ShardedGMNOptimizer: add_param_group after construction is not supported"
    assert len(opt.param_groups) == 1

    w = model[0].weight
    before = w.detach().clone()
    w.data = w.data.t().contiguous().t()            # same shape and values, transposed strides
    _backward(model)
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == "ShardedGMNOptimizer needs contiguous parameters"
    assert torch.equal(w, before)

    emb = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    opt = ShardedGMNOptimizer(emb, weights=None, process_group=ranks.group)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    assert str(err.value) == "ShardedGMNOptimizer does not support sparse gradients"

    model = _model()
    opt = ShardedGMNOptimizer(model, weights=None, process_group=ranks.group)
    _step(model, opt)
    to_meta_device(model)
    with pytest.raises(NotImplementedError) as err:
        opt.step()
    assert str(err.value) == "ShardedGMNOptimizer: the model moved after the optimizer was built"


def test_sharded_optimizer_leaves_a_frozen_tensor_with_a_stale_gradient_alone(thread_ranks):
    """As GMNOptimizer: a tensor whose requires_grad was turned off keeps its
    values and state whatever its (stale) ``.grad`` holds."""
    ranks = thread_ranks(1)
    model = _model()
    opt = ShardedGMNOptimizer(model, weights=seeded_weights(l2o.GMNLOpt(), seed=7, scale=0.05), process_group=ranks.group)
    _step(model, opt)
    frozen = model[0].bias
    frozen.requires_grad_(False)
    frozen.grad = torch.ones_like(frozen)
    before, v_before = frozen.detach().clone(), opt.state[frozen]["v"].clone()
    _step(model, opt, seed=2)
    assert torch.equal(frozen, before) and torch.equal(opt.state[frozen]["v"], v_before)
    assert float(opt.state[frozen]["step"]) == 1.0 and float(opt.state[model[0].weight]["step"]) == 2.0


class _LayersInAPlainList(nn.Module):
    """The beginner's mistake: layers in a Python list are not registered."""

    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(4, 4), nn.Linear(4, 2)]

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_model_without_parameters_is_refused_by_name():
    with pytest.raises(ValueError, match="has no parameters .* nn.ModuleList"):
        l2o.GMNOptimizer(_LayersInAPlainList())
    with pytest.raises(ValueError, match="empty parameter list"):
        l2o.MLPOptimizer(_LayersInAPlainList())


def test_modules_given_as_parameters_are_refused_by_name():
    with pytest.raises(TypeError, match="params must be tensors .* got Linear; pass module.parameters"):
        l2o.MLPOptimizer([nn.Linear(2, 2)])
    model = _model()
    with pytest.raises(TypeError, match="Linear"):   # torch.optim's own check, as clear
        l2o.GMNOptimizer([model[0]], model=model)


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_building_with_loaded_weights_leaves_torchs_generator_alone(cls, tmp_path):
    """A seeded script draws the same data whichever optimizer it builds
    (the metanetwork's initial draws are overwritten by the loaded weights)."""
    model = _model()
    path = tmp_path / "lopt.safetensors"
    checkpoint.save_lopt(cls(model, weights=None).lopt, path)
    for weights in ("pretrained", path):
        torch.manual_seed(0)
        expected = torch.rand(4)
        torch.manual_seed(0)
        cls(model, weights=weights)
        assert torch.equal(torch.rand(4), expected), weights


def test_the_package_compiles_without_warnings():
    """No invalid escape sequences in docstrings (a SyntaxWarning on import from Python 3.12)."""
    import pathlib
    import warnings
    root = pathlib.Path(l2o.__file__).parent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for path in root.rglob("*.py"):
            compile(path.read_text(), str(path), "exec")


def test_building_for_a_reentrant_checkpointed_model_is_quiet():
    """The build runs the forward without autograd; torch's reentrant
    checkpoint would warn that no input requires a gradient (for the user's
    training it does), so the build silences that warning, and only it."""
    import warnings
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.b(checkpoint(lambda t: F.relu(self.a(t)), x, use_reentrant=True))

    model = Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = l2o.GMNOptimizer(model)
    assert not [w for w in caught if "requires_grad" in str(w.message)], [str(w.message) for w in caught]
    before = model.a.weight.detach().clone()
    model(torch.randn(4, 8, requires_grad=True)).pow(2).sum().backward()   # reentrant: an input needs a grad
    opt.step()
    assert not torch.equal(model.a.weight, before)

"""Contract of the code added for restoring a sharded optimizer
(``ShardedGMNOptimizer.full_state_dict`` / ``load_state_dict``,
``optim_state._flat_statistics`` with ``owned``), RNN cells stepped in a loop
(``layers/rnn.map_rnn_cell``), parametrized weights
(``state._alias_parametrized``) and the other graph changes of the same
session, pinned where their mutation run (docs/mutation.md) found them
unchecked: graphs against hand-worked expectations, restores against the
uninterrupted unsharded optimizer, collectives against torch.distributed's
own semantics (a reduce's sum lands on its destination only, named by global
rank)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import l2o
from graph_helpers import build, canonical, not_followed, part
from l2o.fast import plan as plan_mod
from l2o.graph import build_graph, register_module, unregister_module
from l2o.optim import ShardedGMNOptimizer
from lopt_helpers import seeded_weights
from test_optim_user_contract import ThreadRanks


def _edge_pos(g, name):
    i = g.param_names.index(name)
    return g.edge_pos[g.tensor_slices[g.flat_order.index(i)]].view(*g.param_shapes[i], 2)


# ------------------------------------------------------------------ RNN cells
class CellCall(nn.Module):
    """One step of ``cell`` on ``x`` from a state made by a Linear of ``z``
    (an encoder's final state), called positionally or by keyword, or with
    no state at all; the head reads ``h`` (or an LSTM cell's ``c``)."""

    def __init__(self, cell, how: str, read_c: bool = False):
        super().__init__()
        H = cell.hidden_size
        self.init, self.cell, self.head = nn.Linear(6, H), cell, nn.Linear(H, 2)
        self.how, self.read_c = how, read_c

    def forward(self, x, z):
        s = self.init(z)
        state = (s, s) if isinstance(self.cell, nn.LSTMCell) else s
        if self.how == "positional":
            out = self.cell(x, state)
        elif self.how == "keyword":
            out = self.cell(input=x, hx=state)
        else:                                       # "none": a zero state
            out = self.cell(x)
        if isinstance(out, tuple):
            out = out[1] if self.read_c else out[0]
        return self.head(out)


CELLS = {"lstm": (lambda: nn.LSTMCell(4, 3), 4), "gru": (lambda: nn.GRUCell(4, 3), 3),
         "rnn": (lambda: nn.RNNCell(4, 3), 1)}


@pytest.mark.parametrize("kind", list(CELLS))
def test_a_cell_called_by_keyword_is_the_cell_called_positionally(kind):
    """``cell(input=x, hx=state)`` reads its input and its given state as
    ``cell(x, state)`` does: the state's units (the init Linear's) are the
    cell's units."""
    make, G = CELLS[kind]
    x, z = torch.randn(2, 4), torch.randn(2, 6)
    graphs = {}
    for how in ("positional", "keyword"):
        torch.manual_seed(0)
        g = build(CellCall(make(), how), x, z)
        assert not_followed(g) == []
        units = part(g, "init.weight")[1][:, 0]
        assert torch.equal(part(g, "cell.weight_hh")[0], units.view(1, 3).expand(3 * G, 3))
        assert torch.equal(part(g, "cell.weight_ih")[1], units.repeat(G).view(3 * G, 1).expand(3 * G, 4))
        assert (g.node_type[part(g, "cell.weight_ih")[0]] == 0).all()      # the network input x
        assert g.num_nodes == 4 + 6 + 3 + 2
        graphs[how] = canonical(g)
    assert graphs["keyword"] == graphs["positional"]


@pytest.mark.parametrize("kind", list(CELLS))
def test_a_cell_called_without_a_state_has_units_of_its_own(kind):
    """``cell(x)`` (a zero state): the cell's units are new, one deeper than
    its input; the init Linear's are not merged with them."""
    make, G = CELLS[kind]
    torch.manual_seed(0)
    g = build(CellCall(make(), "none"), torch.randn(2, 4), torch.randn(2, 6))
    assert not_followed(g) == []
    h = part(g, "cell.weight_ih")[1][:3, 0]
    assert torch.equal(part(g, "cell.weight_ih")[1], h.repeat(G).view(3 * G, 1).expand(3 * G, 4))
    assert torch.equal(part(g, "cell.weight_hh")[0], h.view(1, 3).expand(3 * G, 3))
    assert torch.equal(part(g, "head.weight")[0], h.view(1, 3).expand(2, 3))
    assert not set(h.tolist()) & set(part(g, "init.weight")[1][:, 0].tolist())
    assert g.num_nodes == 4 + 6 + 3 + 3 + 2


@pytest.mark.parametrize("kind", list(CELLS))
def test_a_cells_recurrent_edges_sit_at_their_gates_offsets(kind):
    """As nn.LSTM/GRU's: row ``g*H + j`` of both weights at gate ``g``'s offset
    (``linspace(-1, 1, G)``, 0 for a single gate), second coordinate 0."""
    make, G = CELLS[kind]
    torch.manual_seed(0)
    g = build(CellCall(make(), "positional"), torch.randn(2, 4), torch.randn(2, 6))
    gate_x = torch.linspace(-1.0, 1.0, G) if G > 1 else torch.zeros(1)
    for name, cols in (("cell.weight_ih", 4), ("cell.weight_hh", 3)):
        pos = _edge_pos(g, name)
        assert torch.allclose(pos[..., 0], gate_x.repeat_interleave(3).view(3 * G, 1).expand(3 * G, cols))
        assert (pos[..., 1] == 0).all()


def test_an_lstm_cells_cell_state_carries_its_units():
    """The second output of an LSTMCell (``c``) is one set of the cell's
    units as ``h`` is: a head reading ``c`` reads the cell's units."""
    torch.manual_seed(0)
    g = build(CellCall(nn.LSTMCell(4, 3), "positional", read_c=True), torch.randn(2, 4), torch.randn(2, 6))
    assert not_followed(g) == []
    units = part(g, "cell.weight_ih")[1][:3, 0]
    assert torch.equal(part(g, "head.weight")[0], units.view(1, 3).expand(2, 3))
    assert g.num_nodes == 4 + 6 + 3 + 2


# ------------------------------------------------------------------ sharded restore
class GlobalRanks(ThreadRanks):
    """ThreadRanks whose group is the last ``world`` ranks of a larger job:
    group rank ``r`` is global rank ``r + offset`` (``get_global_rank``, which
    refuses a ``None`` group as torch.distributed does for an unregistered
    one); ``reduce`` leaves the sum on its ``dst`` (a global rank) only, the
    other ranks' tensors NaN (torch.distributed: unspecified). With
    ``group=None`` (the default group) global ranks are group ranks."""

    def __init__(self, world: int, group, offset: int):
        super().__init__(world, group)
        self.offset = offset if group is not None else 0
        self.dsts = []

    def get_global_rank(self, group, group_rank):
        if group is None or not isinstance(group_rank, int):
            raise ValueError(f"Group {group} is not registered / rank {group_rank!r}")
        self._check(group)
        return group_rank + self.offset

    def reduce(self, t, dst=None, op=None, group=None, async_op=False):
        self._check(group)
        assert dst is not None, "reduce without a destination"
        self.dsts.append(dst)
        mine = t.clone()
        self.all_reduce(t, op=op, group=group)
        if self.local.rank + self.offset != dst:
            t.copy_(torch.full_like(mine, float("nan")))


def _install(monkeypatch, ranks):
    for name in ("get_rank", "get_world_size", "all_reduce", "reduce", "get_global_rank", "broadcast"):
        monkeypatch.setattr(dist, name, getattr(ranks, name))
    ranks.local.rank = 0
    return ranks


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 8))


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(8, 6, generator=g)), torch.arange(8) % 8).backward()
    opt.step()


@pytest.mark.parametrize("group", ["new group", "default group"])
@pytest.mark.parametrize("to", [0, 1])
def test_the_whole_state_is_gathered_on_the_asked_rank_named_by_its_global_rank(monkeypatch, group, to):
    """``full_state_dict(to)``: a collective whose result lands on group rank
    ``to`` only (global rank ``to + 3`` in a group of the job's last ranks,
    ``to`` in the default group) and is the unsharded optimizer's state
    after the same steps; the other rank gets ``None``."""
    monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK", 16)
    lopt = seeded_weights(l2o.GMNLOpt(adapt=True), seed=3, scale=0.05)
    ref_model = _model()
    ref = l2o.GMNOptimizer(ref_model, weights=lopt, impl="chunked")
    for seed in range(2):
        _step(ref_model, ref, seed)
    want = ref.state_dict()

    ranks = _install(monkeypatch, GlobalRanks(2, object() if group == "new group" else None, offset=3))
    models = [_model() for _ in range(2)]

    def run(rank):
        opt = ShardedGMNOptimizer(models[rank], weights=lopt, impl="chunked", process_group=ranks.group)
        for seed in range(2):
            _step(models[rank], opt, seed)
        return opt.full_state_dict(to)

    got = ranks.run(run)
    assert got[1 - to] is None
    whole = got[to]
    assert set(ranks.dsts) == {to + ranks.offset}
    for i, p in enumerate(ref_model.parameters()):
        assert "shard" not in whole["state"][i]
        for name in ("m", "v", "log_lr"):
            torch.testing.assert_close(whole["state"][i][name], want["state"][i][name], rtol=1e-4, atol=1e-8)
        assert whole["state"][i]["m"].shape == (4, *p.shape)


def test_a_tensor_in_no_group_cut_between_ranks_restores_fresh_on_both(monkeypatch):
    """Groups leave the second weight matrix (entries [30, 70), cut by the
    shard bounds) in no group: a whole state dict restored on 2 ranks keeps
    each rank's part of the other tensors, none for it, and the next steps
    are the unsharded optimizer's."""
    monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK", 16)
    lopt = seeded_weights(l2o.GMNLOpt(adapt=True), seed=3, scale=0.05)

    def groups(model):
        return [{"params": [model[0].weight, model[0].bias, model[2].bias]}]

    ref_model = _model()
    ref = l2o.GMNOptimizer(groups(ref_model), model=ref_model, weights=lopt, impl="chunked")
    for seed in range(2):
        _step(ref_model, ref, seed)
    saved = copy.deepcopy(ref.state_dict())
    start = copy.deepcopy(ref_model)
    for seed in range(2, 4):
        _step(ref_model, ref, seed)

    ranks = _install(monkeypatch, GlobalRanks(2, object(), offset=0))
    copies = [copy.deepcopy(start) for _ in range(2)]

    def run(rank):
        opt = ShardedGMNOptimizer(groups(copies[rank]), model=copies[rank], weights=lopt, impl="chunked",
                                  process_group=ranks.group)
        w = copies[rank][2].weight
        cut = opt._owned(next(k for k, q in enumerate(opt._flat_params) if q is w))
        opt.load_state_dict(saved)
        for seed in range(2, 4):
            _step(copies[rank], opt, seed)
        return cut, opt._flat_state["v"].numel()

    results = ranks.run(run)
    # the weight in no group is cut: rank 1's part of it starts inside it
    assert results[0][0][1] == results[1][0][0] and results[0][0][0] < results[1][0][0] < results[1][0][1]
    assert sum(n for _, n in results) == sum(p.numel() for p in ref_model.parameters())
    for model in copies:
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def _one_rank(monkeypatch, lopt):
    """A ShardedGMNOptimizer on a group of one (this thread), after one step: its model and it."""
    _install(monkeypatch, GlobalRanks(1, None, offset=0))
    model = _model()
    opt = ShardedGMNOptimizer(model, weights=lopt, impl="chunked")
    _step(model, opt, 0)
    return model, opt


SHARD_MSG = ("optimizer state for '0.weight' is one rank's shard (entries [{}, {}) of the tensor), this optimizer "
             "keeps [0, 30): restore a shard on the same rank of the same world size, or save with "
             "ShardedGMNOptimizer.full_state_dict() to restore anywhere")


def test_a_shard_of_other_bounds_or_shapes_is_refused_naming_both_ranges(monkeypatch):
    """A saved shard must be exactly the part kept here: one of the same
    length at other bounds, or at the same bounds with ``m`` or ``v`` of
    another length (a damaged checkpoint), is a ValueError naming the tensor,
    the saved range and the kept one."""
    lopt = seeded_weights(l2o.GMNLOpt(), seed=3, scale=0.05)
    model, opt = _one_rank(monkeypatch, lopt)
    sd = opt.state_dict()
    assert sd["state"][0]["shard"].tolist() == [0, 30]

    def damaged(**change):
        bad = copy.deepcopy(sd)
        bad["state"][0].update(change)
        return bad

    cases = [(damaged(shard=torch.tensor([1, 31])), (1, 31)),
             (damaged(m=sd["state"][0]["m"][:, :29]), (0, 30)),
             (damaged(v=sd["state"][0]["v"][:29]), (0, 30))]
    for bad, (s, e) in cases:
        with pytest.raises(ValueError) as err:
            opt.load_state_dict(bad)
        assert str(err.value) == SHARD_MSG.format(s, e)


def test_a_shard_saved_in_another_dtype_is_restored_as_float32(monkeypatch):
    """The statistics are float32 whatever the saved shard's dtype (a
    checkpoint cast to float64 on the way): restored, the state is the saved
    one in float32, and the next step is the uninterrupted optimizer's."""
    lopt = seeded_weights(l2o.GMNLOpt(), seed=3, scale=0.05)
    model, opt = _one_rank(monkeypatch, lopt)
    sd = opt.state_dict()
    wide = copy.deepcopy(sd)
    for entry in wide["state"].values():
        entry["m"], entry["v"] = entry["m"].double(), entry["v"].double()
    twin = copy.deepcopy(model)
    other = ShardedGMNOptimizer(twin, weights=lopt, impl="chunked")
    other.load_state_dict(wide)
    for p, q in zip(twin.parameters(), model.parameters()):
        for name in ("m", "v"):
            assert other.state[p][name].dtype == torch.float32
            assert torch.equal(other.state[p][name], opt.state[q][name])
    _step(model, opt, 1)
    _step(twin, other, 1)
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class TwoCells(nn.Module):
    """A GRU cell's and an RNN cell's outputs concatenated along the features
    (``[B, H]`` along dim 1, or made ``[B, 1, H]`` and along dim 2), read by one Linear."""

    def __init__(self, unsqueeze: bool):
        super().__init__()
        self.a, self.b, self.head = nn.GRUCell(4, 3), nn.RNNCell(4, 2), nn.Linear(5, 2)
        self.unsqueeze = unsqueeze

    def forward(self, x):
        if self.unsqueeze:
            return self.head(torch.cat([self.a(x).unsqueeze(1), self.b(x).unsqueeze(1)], 2)).squeeze(1)
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


@pytest.mark.parametrize("unsqueeze", [False, True])
@pytest.mark.parametrize("capture, with_inputs", [("fx", False), ("fx", True), ("eager", True)])
def test_cells_outputs_concatenated_along_their_units_feed_one_linear(capture, with_inputs, unsqueeze):
    """A cell's output has its units on the last dim, so a concat along the
    last dim is a concat of units, in every capture (fx without example
    inputs knows no shapes: it goes by where the value's units sit)."""
    torch.manual_seed(0)
    inputs = (torch.randn(2, 4),) if with_inputs else None
    g = build_graph(TwoCells(unsqueeze), inputs, strict=True, use_cache=False, capture=capture)
    a, b = part(g, "a.weight_ih")[1][:3, 0], part(g, "b.weight_ih")[1][:2, 0]
    assert torch.equal(part(g, "head.weight")[0], torch.cat([a, b]).view(1, 5).expand(2, 5))
    assert g.num_nodes == 4 + 3 + 2 + 2


@pytest.mark.filterwarnings("ignore:LSTM with projections")
@pytest.mark.parametrize("proj", [0, 2])
def test_a_linear_after_an_lstm_is_one_deeper_than_its_last_units(proj):
    """The LSTM's output (its units, or their projections) carries their
    depth to the next layer: a head on the last step is one deeper."""
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(4, 3, batch_first=True, proj_size=proj), nn.Linear(proj or 3, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    g = build(Seq(), torch.randn(2, 5, 4))
    h = part(g, "rnn.weight_ih_l0")[1][:3, 0]
    out = part(g, "head.weight")[1][:, 0]
    deepest = 3.0 if proj else 2.0          # units 1, projections 2, head one deeper
    assert torch.allclose(g.node_depth[h], torch.full((3,), 1 / deepest))
    assert torch.allclose(g.node_depth[out], torch.ones(2))


# ------------------------------------------------------------------ Recorder.arg_val
class PairNorm(nn.InstanceNorm2d):
    """A per-channel module (no parameters) taking a tuple of two maps."""

    def forward(self, pair):
        return super().forward(pair[0] + pair[1])


@pytest.fixture
def pair_norm_hands_on_its_first():
    register_module(PairNorm, lambda ctx, m, pair: pair[0])
    yield
    unregister_module(PairNorm)


def test_a_tuple_argument_is_read_along_the_modules_feature_dim(pair_norm_hands_on_its_first):
    """Each tensor of a leaf module's tuple argument reaches its mapper as
    the value a lone tensor would: for a per-channel module, the channel
    units (dim 1 of a map), which the mapper here hands on to the next conv."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.n, self.c3 = nn.Conv2d(2, 3, 3), nn.Conv2d(2, 3, 3), PairNorm(3), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.c3(self.n((self.c1(x), self.c2(x))))

    torch.manual_seed(0)
    g = build(M(), torch.randn(2, 2, 8, 8))
    assert not_followed(g) == []
    c1 = part(g, "c1.weight")[1][:, 0, 0, 0]
    assert torch.equal(part(g, "c3.weight")[0][0, :, 0, 0], c1)
    assert g.num_nodes == 2 + 3 + 3 + 4


# ------------------------------------------------------------------ parametrized weights
class Shift(nn.Module):
    """A parametrization with a parameter of its own, of the weight's shape: ``w + delta``."""

    def __init__(self, shape):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, w):
        return w + self.delta


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_only_an_original_is_aliased_not_a_parametrizations_own_parameter(capture):
    """The weight's entries are its original's, one to one; a parameter the
    parametrization module holds (here of the same shape) is not an
    original: it stays on a fallback node and does not make the original
    ambiguous."""
    from torch.nn.utils import parametrize
    from test_graph_parametrized import PLAIN, _build, _layout, _model, _renamed
    model = _model()
    parametrize.register_parametrization(model[5], "weight", Shift((2, 5)))
    g = _build(model, capture, strict=False)
    assert g.unstructured == ["5.parametrizations.weight.0.delta"]
    assert _layout(g, _renamed(PLAIN, {"5"}, "original")) == _layout(_build(_model(), capture), PLAIN)


# ------------------------------------------------------------------ example_inputs_for
def test_made_up_inputs_are_shaped_for_the_first_layer_inside_nested_containers():
    """The first layer is looked for through containers holding no
    parameters of their own (a Sequential in a Sequential, a cell inside a
    block): a seeded batch of 2 shaped for it."""
    from l2o.graph.example_inputs import example_inputs_for

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.GRUCell(5, 4))

    got = example_inputs_for(nn.Sequential(nn.Sequential(nn.Linear(3, 2)), nn.ReLU()))
    assert len(got) == 1 and torch.equal(got[0], torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    got = example_inputs_for(nn.Sequential(Block()))
    assert len(got) == 1 and torch.equal(got[0], torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name, config", [("pixel_values", {"image_size": 4}), ("input_ids", {"vocab_size": 7})])
def test_an_encoder_decoders_made_up_inputs_are_token_ids_of_integer_dtype(name, config):
    """The decoder ids (and a text model's input ids) index an embedding:
    ``torch.long``, whatever else they equal."""
    from types import SimpleNamespace

    from l2o.graph.example_inputs import example_inputs_for

    model = nn.Linear(3, 3)
    model.config, model.main_input_name = SimpleNamespace(is_encoder_decoder=True, **config), name
    got = example_inputs_for(model)
    assert got["decoder_input_ids"].dtype == torch.long and got["decoder_input_ids"].shape == (1, 4)
    assert not got["decoder_input_ids"].any()
    if name == "input_ids":
        assert got["input_ids"].dtype == torch.long

"""The eager capture's recorder (:mod:`l2o.graph.recorder`): which tensors it
tracks, how mapped modules are kept whole, what reaches the op handlers, and
where a failure is noted. Written against the survivors of a mutation run
over the module (docs/mutation.md); each test was checked to fail with the
mutation it names put in by hand."""
from __future__ import annotations

import torch
from torch import nn

import l2o
from graph_helpers import build, canonical, not_followed, part
from l2o.graph.param_graph import NodeType
from l2o.graph.recorder import Recorder
from l2o.graph.shadows import TensorInfo
from l2o.graph.state import GraphState


def _recorder(model):
    return Recorder(GraphState(model), model, None, None, None)


# ------------------------------------------------------------------ values
def test_a_parameter_is_tracked_as_its_own_entries_and_a_plain_tensor_only_when_set():
    fc = nn.Linear(3, 2)
    rec = _recorder(fc)
    w = rec.get(fc.weight)
    assert w is not None and w.sh is None
    assert w.pidx[0] == rec.state.param_id(fc.weight)
    assert torch.equal(w.pidx[1], torch.arange(6).view(2, 3))
    assert rec.is_param(fc.weight) and not rec.is_activation(fc.weight)
    assert rec.get(nn.Parameter(torch.zeros(2))) is None      # not the model's
    assert not rec.is_param(nn.Parameter(torch.zeros(2)))
    assert rec.get(3.0) is None and not rec.is_activation(3.0) and not rec.is_param(None)
    t = torch.zeros(2, 3)
    assert rec.get(t) is None and not rec.is_activation(t)
    info = TensorInfo(sh=torch.zeros(2, 3, dtype=torch.long), depth=2)
    rec.set(t, info)
    assert rec.get(t) is info and rec.is_activation(t) and not rec.is_param(t)
    # a parameter is never recorded as an activation
    rec.set(fc.weight, info)
    assert rec.get(fc.weight).pidx is not None and id(fc.weight) not in rec.info


def test_a_reused_id_is_not_taken_for_the_tensor_recorded_under_it():
    """The info of a freed tensor whose ``id`` a new tensor got is not the new tensor's."""
    rec = _recorder(nn.Linear(2, 2))
    old, new = torch.zeros(3), torch.zeros(3)
    rec.info[id(new)] = (old, TensorInfo(depth=1))
    assert rec.get(new) is None and not rec.is_activation(new)


def test_a_constant_times_a_weight_is_left_alone_without_a_note():
    """``c @ W.T`` with an untracked ``c``: not a Linear written out, nothing noted."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
            self.register_buffer("c", torch.randn(5, 3))

        def forward(self, x):
            return self.out(torch.relu(self.fc(x))) + torch.mm(self.c, self.fc.weight.t()).sum()
    torch.manual_seed(0)
    g = build(M(), torch.randn(5, 3), strict=False)
    assert not_followed(g) == []
    src, dst = part(g, "fc.weight")
    assert (g.node_type[src[0]] == NodeType.INPUT).all()


# ------------------------------------------------------------ what is seen
class _Attn(nn.Module):
    """Linear -> relu -> MultiheadAttention (kept whole, with a kept-whole
    ``out_proj`` inside) -> ``* 2`` -> Linear."""
    def __init__(self):
        super().__init__()
        self.fc, self.att, self.out = nn.Linear(3, 4), nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        a, _ = self.att(h, h, h)
        return self.out(a * 2)


def test_only_the_ops_between_mapped_modules_reach_the_handlers(monkeypatch):
    """Ops inside a mapped module (nested ones too) and the recorder's own tensor
    work are not recorded; the hooks are gone after the build."""
    seen = []
    on_op = Recorder.on_op

    def spy(self, func, args, kwargs, out):
        from l2o.graph.op_names import op_name
        seen.append((op_name(func), self.leaf_depth, self.busy))
        return on_op(self, func, args, kwargs, out)
    monkeypatch.setattr(Recorder, "on_op", spy)
    torch.manual_seed(0)
    m = _Attn()
    g = build(m, torch.randn(2, 5, 3))
    assert seen == [("relu", 0, True), ("mul", 0, True)]
    assert g.notes == []
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    # the attention's output units are what the head reads; fc's units what it reads
    assert torch.equal(part(g, "out.weight")[0][0], part(g, "att.out_proj.weight")[1][:, 0])
    assert torch.equal(part(g, "att.in_proj_weight")[0][0], part(g, "fc.weight")[1][:, 0])
    monkeypatch.undo()
    assert canonical(build(m, torch.randn(2, 5, 3))) == canonical(g)   # a second build: same graph


def test_a_failing_op_handler_is_noted_and_the_forward_is_unchanged(monkeypatch):
    import l2o.graph.tensor_ops as tensor_ops

    def boom(rec, out, tracked):
        raise RuntimeError("boom")
    monkeypatch.setattr(tensor_ops, "elementwise", boom)
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(5, 3)

    class F(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m[2](torch.relu(self.m[0](x)))
    f = F()
    with torch.no_grad():
        want = f(x)
    g = build(f, x, strict=False)
    assert g.notes == ["op not followed: relu: RuntimeError: boom"]
    assert torch.equal(f(x), want)


def test_a_failing_mapper_is_noted_with_its_module(monkeypatch):
    import l2o.graph.builder as builder
    mapper_for = builder.mapper_for

    def failing(module):
        if isinstance(module, nn.Linear) and module.out_features == 2:
            def f(*a):
                raise ValueError("bad")
            return f
        return mapper_for(module)
    monkeypatch.setattr(builder, "mapper_for", failing)
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(5, 3)
    with torch.no_grad():
        want = m(x)
    g = build(m, x, strict=False)
    assert g.notes == ["op not followed: 2 (Linear): ValueError: bad"]
    assert torch.equal(m(x), want)

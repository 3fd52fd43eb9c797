"""Contract of the shadow helpers of the eager capture (``l2o/graph/shadows.py``):
each helper against a plain reference (the op applied to the shadow by hand),
and the eager capture of ops that take those paths (``torch.cat`` without
``dim``, a cls token, ``F.pad``) checked against the structure it must give.
Written for issue 17 (mutation survivors of ``shadows.py``, docs/mutation.md)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graph_helpers import build, not_followed, part
from l2o.graph.shadows import (_list_filler, along, apply_to_shadows, const_along, keep_matching_dims,
                               output_pairs, stretched_dims, without_collapsing)

FILL = -1


def _eq(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and bool((a == b).all())


# --- along / const_along / keep_matching_dims / stretched_dims -------------------------

def test_along_puts_nodes_on_the_dim():
    nodes = torch.tensor([4, 5, 6])
    assert _eq(along(nodes, (3,), 0), nodes)                     # 1-d: the nodes themselves
    assert _eq(along(nodes, (2, 3), -1), nodes.expand(2, 3))
    assert _eq(along(nodes, (3, 2), 0), nodes.view(3, 1).expand(3, 2))
    scalar = along(torch.tensor([7]), (), 0)                       # 0-d tensor: one node
    assert scalar.shape == () and int(scalar) == 7


def test_const_along_is_no_variation_along_the_dim():
    assert const_along(torch.tensor([3, 3]), 0)
    assert not const_along(torch.tensor([3, 4]), 0)               # size 2 that varies
    assert not const_along(torch.tensor([[0, 1], [0, 1]]), 1)
    assert const_along(torch.tensor([[0, 1], [0, 1]]), 0)
    assert const_along(torch.tensor([[5], [6]]), 1)               # size 1
    assert const_along(torch.zeros(0, 2, dtype=torch.long), 0)    # size 0


def test_keep_matching_dims_resized_dims_without_variation():
    sh = torch.full((4, 1), 7)
    assert _eq(keep_matching_dims(sh, (2, 3)), torch.full((2, 3), 7))   # a size-1 dim resized too
    rows = torch.tensor([[0, 1, 2]]).expand(4, 3)
    assert _eq(keep_matching_dims(rows, (2, 3)), torch.tensor([[0, 1, 2]]).expand(2, 3))
    assert keep_matching_dims(torch.arange(4).view(4, 1), (2, 1)) is None   # varies along the resized dim
    assert keep_matching_dims(sh, (4, 1)) is None                        # nothing resized
    assert keep_matching_dims(sh, (4,)) is None                          # other rank


def _ref_stretched(shape, out_shape):
    """Reference: dims where broadcasting really repeats the tensor's elements."""
    n = 1
    for k in shape:
        n *= k
    b = torch.broadcast_to(torch.arange(n).view(shape), out_shape)
    return tuple(d for d in range(len(out_shape)) if b.stride(d) == 0 and out_shape[d] > 1)


@pytest.mark.parametrize("shape,out_shape", [
    ((3,), (2, 3)), ((1, 3), (1, 3)), ((1,), (2,)), ((2, 1), (2, 5)), ((1, 1, 4), (3, 2, 4)),
    ((), (2, 2)), ((2, 3), (2, 3)),
])
def test_stretched_dims_against_broadcast_strides(shape, out_shape):
    assert stretched_dims(shape, out_shape) == _ref_stretched(shape, out_shape)


# --- without_collapsing -----------------------------------------------------------------

def test_without_collapsing_drops_a_gate_broadcast_along_varying_units():
    gate = torch.tensor([[9], [8], [7], [6]])                    # per-token scalar gate
    y = torch.arange(3).expand(4, 3).contiguous()                # units vary along the last dim
    shs = [torch.broadcast_to(gate, (4, 3)), y]
    kept = without_collapsing(shs, [stretched_dims(gate.shape, (4, 3)), ()])
    assert len(kept) == 1 and kept[0] is y
    # operands in the other order: same choice
    kept = without_collapsing(shs[::-1], [(), stretched_dims(gate.shape, (4, 3))])
    assert len(kept) == 1 and kept[0] is y


def test_without_collapsing_keeps_operands_that_do_not_vary_along_the_stretch():
    gate = torch.tensor([[9], [8]])
    per_row = torch.tensor([[0, 0, 0], [1, 1, 1]])                # materialised, constant along dim 1
    shs = [torch.broadcast_to(gate, (2, 3)), per_row]
    kept = without_collapsing(shs, [(1,), ()])
    assert len(kept) == 2
    # nothing broadcast: all kept
    a, b = torch.arange(6).view(2, 3), torch.arange(6).view(2, 3) + 6
    assert without_collapsing([a, b], [(), ()]) == [a, b]


def test_without_collapsing_each_stretched_along_the_other_keeps_the_first():
    col = torch.broadcast_to(torch.tensor([[0], [1]]), (2, 3))   # varies along 0, stretched along 1
    row = torch.broadcast_to(torch.tensor([[2, 3, 4]]), (2, 3))  # varies along 1, stretched along 0
    kept = without_collapsing([col, row], [(1,), (0,)])
    assert len(kept) == 1 and kept[0] is col


# --- output_pairs ---------------------------------------------------------------------

def test_output_pairs_only_tensor_with_tensor():
    o, r = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    assert output_pairs(o, r) == [(o, r)]
    assert output_pairs(o, None) == []
    assert output_pairs(o, (r,)) == []
    o2 = torch.zeros(2, 3)
    assert output_pairs((o2, o2), torch.zeros(2, 3, dtype=torch.long)) == []
    r1, r2 = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    pairs = output_pairs((o, None), (r1, r2))
    assert len(pairs) == 1 and pairs[0][0] is o and pairs[0][1] is r1
    pairs = output_pairs([o, o], [r1, None])
    assert len(pairs) == 1 and pairs[0][1] is r1


# --- apply_to_shadows: cat / stack -----------------------------------------------------

def _units_on_last(shape, start=0):
    """A materialised shadow whose units vary along the last dim only."""
    return (torch.arange(shape[-1]) + start).expand(shape).contiguous()


def test_cat_without_dim_spreads_units_to_an_untracked_cls_token():
    x, tok = torch.randn(2, 3), torch.randn(1, 3)
    sh = _units_on_last((2, 3))
    res = apply_to_shadows(torch.cat, "cat", ([tok, x],), {}, {id(x): sh}, fill=FILL)
    assert _eq(res, _units_on_last((3, 3)))
    res = apply_to_shadows(torch.cat, "cat", (), {"tensors": [tok, x]}, {id(x): sh}, fill=FILL)
    assert _eq(res, _units_on_last((3, 3)))


@pytest.mark.parametrize("func,name", [(torch.cat, "cat"), (torch.concat, "concat"),
                                       (torch.concatenate, "concatenate")])
def test_cat_aliases_spread_like_cat(func, name):
    x, tok = torch.randn(2, 3), torch.randn(1, 3)
    res = apply_to_shadows(func, name, ([tok, x], 0), {}, {id(x): _units_on_last((2, 3))}, fill=FILL)
    assert _eq(res, _units_on_last((3, 3)))


def test_cat_positional_dim_is_the_dim_spread_along():
    # units vary along dim 0 (one per row); a column appended along dim 1 takes the row's unit
    x, col = torch.randn(2, 3), torch.randn(2, 1)
    sh = torch.tensor([[0, 0, 0], [1, 1, 1]])
    res = apply_to_shadows(torch.cat, "cat", ([x, col], 1), {}, {id(x): sh}, fill=FILL)
    assert _eq(res, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    res = apply_to_shadows(torch.cat, "cat", ([x, col],), {"dim": -1}, {id(x): sh}, fill=FILL)
    assert _eq(res, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))


def test_cat_along_a_dim_the_units_vary_along_fills():
    x, tok = torch.randn(2, 3), torch.randn(1, 3)
    sh = torch.arange(6).view(2, 3)                              # every element its own unit
    res = apply_to_shadows(torch.cat, "cat", ([tok, x], 0), {}, {id(x): sh}, fill=FILL)
    assert _eq(res, torch.cat([torch.full((1, 3), FILL), sh]))


def test_cat_of_a_single_row_spreads():
    x, tok = torch.randn(1, 3), torch.randn(1, 3)
    sh = _units_on_last((1, 3), start=4)
    res = apply_to_shadows(torch.cat, "cat", ([tok, x], 0), {}, {id(x): sh}, fill=FILL)
    assert _eq(res, _units_on_last((2, 3), start=4))


def test_no_spread_for_stack_or_when_not_asked():
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    sh = _units_on_last((2, 3))
    res = apply_to_shadows(torch.stack, "stack", ([x, y], 0), {}, {id(x): sh}, fill=FILL)
    assert _eq(res, torch.stack([sh, torch.full((2, 3), FILL)]))
    tok = torch.randn(1, 3)
    res = apply_to_shadows(torch.cat, "cat", ([tok, x], 0), {}, {id(x): sh}, fill=FILL, spread=False)
    assert _eq(res, torch.cat([torch.full((1, 3), FILL), sh]))


def test_list_filler_is_long():
    t = torch.randn(2, 2)
    out = _list_filler(t, [torch.arange(4).view(2, 2)], 0, FILL, False)
    assert _eq(out, torch.full((2, 2), FILL))


# --- apply_to_shadows: views, casts, pad ------------------------------------------------

def test_view_and_view_as_of_a_broadcast_shadow():
    x = torch.randn(2, 3)
    sh = along(torch.tensor([0, 1, 2]), (2, 3), -1)              # stride 0: not viewable as (6,)
    res = apply_to_shadows(Tensor.view, "view", (x, 6), {}, {id(x): sh}, fill=FILL)
    assert _eq(res, torch.tensor([0, 1, 2, 0, 1, 2]))
    target = torch.randn(6)
    res = apply_to_shadows(Tensor.view_as, "view_as", (x, target), {}, {id(x): sh}, fill=FILL)
    assert _eq(res, torch.tensor([0, 1, 2, 0, 1, 2]))


def test_dtype_view_stays_a_view():
    x = torch.randn(2, 3)
    sh = torch.arange(6).view(2, 3)
    res = apply_to_shadows(Tensor.view, "view", (x,), {"dtype": torch.int32}, {id(x): sh}, fill=FILL)
    assert _eq(res, sh.view(dtype=torch.int32))


@pytest.mark.parametrize("name,func", [("float", Tensor.float), ("to", Tensor.to), ("type_as", Tensor.type_as)])
def test_casts_pass_the_shadow_through(name, func):
    x = torch.randn(2, 3)
    sh = torch.arange(6).view(2, 3)
    args = (x, torch.zeros(1, dtype=torch.float64)) if name == "type_as" else \
        (x, torch.float64) if name == "to" else (x,)
    assert apply_to_shadows(func, name, args, {}, {id(x): sh}, fill=FILL) is sh


def test_pad_constant_pads_with_fill():
    x = torch.randn(2, 3)
    sh = torch.arange(6).view(2, 3)
    ref = F.pad(sh, (1, 1), value=FILL)
    assert _eq(apply_to_shadows(F.pad, "pad", (x, (1, 1)), {}, {id(x): sh}, fill=FILL), ref)
    assert _eq(apply_to_shadows(F.pad, "pad", (x, (1, 1), "constant"), {}, {id(x): sh}, fill=FILL), ref)
    assert _eq(apply_to_shadows(F.pad, "pad", (x, (1, 1), "constant", 0.5), {}, {id(x): sh}, fill=FILL), ref)
    assert _eq(apply_to_shadows(F.pad, "pad", (x,), {"pad": (1, 1), "value": 0.0}, {id(x): sh}, fill=FILL), ref)
    assert _eq(apply_to_shadows(F.pad, "pad", (), {"input": x, "pad": (1, 1)}, {id(x): sh}, fill=FILL), ref)


@pytest.mark.parametrize("mode", ["circular", "replicate", "reflect"])
def test_pad_other_modes_move_the_nodes_like_the_data(mode):
    x = torch.randn(2, 3)
    sh = torch.arange(6).view(2, 3)
    ref = F.pad(sh, (1, 1), mode=mode)
    assert _eq(apply_to_shadows(F.pad, "pad", (x, (1, 1), mode), {}, {id(x): sh}, fill=FILL), ref)
    assert _eq(apply_to_shadows(F.pad, "pad", (x, (1, 1)), {"mode": mode}, {id(x): sh}, fill=FILL), ref)


# --- the eager capture ------------------------------------------------------------------

class ClsToken(nn.Module):
    """A cls token concatenated in front of the tokens with ``torch.cat`` and no ``dim``
    (tokens are (T, H): dim 0 is the token dim), then a linear layer."""
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.register_buffer("cls", torch.randn(1, 4))   # not a parameter: untracked
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x)
        h = torch.cat([self.cls, h])   # untracked piece, no dim
        return self.out(h[0])          # read out at the cls token (ViT)


def test_eager_cat_without_dim_keeps_the_units():
    g = build(ClsToken(), torch.randn(5, 3), strict=False)
    assert not_followed(g) == []
    _, dst = part(g, "inp.weight")
    src, _ = part(g, "out.weight")
    # the hidden units of inp are the inputs of out, column by column
    assert dst[:, 0].tolist() == src[0].tolist()


class Padded(nn.Module):
    """A hidden map zero-padded along its feature dim: the pad's entries are no unit."""
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(F.pad(self.inp(x), (1, 1)))


def test_eager_pad_entries_are_no_units():
    g = build(Padded(), torch.randn(5, 3), strict=False)
    _, dst = part(g, "inp.weight")
    src, _ = part(g, "out.weight")
    # out's inputs 1..4 are inp's units; inputs 0 and 5 (padding) are none of inp's units
    assert src[0, 1:5].tolist() == dst[:, 0].tolist()
    assert not ({int(src[0, 0]), int(src[0, 5])} & set(dst[:, 0].tolist()))

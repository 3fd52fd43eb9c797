"""The eager capture's handlers for parameters consumed by ops
(:mod:`l2o.graph.param_uses`) and for reductions / ``glu``
(:mod:`l2o.graph.tensor_ops`), entry by entry: which units each edge joins,
which nodes hold which entries. Written against the survivors of a mutation
run over the two modules (docs/mutation.md); each test was checked to fail
with the mutation it names put in by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2o
from graph_helpers import build, canonical, not_followed, part
from l2o.graph.param_graph import EntryKind, NodeType


def units_of(g, name):
    """The output units of a Linear-like weight ``W[o, i]``, in row order."""
    return part(g, name)[1][:, 0]


def reads(g, name):
    """The input units a Linear-like weight ``W[o, i]`` reads, in column order."""
    return part(g, name)[0][0]


# ---------------------------------------------------------------- products
class _Product(nn.Module):
    """Linear(3, 4) -> relu -> Linear(4, 2), the first layer written as ``form``."""
    def __init__(self, form):
        super().__init__()
        self.form, self.fc, self.out = form, nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        w, b = self.fc.weight, self.fc.bias
        h = {"module": lambda: self.fc(x),
             "torch.mm": lambda: torch.mm(x, w.t()) + b,
             "tensor.mm": lambda: x.mm(w.t()) + b,
             "tensor.matmul": lambda: x.matmul(w.T) + b,
             "dunder_matmul": lambda: x.__matmul__(w.T) + b,
             "addmm": lambda: torch.addmm(b, x, w.t()),
             "torch.mm_keywords": lambda: torch.mm(input=x, mat2=w.t()) + b,
             "torch.matmul_keywords": lambda: torch.matmul(input=x, other=w.T) + b,
             "torch.addmm_keywords": lambda: torch.addmm(input=b, mat1=x, mat2=w.t())}[self.form]()
        return self.out(torch.relu(h))


@pytest.mark.parametrize("form", ["torch.mm", "tensor.mm", "tensor.matmul", "dunder_matmul", "addmm",
                                  "torch.mm_keywords", "torch.matmul_keywords", "torch.addmm_keywords"])
def test_a_linear_written_as_a_matrix_product_maps_like_nn_linear(form):
    # Catches: "mm" dropped from the product names (x.mm(W.t()) then merged
    # elementwise, W left to the fallback). torch.mm itself reaches the
    # recorder as "spmm" (torch's resolve_name): it was not followed at all.
    x = torch.randn(2, 3)
    torch.manual_seed(0)
    want = build(_Product("module"), x)
    torch.manual_seed(0)
    got = build(_Product(form), x)
    assert canonical(got) == canonical(want)
    assert torch.equal(reads(got, "out.weight"), units_of(got, "fc.weight"))
    assert torch.equal(part(got, "fc.bias"), units_of(got, "fc.weight"))


class _AddmmMatrix(nn.Module):
    """``addmm(M, x, W.T)`` with a full [batch, out] matrix ``M``: not a bias."""
    def __init__(self):
        super().__init__()
        self.m, self.fc, self.out = nn.Parameter(torch.randn(2, 4)), nn.Linear(3, 4, bias=False), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(torch.addmm(self.m, x, self.fc.weight.t())))


def test_a_matrix_added_by_addmm_is_not_taken_for_a_bias():
    # Catches: any tensor added by addmm passed on as the bias (a [2, 4] matrix
    # then fails the bias's one-entry-per-unit check mid-op: the product's units
    # are lost and the head reads fresh nodes).
    g = build(_AddmmMatrix(), torch.randn(2, 3), strict=False)
    assert not not_followed(g)
    assert torch.equal(reads(g, "out.weight"), units_of(g, "fc.weight"))
    assert g.unstructured == ["m"]


# --------------------------------------------------------------- embedding
class _Tokens(nn.Module):
    """Two tables read the same token ids (as token + a second embedding of the
    same ids); their sum goes to a Linear."""
    def __init__(self, form):
        super().__init__()
        self.form, self.a, self.b, self.out = form, nn.Embedding(5, 4), nn.Embedding(5, 4), nn.Linear(4, 2)

    def embed(self, table, ids):
        w = table.weight
        return {"module": lambda: table(ids),
                "F": lambda: F.embedding(ids, w),
                "F_keywords": lambda: F.embedding(input=ids, weight=w),
                "torch.embedding": lambda: torch.embedding(w, ids),
                "torch.embedding_keywords": lambda: torch.embedding(weight=w, indices=ids),
                "torch.embedding_mixed": lambda: torch.embedding(w, indices=ids)}[self.form]()

    def forward(self, ids):
        return self.out(self.embed(self.a, ids) + self.embed(self.b, ids))


@pytest.mark.parametrize("form", ["F", "F_keywords", "torch.embedding", "torch.embedding_keywords",
                                  "torch.embedding_mixed"])
def test_a_functional_embedding_maps_like_nn_embedding(form):
    # Catches: the handler not returning once it has mapped the table (the output
    # then passed on as the raw token ids: the Linear reads fresh nodes), the token
    # ids not handed to the table (each table with its own token nodes), and the
    # builtin torch.embedding(weight, indices) not followed (weight first: it was
    # read as the ids; the keywords are weight / indices, not weight / input).
    ids = torch.tensor([[0, 1, 2], [3, 4, 0]])
    torch.manual_seed(0)
    want = build(_Tokens("module"), ids)
    torch.manual_seed(0)
    got = build(_Tokens(form), ids)
    assert canonical(got) == canonical(want)
    assert torch.equal(got.node_io_index, want.node_io_index)
    tokens, dims = part(got, "a.weight")
    assert torch.equal(part(got, "b.weight")[0], tokens), "one token node per id, whichever table reads it"
    assert (got.node_type[tokens] == NodeType.INPUT).all() and (got.node_io_index[tokens[:, 0]] == torch.arange(5)).all()
    assert torch.equal(reads(got, "out.weight"), dims[0])


# ------------------------------------------------------------------- norms
FIRST = {
    "F.layer_norm": lambda x, w, b: F.layer_norm(x, (4,), w, b),
    "torch.layer_norm": lambda x, w, b: torch.layer_norm(x, (4,), w, b),
    "F.rms_norm": lambda x, w, b: F.rms_norm(x, (4,), w),
    "F.group_norm": lambda x, w, b: F.group_norm(x, 2, w, b),
    "F.batch_norm": lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
    "torch.batch_norm": lambda x, w, b: torch.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, False),
    "F.instance_norm": lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    "F.prelu": lambda x, w, b: F.prelu(x, w),
}


class _NormFirst(nn.Module):
    def __init__(self, norm, channels_first):
        super().__init__()
        self.norm, self.w, self.b = FIRST[norm], nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.head = nn.Conv1d(4, 2, 1) if channels_first else nn.Linear(4, 2)
        if norm in ("F.rms_norm", "F.prelu"):
            self.b = None

    def forward(self, x):
        return self.head(self.norm(x, self.w, self.b))


@pytest.mark.parametrize("norm", list(FIRST))
def test_a_functional_norm_on_the_network_input_sits_on_the_input_nodes(norm):
    # The network input has no nodes until an op reads it: the norm makes them,
    # along its normalised dim (the last for layer / rms norms, the channels for
    # the others), and its scale and shift sit on them.
    # Catches: the input's nodes made along the wrong dim or not at all (the norm
    # not followed: strict fails), and node 0 (the first input node) taken for
    # "no node" when the entries are placed.
    channels_first = norm == "F.instance_norm"     # [batch, channels, length]; the others [batch, features]
    x = torch.randn(2, 4, 3) if channels_first else torch.randn(2, 4)
    g = build(_NormFirst(norm, channels_first), x)
    inputs = reads(g, "head.weight").flatten() if not channels_first else part(g, "head.weight")[0][0, :, 0]
    assert torch.equal(inputs, torch.arange(4)) and (g.node_type[inputs] == NodeType.INPUT).all()
    assert torch.equal(part(g, "w"), inputs)
    if "b" in g.param_names:
        assert torch.equal(part(g, "b"), inputs)


@pytest.mark.parametrize("only", ["weight", "bias"])
def test_the_builtin_batch_norm_with_only_a_scale_or_only_a_shift(only):
    # torch.batch_norm(x, weight, bias, running_mean, running_var, ...): the
    # affine pair comes first even when one of the two is None.
    # Catches: the call told from F.batch_norm by its weight alone (a shift
    # without a scale was looked for after the running stats, and not found).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.p, self.out = nn.Linear(3, 4), nn.Parameter(torch.randn(4)), nn.Linear(4, 2)

        def forward(self, x):
            w, b = (self.p, None) if only == "weight" else (None, self.p)
            return self.out(torch.batch_norm(self.fc(x), w, b, None, None, True, 0.1, 1e-5, False))

    g = build(Model(), torch.randn(2, 3))
    units = units_of(g, "fc.weight")
    assert torch.equal(part(g, "p"), units)
    i = g.flat_order.index(g.param_names.index("p"))
    s = g.tensor_slices[i]
    kind = EntryKind.NORM_WEIGHT if only == "weight" else EntryKind.NORM_BIAS
    assert (g.entry_kind[s.start - g.num_edges:s.stop - g.num_edges] == kind).all()
    assert torch.equal(reads(g, "out.weight"), units)


class _Deep(nn.Module):
    """Linear(3, 4) -> ``mid`` -> Linear(k, 2): two weight layers deep."""
    def __init__(self, mid):
        super().__init__()
        self.mid = mid
        self.fc = nn.Linear(3, 8 if mid == "glu" else 4)
        self.w = nn.Parameter(torch.rand(4) + 0.5) if mid != "glu" else None
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        h = {"prelu": lambda: F.prelu(h, self.w), "layer_norm": lambda: F.layer_norm(h, (4,), self.w),
             "glu": lambda: F.glu(h, -1)}[self.mid]()
        return self.out(h)


@pytest.mark.parametrize("mid", ["prelu", "layer_norm", "glu"])
def test_ops_between_layers_keep_the_depth_of_their_input(mid):
    # node_depth counts weight layers: the head's units are one layer deeper
    # than the first layer's, whatever elementwise op sits between them.
    # Catches: prelu / glu outputs recorded at depth 0 (the head at depth 1,
    # level with the first layer).
    g = build(_Deep(mid), torch.randn(2, 3))
    first, head = units_of(g, "fc.weight"), units_of(g, "out.weight")
    assert (g.node_depth[first] == 0.5).all() and (g.node_depth[head] == 1.0).all()
    assert (g.node_depth[reads(g, "fc.weight")] == 0.0).all()


def test_a_two_channel_prelu_sits_on_its_two_channels():
    # Catches: a slope vector of two entries taken for a shared slope (left to
    # the per-tensor fallback).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(3, 2), nn.PReLU(2), nn.Linear(2, 2)

        def forward(self, x):
            return self.out(self.act(self.fc(x)))

    g = build(Model(), torch.randn(2, 3))
    assert torch.equal(part(g, "act.weight"), units_of(g, "fc.weight"))


class _FlatMid(nn.Module):
    """Conv1d(2, 3, 3) -> flatten (3 channels x 6 positions) -> ``mid`` -> Linear(18, 2)."""
    def __init__(self, mid):
        super().__init__()
        self.mid, self.conv, self.fc = mid, nn.Conv1d(2, 3, 3), nn.Linear(18, 2)
        self.shared, self.w, self.b = nn.PReLU(), nn.Parameter(torch.rand(18) + 0.5), nn.Parameter(torch.randn(18))

    def forward(self, x):
        h = self.conv(x).flatten(1)
        h = {"relu": lambda: torch.relu(h), "shared_prelu": lambda: self.shared(h),
             "prelu": lambda: F.prelu(h, self.w), "layer_norm": lambda: F.layer_norm(h, (18,), self.w, self.b),
             "batch_norm": lambda: F.batch_norm(h, None, None, self.w, self.b, True)}[self.mid]()
        return self.fc(h)


@pytest.mark.parametrize("mid", ["shared_prelu", "prelu", "layer_norm", "batch_norm"])
def test_a_flattened_conv_map_keeps_its_positions_through_activations_and_norms(mid):
    # The head after a flattened conv map reads channel nodes, with each column's
    # position as edge_pos; an activation or norm between flatten and head must
    # not change that (as relu does not).
    # Catches: a shared PReLU slope handled as a per-channel one (the map's
    # positions dropped); functional norms / prelu dropping the positions (a bug:
    # the head's edges had edge_pos 0).
    x = torch.randn(2, 2, 8)
    torch.manual_seed(0)
    want = build(_FlatMid("relu"), x, strict=False)
    torch.manual_seed(0)
    got = build(_FlatMid(mid), x, strict=False)
    fc = [g.tensor_slices[g.flat_order.index(g.param_names.index("fc.weight"))] for g in (want, got)]
    channels = part(got, "conv.weight")[1][:, 0, 0]
    assert torch.equal(reads(got, "fc.weight"), channels.repeat_interleave(6))
    assert torch.equal(got.edge_pos[fc[1]], want.edge_pos[fc[0]]) and bool(want.edge_pos[fc[0]].abs().sum() > 0)
    if mid in ("prelu", "layer_norm", "batch_norm"):
        assert torch.equal(part(got, "w"), channels.repeat_interleave(6))


# ------------------------------------------- parameters met elementwise
class _Positions(nn.Module):
    """[batch, T, 4] input -> layer norm -> + a position table of 6 rows, of which
    the run reaches T -> Linear."""
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
        self.pos, self.fc = nn.Parameter(torch.randn(1, 6, 4)), nn.Linear(4, 2)

    def forward(self, x):
        h = F.layer_norm(x, (4,), self.w, self.b)
        return self.fc(h + self.pos[:, :x.shape[1]])


def test_positions_past_the_example_length_sit_on_the_units_of_their_column():
    # Each row of a learned position table is added to the same units; rows the
    # example does not reach (T=3 of 6) go where the reached rows of their column
    # went. Here the units are the input nodes, node 0 among them.
    # Catches: node 0 taken for "no node" (the table, or the norm's column 0, then
    # left to the fallback); the rows past T not filled in.
    g = build(_Positions(), torch.randn(2, 3, 4))
    inputs = reads(g, "fc.weight")
    assert torch.equal(inputs, torch.arange(4))
    assert torch.equal(part(g, "pos"), inputs.expand(1, 6, 4))
    assert torch.equal(part(g, "w"), inputs) and torch.equal(part(g, "b"), inputs)


def test_a_scale_used_only_in_part_falls_back_whole():
    # A scale wider than the units it meets (a slimmable layer using the first k
    # entries): the entries the run never reaches have no unit to sit on, so the
    # tensor falls back to its own node -- no entry on a wrong or missing node.
    # Catches: unreached entries filled with the largest unit of their dim (all
    # on unit 3), or the entries added with node -1.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale, self.out = nn.Linear(3, 4), nn.Parameter(torch.rand(6) + 0.5), nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.out(h * self.scale[:h.shape[-1]])

    g = build(Model(), torch.randn(2, 3), strict=False)
    assert g.unstructured == ["scale"] and not not_followed(g)
    assert torch.equal(reads(g, "out.weight"), units_of(g, "fc.weight"))
    assert bool((g.entry_node >= 0).all()) and bool((g.entry_node < g.num_nodes).all())


def test_a_parameter_scaling_the_raw_input_does_not_break_the_capture():
    # ``x * s`` on the network input, before any layer has given it nodes: the
    # next layer still reads the input nodes. (The scale itself is not placed yet:
    # the input's feature dim is not known when it is met.)
    # Catches: the scale placed on the missing shadow of a still-lazy input (a
    # TypeError noted as an op not followed).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.s, self.fc = nn.Parameter(torch.rand(3) + 0.5), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x * self.s)

    g = build(Model(), torch.randn(2, 3), strict=False)
    assert not not_followed(g)
    assert (g.node_type[reads(g, "fc.weight")] == NodeType.INPUT).all()


# ----------------------------------------------------- glu and reductions
def test_glu_on_the_network_input_halves_the_input_nodes():
    # The input gets its nodes from glu (last dim), halves one unit each.
    # Catches: glu reading the shadow of a lazy input without making it (not followed).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(F.glu(x, -1))

    g = build(Model(), torch.randn(2, 6))
    assert not not_followed(g)
    inputs = reads(g, "fc.weight")
    assert inputs.unique().numel() == 3 and (g.node_type[inputs] == NodeType.INPUT).all()


class _Ensemble(nn.Module):
    """Two branches on the same input, joined by ``join``, read by one head."""
    def __init__(self, join):
        super().__init__()
        self.join, self.a, self.b, self.out = join, nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.out({"add": lambda: a + b,
                         "stack_max_values": lambda: torch.stack([a, b]).max(0).values,
                         "stack_max_first": lambda: torch.stack([a, b]).amax(0),
                         "stack_min_tuple": lambda: torch.stack([a, b]).min(dim=0)[0],
                         "stack_sum_keepdim_positional": lambda: torch.stack([a, b], 1).sum(1, True).squeeze(1),
                         "mean_input_keyword": lambda: torch.mean(input=torch.stack([a, b]), dim=0),
                         "torch.max_pair": lambda: torch.max(a, b),
                         "tensor.min_pair": lambda: a.min(b)}[self.join]())


@pytest.mark.parametrize("join", ["stack_max_values", "stack_max_first", "stack_min_tuple",
                                  "stack_sum_keepdim_positional", "mean_input_keyword", "torch.max_pair",
                                  "tensor.min_pair"])
def test_branches_joined_by_a_reduction_or_an_elementwise_max_are_one_unit_each(join):
    # Like a + b: unit j of both branches is one node, read by column j of the head.
    # Catches: max/min's (values, indices) result read as a whole or as its indices;
    # a positional keepdim ignored or read from the wrong place; the reduced tensor
    # given by keyword (input=) and the elementwise torch.max(a, b) not followed
    # (bugs: the second tensor was read as the reduced dims).
    x = torch.randn(2, 3)
    torch.manual_seed(0)
    want = build(_Ensemble("add"), x)
    torch.manual_seed(0)
    got = build(_Ensemble(join), x)
    assert not not_followed(got)
    assert canonical(got) == canonical(want)
    assert torch.equal(units_of(got, "a.weight"), units_of(got, "b.weight"))
    assert torch.equal(reads(got, "out.weight"), units_of(got, "a.weight"))


@pytest.mark.parametrize("keepdim", [False, True])
def test_a_reduction_over_a_length_one_dim_keeps_the_units(keepdim):
    # A mean over a sequence of one position: every position of the result is the
    # one unit it was. Catches: the min side of the "one unit along the reduced
    # dims" check taken over every dim, or without keepdim.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x).unsqueeze(1).mean(1, keepdim=keepdim)
            return self.out(h)

    g = build(Model(), torch.randn(2, 3))
    assert torch.equal(reads(g, "out.weight"), units_of(g, "fc.weight"))


def test_a_sum_over_the_features_is_a_new_unit():
    # A sum over the feature dim has no unit of its own: the head's one column is
    # a fresh hidden node, not any existing one. Catches: the "no unit" mark (-1)
    # replaced by a real node id (+1: the head then read input node 1).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(3, 4), nn.Linear(1, 2)

        def forward(self, x):
            return self.out(self.fc(x).sum(-1, keepdim=True))

    g = build(Model(), torch.randn(2, 3))
    col = reads(g, "out.weight")
    known = torch.cat([reads(g, "fc.weight"), units_of(g, "fc.weight"), units_of(g, "out.weight")])
    assert col.numel() == 1 and int(col) not in known.tolist()
    assert g.node_type[col].item() == NodeType.HIDDEN


def test_a_reduction_of_the_raw_input_over_a_length_one_dim_passes_the_input_on():
    # The input's nodes are not made yet; a mean over a dim of length 1 keeps the
    # shape, so the input passes on still lazy and the head makes the input nodes.
    # Catches: the lazy input dropped (the head reading fresh hidden nodes) or its
    # record broken (not followed).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.mean(1, keepdim=True))

    g = build(Model(), torch.randn(2, 1, 3))
    assert not not_followed(g)
    inputs = reads(g, "fc.weight")
    assert torch.equal(inputs, torch.arange(3)) and (g.node_type[inputs] == NodeType.INPUT).all()
    assert g.num_nodes == 5


def test_a_reduction_of_the_raw_input_over_a_longer_dim_is_followed():
    # Mean-pooling the raw input over its sequence: not followed yet (the head reads
    # fresh nodes: the input's feature dim is not known there), but never an error.
    # Catches: the reduction reading the shadow a lazy input does not have yet.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.mean(1))

    g = build(Model(), torch.randn(2, 5, 3))
    assert not not_followed(g)


class _OddWeights(nn.Module):
    """Products and a PReLU whose operands are not the usual whole parameters:
    a weight made by the network (hypernetwork style) with a parameter bias, a
    flat 1-D parameter viewed as a matrix, and a PReLU on a constant."""
    def __init__(self, case):
        super().__init__()
        self.case, self.fc, self.out = case, nn.Linear(3, 4), nn.Linear(4, 2)
        self.hyper, self.b = nn.Linear(3, 12), nn.Parameter(torch.randn(4))
        self.flat, self.slope = nn.Parameter(torch.randn(12)), nn.Parameter(torch.rand(4))

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.case == "generated_weight":
            w = self.hyper(x[:1]).view(4, 3)
            return self.out(torch.addmm(self.b, x, w.t()))
        if self.case == "flat_parameter":
            return self.out(x @ self.flat.view(4, 3).t())
        return self.out(h + F.prelu(-torch.ones(2, 4), self.slope))


@pytest.mark.parametrize("case", ["generated_weight", "flat_parameter", "prelu_on_a_constant"])
def test_ops_on_unusual_weights_are_followed_without_errors(case):
    # These have no edge structure to find (their parameters fall back), but the
    # capture must follow them without raising inside its handlers.
    # Catches: the transpose check reading the parameter index of an activation
    # (TypeError) or the second dim of a 1-D parameter (IndexError); the PReLU
    # handler reading the record of an untracked tensor (AttributeError).
    g = build(_OddWeights(case), torch.randn(2, 3), strict=False)
    assert not not_followed(g)
    assert torch.equal(reads(g, "fc.weight")[:3], torch.arange(3))


class _Stacked(nn.Module):
    """``case``: two branches stacked and summed (an ensemble), in the smallest
    cases: a batch of one, branches two units wide, and a residual written as a
    stack-sum with the raw input (whose first node is node 0)."""
    def __init__(self, case, join):
        super().__init__()
        width = 2 if case == "two_units" else 3
        self.case, self.join, self.a = case, join, nn.Linear(3, width)
        self.b = nn.Linear(3, width) if case != "residual_with_the_input" else None
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        a = self.a(x)
        b = x if self.case == "residual_with_the_input" else self.b(x)
        return self.out(a + b if self.join == "add" else torch.stack([a, b]).sum(0))


@pytest.mark.parametrize("case", ["batch_of_one", "two_units", "residual_with_the_input"])
def test_a_stack_sum_in_small_cases_merges_like_an_add(case):
    # ``stack([a, b]).sum(0)`` is ``a + b``: the same graph, entry by entry.
    # Catches: the slice count read from the batch dim (a batch of one: no merge),
    # two-unit slices taken for "one unit", node 0 taken for "no unit".
    x = torch.randn(1 if case == "batch_of_one" else 2, 3)
    torch.manual_seed(0)
    want = build(_Stacked(case, "add"), x)
    torch.manual_seed(0)
    got = build(_Stacked(case, "stack"), x)
    assert canonical(got) == canonical(want)
    assert torch.equal(reads(got, "out.weight"), units_of(got, "a.weight"))

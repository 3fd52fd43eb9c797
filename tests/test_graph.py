"""Tests of the parameter-graph builder (l2o.graph).

Each structural test derives node / edge / entry counts by hand in a comment,
checks the gather/scatter bijection, and (where the model has hidden
symmetries) checks that a function-preserving permutation of neurons,
channels or heads gives the same graph up to the induced node permutation.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2o.graph import (EdgeKind, EntryKind, NodeType, UnsupportedModuleError, build_graph,
                       draw_graph)

torch.manual_seed(0)


# ------------------------------------------------------------------ helpers
def params(model):
    return [p.detach().clone() for p in model.parameters()]


def check_bijection(g, model):
    ps = params(model)
    out = g.scatter(g.gather(ps))
    assert len(out) == len(ps)
    for a, b in zip(out, ps):
        assert torch.equal(a, b)
    # every entry exactly once: number all entries, gather, expect a permutation
    total = sum(p.numel() for p in ps)
    ids, k = [], 0
    for p in ps:
        ids.append(torch.arange(k, k + p.numel()).view(p.shape))
        k += p.numel()
    flat = g.gather(ids)
    assert torch.equal(torch.sort(flat).values, torch.arange(total))
    assert g.num_params == total
    assert torch.bincount(g.tensor_id, minlength=g.num_tensors).tolist() == g.numels
    assert all(bool((g.tensor_id[t] == k).all()) for k, t in enumerate(g.tensor_slices))
    if g.num_edges:
        assert 0 <= int(g.edge_index.min()) and int(g.edge_index.max()) < g.num_nodes
    if g.num_entries:
        assert 0 <= int(g.entry_node.min()) and int(g.entry_node.max()) < g.num_nodes
    assert sorted(g.flat_order) == list(range(len(g.param_names)))
    assert g.node_depth.min() >= 0 and g.node_depth.max() <= 1


def counts(g):
    return g.num_nodes, g.num_edges, g.num_entries


def _slice(g, name):
    """Flat-vector range of parameter ``name``."""
    idx = g.param_names.index(name)
    k = g.flat_order.index(idx)
    return k, g.tensor_slices[k].start, g.tensor_slices[k].stop


def row_nodes(g, name):
    """Node of each output row of an edge-held weight (dst of its first entry per row)."""
    k, a, b = _slice(g, name)
    assert k < g.num_edge_params
    rows = g.param_shapes[g.flat_order[k]][0]
    return g.edge_index[1, a:b].view(rows, -1)[:, 0].clone()


def relabel(sigma, nodes, perm):
    """B neuron o is A neuron perm[o]: node(perm[o]) in A maps to node(o) in B."""
    sigma[nodes[perm]] = nodes


def tables(g, model, sigma=None):
    """Edge and node-slot multisets (with kinds, positions and values), with
    node ids relabelled by ``sigma``."""
    sigma = torch.arange(g.num_nodes) if sigma is None else sigma
    flat = g.gather(params(model)).double()
    ev, nv = g.split_flat(flat)
    src, dst = sigma[g.edge_index[0]], sigma[g.edge_index[1]]
    edges = torch.stack([src.double(), dst.double(), g.edge_kind.double(),
                         g.edge_pos[:, 0].double(), g.edge_pos[:, 1].double(), ev], 1)
    slots = torch.stack([sigma[g.entry_node].double(), g.entry_kind.double(), nv], 1)
    return sorted(map(tuple, edges.tolist())), sorted(map(tuple, slots.tolist()))


def check_isomorphic(model_a, model_b, sigma, x, atol=1e-5):
    """model_b is model_a with permuted neurons: same function, and the graph of
    A relabelled by sigma equals the graph of B (edges, features, node slots)."""
    model_a.eval(), model_b.eval()
    with torch.no_grad():
        ya, yb = model_a(x), model_b(x)
    assert torch.allclose(ya, yb, atol=atol), (ya - yb).abs().max()
    ga, gb = build_graph(model_a), build_graph(model_b)
    assert sorted(sigma.tolist()) == list(range(ga.num_nodes))
    assert not torch.equal(sigma, torch.arange(ga.num_nodes)), "test permutation is trivial"
    # node features move with the nodes
    for attr in ("node_type", "node_io_index", "node_depth"):
        fa, fb = getattr(ga, attr), getattr(gb, attr)
        assert torch.equal(fb[sigma], fa), attr
    assert tables(ga, model_a, sigma) == tables(gb, model_b)
    # and the relabelling is not vacuous: without it the tables differ
    assert tables(ga, model_a) != tables(gb, model_b)


def check_permuted(model_a, model_b, rows, x):
    """model_b is model_a with the output rows of each weight in ``rows``
    (name -> permutation) permuted: relabel those neurons and check_isomorphic."""
    g = build_graph(model_a)
    sigma = torch.arange(g.num_nodes)
    for name, p in rows.items():
        relabel(sigma, row_nodes(g, name), p)
    check_isomorphic(model_a, model_b, sigma, x)


def perm(n):
    p = torch.randperm(n)
    while n > 1 and torch.equal(p, torch.arange(n)):
        p = torch.randperm(n)
    return p


def group_perm(c, groups):
    """Permutation of c channels that maps GroupNorm groups onto groups."""
    size = c // groups
    return torch.cat([g * size + perm(size) for g in perm(groups).tolist()])


# ------------------------------------------------------------------ MLP
def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


def test_mlp_counts_and_bijection():
    m = mlp()
    g = build_graph(m)
    # nodes: 5 inputs + 7 + 6 hidden + 3 outputs = 21
    # edges: 5*7 + 7*6 + 6*3 = 35 + 42 + 18 = 95;  bias slots: 7 + 6 + 3 = 16
    assert counts(g) == (21, 95, 16)
    check_bijection(g, m)
    types = g.node_type.tolist()
    assert types.count(NodeType.INPUT) == 5 and types.count(NodeType.OUTPUT) == 3
    assert sorted(g.node_io_index[g.node_type == NodeType.INPUT].tolist()) == list(range(5))
    assert sorted(g.node_io_index[g.node_type == NodeType.OUTPUT].tolist()) == list(range(3))
    assert (g.edge_kind == EdgeKind.LINEAR).all() and (g.entry_kind == EntryKind.BIAS).all()
    # W[o, i] is edge i -> o, row-major
    w = m[0].weight
    a = g.edge_index[:, :w.numel()].view(2, 7, 5)
    assert torch.equal(a[0], a[0][0].expand(7, 5)) and torch.equal(a[1], a[1][:, :1].expand(7, 5))
    assert g.node_depth[a[0, 0, 0]] == 0 and g.node_depth.max() == 1


def test_mlp_permutation():
    a = mlp()
    b = mlp()
    p1, p2 = perm(7), perm(6)
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[p1]); b[0].bias.copy_(a[0].bias[p1])
        b[2].weight.copy_(a[2].weight[p2][:, p1]); b[2].bias.copy_(a[2].bias[p2])
        b[4].weight.copy_(a[4].weight[:, p2]); b[4].bias.copy_(a[4].bias)
    check_permuted(a, b, {"0.weight": p1, "2.weight": p2}, torch.randn(4, 5))


# ------------------------------------------------------------------ CNN + BN
def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def randomise_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(); mod.running_var.uniform_(0.5, 2)
            with torch.no_grad():
                mod.weight.normal_(); mod.bias.normal_()


def test_cnn_bn_counts_flatten_positions():
    m = cnn()
    x = torch.randn(2, 3, 8, 8)
    for g in (build_graph(m, use_cache=False), build_graph(m, example_inputs=x, use_cache=False)):
        # nodes: 3 input channels + 4 + 6 conv channels + 10 outputs = 23
        #   (flatten keeps the 6 channel nodes; BN adds none)
        # edges: 4*3*9 + 6*4*9 + 10*(6*4*4) = 108 + 216 + 960 = 1284
        # slots: conv biases 4 + 6, BN scale+shift 2*4 + 2*6, linear bias 10 = 40
        assert counts(g) == (23, 1284, 40)
        check_bijection(g, m)
        kinds = g.entry_kind.tolist()
        assert kinds.count(EntryKind.NORM_WEIGHT) == 10 and kinds.count(EntryKind.NORM_BIAS) == 10
        # conv edges carry kernel offsets; tap (ky=0, kx=2) is (-1, +1)
        conv = g.edge_pos[:108].view(4, 3, 3, 3, 2)
        assert conv[0, 0, 0, 2].tolist() == [-1.0, 1.0] and conv[1, 2, 1, 1].tolist() == [0.0, 0.0]
        # linear after flatten: column j reads channel j // 16 at position (y, x) of j % 16
        _, s, e = _slice(g, "8.weight")
        lin_src = g.edge_index[0, s:e].view(10, 96)
        ch = row_nodes(g, "4.weight")
        assert torch.equal(lin_src[0], ch.repeat_interleave(16))
        pos = g.edge_pos[s:e].view(10, 96, 2)[0]
        j = 16 + 4 * 1 + 3      # channel 1, y=1, x=3 of a 4x4 map
        assert torch.allclose(pos[j], torch.tensor([1 / 3 * 2 - 1, 1.0]))


def test_cnn_permutation():
    a, b = cnn(), cnn()
    randomise_bn(a)
    p1, p2 = perm(4), perm(6)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(b[1], name).copy_(getattr(a[1], name)[p1])
            getattr(b[5], name).copy_(getattr(a[5], name)[p2])
        b[0].weight.copy_(a[0].weight[p1]); b[0].bias.copy_(a[0].bias[p1])
        b[4].weight.copy_(a[4].weight[p2][:, p1]); b[4].bias.copy_(a[4].bias[p2])
        b[8].weight.copy_(a[8].weight.view(10, 6, 16)[:, p2].reshape(10, 96))
    check_permuted(a, b, {"0.weight": p1, "4.weight": p2}, torch.randn(2, 3, 8, 8))


# ------------------------------------------------------------ ResNet block + GN
class ResNetBlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn0 = nn.GroupNorm(2, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.gn0(self.stem(x)))
        h = F.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        x = F.relu(x + h)
        return self.head(x.mean(dim=(2, 3)))


def test_resnet_block_counts():
    m = ResNetBlockNet()
    g = build_graph(m)
    # nodes: 3 inputs + 8 stem + 8 conv1 + 5 outputs = 24
    #   (conv2's 8 output channels merge with the stem's through the residual add)
    # edges: 8*3*9 + 8*8*9 + 8*8*9 + 5*8 = 216 + 576 + 576 + 40 = 1408
    # slots: 3 conv biases * 8 + 3 GN * (8 + 8) + head bias 5 = 24 + 48 + 5 = 77
    assert counts(g) == (24, 1408, 77)
    check_bijection(g, m)
    assert torch.equal(row_nodes(g, "stem.weight"), row_nodes(g, "conv2.weight"))
    # depth: stem 1, conv1 2, conv2 (merged with stem) 3, head 4
    assert g.node_depth[row_nodes(g, "stem.weight")].unique().tolist() == [0.75]


def test_resnet_block_permutation():
    a, b = ResNetBlockNet(), ResNetBlockNet()
    ps, ph = group_perm(8, 2), group_perm(8, 2)   # residual stream, block hidden
    with torch.no_grad():
        for mod in a.modules():
            if isinstance(mod, nn.GroupNorm):
                mod.weight.normal_(); mod.bias.normal_()
        b.stem.weight.copy_(a.stem.weight[ps]); b.stem.bias.copy_(a.stem.bias[ps])
        b.gn0.weight.copy_(a.gn0.weight[ps]); b.gn0.bias.copy_(a.gn0.bias[ps])
        b.conv1.weight.copy_(a.conv1.weight[ph][:, ps]); b.conv1.bias.copy_(a.conv1.bias[ph])
        b.gn1.weight.copy_(a.gn1.weight[ph]); b.gn1.bias.copy_(a.gn1.bias[ph])
        b.conv2.weight.copy_(a.conv2.weight[ps][:, ph]); b.conv2.bias.copy_(a.conv2.bias[ps])
        b.gn2.weight.copy_(a.gn2.weight[ps]); b.gn2.bias.copy_(a.gn2.bias[ps])
        b.head.weight.copy_(a.head.weight[:, ps]); b.head.bias.copy_(a.head.bias)
    check_permuted(a, b, {"stem.weight": ps, "conv1.weight": ph}, torch.randn(2, 3, 6, 6))


# ------------------------------------------------------------ transformer
class TinyLM(nn.Module):
    def __init__(self, norm_first=False):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)
        self.head = nn.Linear(8, 11)

    def forward(self, tokens):
        return self.head(self.block(self.emb(tokens)))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_counts(norm_first):
    m = TinyLM(norm_first)
    g = build_graph(m)
    # nodes: 11 token inputs + 8 residual stream (embedding dims; attention out
    #   and linear2 outputs merge into them) + 3*8 q/k/v + 12 FF hidden + 11 outputs = 66
    # edges: emb 11*8 + in_proj 3*8*8 + out_proj 8*8 + linear1 12*8 + linear2 8*12
    #   + head 11*8 = 88 + 192 + 64 + 96 + 96 + 88 = 624
    # slots: in_proj_bias 24 + out_proj bias 8 + norm1 16 + linear1 bias 12
    #   + linear2 bias 8 + norm2 16 + head bias 11 = 95
    assert counts(g) == (66, 624, 95)
    check_bijection(g, m)
    kinds = torch.bincount(g.edge_kind, minlength=7).tolist()
    assert kinds == [96 + 96 + 88, 0, 88, 64, 64, 64, 64]  # linear1, linear2, head are LINEAR
    assert (g.entry_kind == EntryKind.ATTN_BIAS).sum() == 24
    assert (g.node_type == NodeType.INPUT).sum() == 11 and (g.node_type == NodeType.OUTPUT).sum() == 11


def test_transformer_head_permutation():
    a, b = TinyLM(), TinyLM()
    b.load_state_dict(a.state_dict())
    E, H = 8, 2
    hd = E // H
    heads = perm(H)
    dqk, dv = perm(hd), perm(hd)
    # q and k of a head must move together (their dot product); v independently
    p_qk = torch.cat([h * hd + dqk for h in heads.tolist()])
    p_v = torch.cat([h * hd + dv for h in heads.tolist()])
    p_ff = perm(12)
    sa_a, sa_b = a.block.self_attn, b.block.self_attn
    rows = torch.cat([p_qk, E + p_qk, 2 * E + p_v])
    with torch.no_grad():
        sa_b.in_proj_weight.copy_(sa_a.in_proj_weight[rows])
        sa_b.in_proj_bias.copy_(sa_a.in_proj_bias[rows])
        sa_b.out_proj.weight.copy_(sa_a.out_proj.weight[:, p_v])
        b.block.linear1.weight.copy_(a.block.linear1.weight[p_ff])
        b.block.linear1.bias.copy_(a.block.linear1.bias[p_ff])
        b.block.linear2.weight.copy_(a.block.linear2.weight[:, p_ff])
    g = build_graph(a)
    q, k, v = row_nodes(g, "block.self_attn.in_proj_weight").split(E)
    sigma = torch.arange(g.num_nodes)
    relabel(sigma, q, p_qk)
    relabel(sigma, k, p_qk)
    relabel(sigma, v, p_v)
    relabel(sigma, row_nodes(g, "block.linear1.weight"), p_ff)
    check_isomorphic(a, b, sigma, torch.randint(0, 11, (2, 5)))


def test_multihead_attention_kdim_vdim():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(6, 3, kdim=4, vdim=5, add_bias_kv=True)

        def forward(self, q, k, v):
            out, _ = self.attn(q, k, v)
            return out

    m = Cross()
    g = build_graph(m)
    # nodes: inputs 6 + 4 + 5, q/k/v 18, outputs 6 = 39
    # edges: q_proj 6*6 + k_proj 6*4 + v_proj 6*5 + out_proj 6*6 = 126
    # slots: in_proj_bias 18 + bias_k 6 + bias_v 6 + out bias 6 = 36
    assert counts(g) == (39, 126, 36)
    check_bijection(g, m)
    assert sorted(g.node_io_index[g.node_type == NodeType.INPUT].tolist()) == list(range(15))


# ------------------------------------------------------------ embeddings
def test_embedding_model():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, tokens):
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            return self.out((self.tok(tokens) + self.pos(positions)).mean(1))

    m = Bag()
    g = build_graph(m)
    # nodes: 10 token + 6 position INPUT nodes, 4 embedding dims (tok and pos
    #   dims merged by the add), 3 outputs = 23
    # edges: 10*4 + 6*4 + 3*4 = 76; slots: output bias 3
    assert counts(g) == (23, 76, 3)
    check_bijection(g, m)
    # token ids come first among the inputs (network input), positions after
    io = g.node_io_index[g.edge_index[0, :40:4]]
    assert io.tolist() == list(range(10))
    assert (g.edge_kind[:64] == EdgeKind.EMBEDDING).all()


# ------------------------------------------------------------ grouped conv1d
class GroupedConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, groups=2, padding=1)
        self.dw = nn.Conv1d(8, 8, 5, groups=8, padding=2, stride=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.c1(x)))).mean(-1))


def test_grouped_conv1d():
    m = GroupedConv1d()
    g = build_graph(m)
    # nodes: 4 inputs + 8 + 8 + 2 outputs = 22
    # edges: c1 8*(4/2)*3 = 48, depthwise 8*1*5 = 40, fc 16 -> 104; slots: 8 + 8 + 2 = 18
    assert counts(g) == (22, 104, 18)
    check_bijection(g, m)
    inputs = g.edge_index[0, :48].view(8, 2, 3)
    in_nodes = torch.nonzero(g.node_type == NodeType.INPUT).flatten()
    for o in range(8):  # output channel o of group o // 4 reads inputs 2*(o//4) + i
        assert inputs[o, :, 0].tolist() == in_nodes[2 * (o // 4): 2 * (o // 4) + 2].tolist()
    # depthwise: channel c -> c, 5 taps with 1-D offsets (0, dx)
    dw = g.edge_index[:, 48:88].view(2, 8, 5)
    assert torch.equal(dw[0, :, 0], row_nodes(g, "c1.weight"))
    assert g.edge_pos[48:53].tolist() == [[0, -1], [0, -0.5], [0, 0], [0, 0.5], [0, 1]]


def test_grouped_conv1d_permutation():
    a, b = GroupedConv1d(), GroupedConv1d()
    p = group_perm(8, 2)  # within conv groups only: inputs are not permutable
    p = torch.cat([p[p < 4], p[p >= 4]])  # keep group order: groups read different inputs
    with torch.no_grad():
        b.c1.weight.copy_(a.c1.weight[p]); b.c1.bias.copy_(a.c1.bias[p])
        b.dw.weight.copy_(a.dw.weight[p]); b.dw.bias.copy_(a.dw.bias[p])
        b.fc.weight.copy_(a.fc.weight[:, p]); b.fc.bias.copy_(a.fc.bias)
    check_permuted(a, b, {"c1.weight": p, "dw.weight": p}, torch.randn(2, 4, 9))


# ------------------------------------------------------------ 3-D convs
class Conv3dNet(nn.Module):
    """Conv3d -> BatchNorm3d -> ConvTranspose3d (grouped) -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3)
        self.bn = nn.BatchNorm3d(4)
        self.up = nn.ConvTranspose3d(4, 6, (1, 2, 2), stride=(1, 2, 2), groups=2)
        self.fc = nn.Linear(6 * 2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.up(torch.relu(self.bn(self.c1(x)))).flatten(1))


def test_conv3d_and_its_transpose_are_wired_per_channel_with_their_taps():
    m = Conv3dNet()
    g = build_graph(m, torch.randn(2, 2, 4, 4, 4), strict=True)
    # nodes: 2 inputs + 4 + 6 + 3 outputs; edges: 4*2*27 + 4*3*4 + 192*3; slots: 4 + 4 + 4 (bn) + 6 + 3
    assert counts(g) == (15, 216 + 48 + 576, 21)
    check_bijection(g, m)
    in_nodes = torch.nonzero(g.node_type == NodeType.INPUT).flatten()
    c1 = row_nodes(g, "c1.weight")
    src = g.edge_index[0, :216].view(4, 2, 27)
    assert torch.equal(src, in_nodes.view(1, 2, 1).expand(4, 2, 27))
    # taps: (dy, dx) of the two inner kernel axes, the same at every depth
    pos = g.edge_pos[:27].view(3, 9, 2)
    assert torch.equal(pos, pos[:1].expand(3, 9, 2))
    assert pos[0, :, 0].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1] and pos[0, :, 1].tolist() == [-1, 0, 1] * 3
    up_src, up_dst = g.edge_index[:, 216:264].view(2, 4, 3, 4)       # [in, out/g, taps]: in c -> out of c's group
    assert torch.equal(up_src, c1.view(4, 1, 1).expand(4, 3, 4))
    up = torch.unique(up_dst)
    assert torch.equal(up_dst[:2], up_dst[:1].expand(2, 3, 4)) and torch.equal(up_dst[2:], up_dst[2:3].expand(2, 3, 4))
    assert up.numel() == 6 and not set(up_dst[0].flatten().tolist()) & set(up_dst[2].flatten().tolist())
    assert set(g.edge_index[0, 264:].tolist()) == set(up.tolist())    # the flatten keeps channel nodes


def test_conv3d_permutation():
    a, b = Conv3dNet(), Conv3dNet()
    p = torch.tensor([1, 0, 3, 2])   # within the transpose's groups of 2 input channels
    with torch.no_grad():
        b.load_state_dict(a.state_dict())
        b.c1.weight.copy_(a.c1.weight[p]); b.c1.bias.copy_(a.c1.bias[p])
        b.bn.weight.copy_(a.bn.weight[p]); b.bn.bias.copy_(a.bn.bias[p])
        b.up.weight.copy_(a.up.weight[p])
    check_permuted(a, b, {"c1.weight": p}, torch.randn(2, 2, 4, 4, 4))


# ------------------------------------------------------------ concatenation
class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 5)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))


def test_concatenation():
    m = CatNet()
    g = build_graph(m)
    # nodes: 4 inputs + 3 + 5 branch neurons + 2 outputs = 14
    # edges: 4*3 + 4*5 + 8*2 = 48; slots: 3 + 5 + 2 = 10
    assert counts(g) == (14, 48, 10)
    check_bijection(g, m)
    _, s, e = _slice(g, "out.weight")
    cols = g.edge_index[0, s:e].view(2, 8)[0]
    assert torch.equal(cols, torch.cat([row_nodes(g, "a.weight"), row_nodes(g, "b.weight")]))


def test_concatenation_permutation():
    a, b = CatNet(), CatNet()
    pa, pb = perm(3), perm(5)
    with torch.no_grad():
        b.a.weight.copy_(a.a.weight[pa]); b.a.bias.copy_(a.a.bias[pa])
        b.b.weight.copy_(a.b.weight[pb]); b.b.bias.copy_(a.b.bias[pb])
        b.out.weight.copy_(a.out.weight[:, torch.cat([pa, 3 + pb])]); b.out.bias.copy_(a.out.bias)
    check_permuted(a, b, {"a.weight": pa, "b.weight": pb}, torch.randn(3, 4))


# ------------------------------------------------------------ fallback paths
class Scale(nn.Module):
    """Uses its parameter through a reduction: no capture can structure it."""
    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.logsumexp(self.s, 0)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.scale = Scale(5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.scale(self.fc1(x)))


def test_unsupported_module_non_strict_warns_once():
    m = WithCustom()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = build_graph(m)
        assert build_graph(m) is g            # cached: no second warning
    ours = [w for w in caught if "build_graph" in str(w.message)]
    assert len(ours) == 1
    assert "scale" in str(ours[0].message) and "Scale" in str(ours[0].message)
    assert g.unstructured == ["scale.s"]
    check_bijection(g, m)
    # nodes: 4 + 5 + 2 + one TENSOR node; fc edges 20 + 10; slots 5 + 2 biases + 5 fallback
    assert counts(g) == (12, 30, 12)
    t = torch.nonzero(g.node_type == NodeType.TENSOR).flatten()
    assert t.numel() == 1
    fb = g.entry_kind == EntryKind.FALLBACK
    assert fb.sum() == 5 and (g.entry_node[fb] == t).all()


def test_unsupported_module_strict_raises():
    with pytest.raises(UnsupportedModuleError, match=r"scale \(Scale\)"):
        build_graph(WithCustom(), strict=True)


def test_gru_mapped_and_unmapped_builtin_falls_back():
    class RNNNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, batch_first=True)
            self.act = nn.Softmax2d()   # no parameters: passed through
            self.fc = nn.Linear(4, 2)
            self.lam = nn.Parameter(torch.ones(2, 2))

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.fc(out) @ torch.linalg.matrix_exp(self.lam)

    for capture in ("fx", "auto"):
        m = RNNNet()
        with pytest.warns(UserWarning, match="lam"):
            g = build_graph(m, capture=capture, use_cache=False)
        check_bijection(g, m)
        assert g.unstructured == ["lam"]
        # GRU: 3 gates x 4 units x (3 inputs + 4 recurrent) edges, fc 8
        assert (g.edge_kind == EdgeKind.LINEAR).sum() == 3 * 4 * 7 + 8


def test_untraceable_root_recorded_eagerly():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6)
            self.fc2 = nn.Linear(6, 2)
            self.extra = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.fc2(torch.relu(self.fc1(x))) + self.extra.sum()

    m = DataDependent()
    # fx alone: the root cannot be traced, children are structured each on its own
    with pytest.warns(UserWarning, match="could not be traced"):
        g = build_graph(m, capture="fx")
    check_bijection(g, m)
    assert g.unstructured == ["extra"] and g.capture.startswith("per-module")
    assert g.num_edges == 4 * 6 + 6 * 2
    # auto: the eager run (on inputs guessed from fc1) follows the branch and keeps the wiring
    with pytest.warns(UserWarning, match="extra"):
        g = build_graph(m)
    assert g.capture == "eager" and g.unstructured == ["extra"]
    assert torch.equal(torch.unique(g.edge_index[0, _slice(g, "fc2.weight")[1]:_slice(g, "fc2.weight")[2]]),
                       torch.unique(row_nodes(g, "fc1.weight")))
    with pytest.raises(UnsupportedModuleError):
        build_graph(m, strict=True)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.own = nn.Parameter(torch.ones(5))

    def forward(self, x):
        if x.mean() > 0:
            return self.inner(x) * self.own
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.branchy = Branchy()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.branchy(self.fc1(x)))


def test_untraceable_child_keeps_rest_structured():
    m = Outer()
    with pytest.warns(UserWarning, match="branchy"):
        g = build_graph(m, capture="fx")
    check_bijection(g, m)
    assert g.unstructured == ["branchy.own"]
    assert g.num_edges == 15 + 25 + 10
    # fc1 -> fc2 is still wired through inputs and outputs of the network
    assert (g.node_type == NodeType.INPUT).sum() == 3 and (g.node_type == NodeType.OUTPUT).sum() == 2


def test_eager_follows_the_branch_taken():
    m = Outer()
    with torch.no_grad():
        m.fc1.weight.zero_(); m.fc1.bias.fill_(1.0)     # mean > 0: the branch with inner runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = build_graph(m, torch.randn(2, 3))
    check_bijection(g, m)
    assert g.capture == "eager" and g.unstructured == []
    # own scales inner's outputs: NORM_WEIGHT entries on inner's units, which fc2 reads
    k, a, b = _slice(g, "branchy.own")
    inner = row_nodes(g, "branchy.inner.weight")
    assert torch.equal(g.entry_node[a - g.num_edges:b - g.num_edges], inner)
    assert (g.entry_kind[a - g.num_edges:b - g.num_edges] == EntryKind.NORM_WEIGHT).all()
    _, a2, b2 = _slice(g, "fc2.weight")
    assert torch.equal(g.edge_index[0, a2:b2].view(2, 5)[0], inner)


def test_tied_weights_and_shared_module():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.mix = nn.Linear(4, 4)
            self.head = nn.Linear(4, 10)
            self.head.weight = self.emb.weight   # tied

        def forward(self, tokens):
            h = self.mix(torch.tanh(self.mix(self.emb(tokens))))  # same module twice
            return self.head(h)

    m = Tied()
    names = [n for n, _ in m.named_parameters()]
    assert "head.weight" not in names      # one Parameter, one name
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # everything is structured: no warning
        g = build_graph(m)
    check_bijection(g, m)
    # edges: embedding 40 + mix 16 (its second call and the tied head add no edges)
    assert g.num_edges == 56 and g.num_entries == 4 + 10


# ------------------------------------------------------------ cache / draw / speed
def test_cache_and_invalidation():
    m = mlp()
    g = build_graph(m)
    assert build_graph(m) is g
    m[4] = nn.Linear(6, 4)
    g2 = build_graph(m)
    assert g2 is not g and (g2.node_type == NodeType.OUTPUT).sum() == 4


def test_draw_graph(tmp_path):
    g = build_graph(ResNetBlockNet())
    path = draw_graph(g, str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 1000 and path.endswith(".png")
    with pytest.raises(ValueError, match="max_nodes"):
        draw_graph(g, str(tmp_path / "big.png"), max_nodes=10)


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path, monkeypatch):
    # Library plots must not switch a notebook user's backend (nor import pyplot).
    # In-process: pyplot is taken out of sys.modules (restored afterwards) so that
    # an import of it by the plots shows, and the backend is put back at the end.
    import sys

    import matplotlib

    from l2o.graph import draw_graph
    from l2o.plots import plot_speedup

    for name in [m for m in sys.modules if m == "matplotlib.pyplot" or m.startswith("matplotlib.pyplot.")]:
        monkeypatch.delitem(sys.modules, name)
    backend = dict.__getitem__(matplotlib.rcParams, "backend")   # get_backend() may import pyplot
    matplotlib.use("pdf")
    try:
        draw_graph(build_graph(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))), str(tmp_path / "g.png"))
        plot_speedup({"t": {"gmn": 2.0}}, str(tmp_path / "s.png"))
        assert "matplotlib.pyplot" not in sys.modules
        assert matplotlib.get_backend() == "pdf"
    finally:
        dict.__setitem__(matplotlib.rcParams, "backend", backend)
    assert (tmp_path / "g.png").stat().st_size > 1000 and (tmp_path / "s.png").stat().st_size > 1000


def test_to_pyg():
    g = build_graph(mlp())
    data = g.to_pyg()
    assert data.num_nodes == g.num_nodes and data.edge_index.shape == (2, g.num_edges)


def test_flatten_non_square_map_with_example_input():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 3, 4))
    g = build_graph(m, example_inputs=torch.randn(1, 2, 2, 3))
    # nodes 2 + 3 + 4 = 9; edges 3*2*9 + 4*18 = 126
    assert counts(g)[:2] == (9, 126)
    _, s, e = _slice(g, "3.weight")
    pos = g.edge_pos[s:e].view(4, 18, 2)[0]
    # column 6 + 5 = channel 1, y=1, x=2 of a 2 x 3 map
    assert pos[11].tolist() == [1.0, 1.0] and pos[7].tolist() == [-1.0, 0.0]


def test_shape_propagation_restores_each_submodule_mode():
    # A frozen BatchNorm kept in eval mode inside a training model must stay in eval mode.
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(3 * 2 * 3, 4)).train()
    m[1].eval()
    build_graph(m, example_inputs=torch.randn(1, 2, 2, 3), use_cache=False)
    assert m.training and m[0].training and not m[1].training and m[4].training


class _MaxNormBag(nn.Module):
    """Token ids through an embedding that renormalises, in place, the rows it looks up."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, max_norm=1.0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_building_leaves_a_max_norm_embedding_unchanged(capture):
    torch.manual_seed(0)
    m = _MaxNormBag()
    before = m.emb.weight.detach().clone()
    assert (before.norm(dim=1) > 1.0).sum() > 10          # the made-up ids would renormalise these rows
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)    # restored, so no parameter is reported as changed
        build_graph(m, example_inputs=torch.randint(0, 20, (4, 6)), use_cache=False, capture=capture)
    assert torch.equal(m.emb.weight, before)
    # the optimizer builds the graph from made-up inputs of its own
    import l2o
    l2o.GMNOptimizer(m)
    assert torch.equal(m.emb.weight, before)


def test_a_model_made_under_inference_mode_is_still_captured_eagerly():
    """Inference tensors keep no version counter, which the check for in-place writes reads."""
    with torch.inference_mode():
        m = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 2))
        bag = _MaxNormBag()
    assert build_graph(m, example_inputs=torch.randn(2, 4), use_cache=False).capture == "eager"
    before = bag.emb.weight.clone()
    build_graph(bag, example_inputs=torch.randint(0, 20, (4, 6)), use_cache=False)
    assert torch.equal(bag.emb.weight, before)


def test_a_forward_that_writes_its_parameters_is_named_in_a_warning():
    class Clipping(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            with torch.no_grad():
                self.fc.weight.clamp_(-0.1, 0.1)             # weight clipping done in the forward
            return self.out(self.fc(x).relu())

    m = Clipping()
    with pytest.warns(RuntimeWarning, match=r"changed fc\.weight in place"):
        build_graph(m, example_inputs=torch.randn(2, 4), use_cache=False)


def test_failed_shape_propagation_warns():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 3, 4))
    with pytest.warns(UserWarning, match=r"shape propagation .* failed .*RuntimeError"):
        g = build_graph(m, example_inputs=torch.randn(1, 5, 2, 3), use_cache=False)   # 5 channels, not 2
    check_bijection(g, m)


def test_cache_keys_on_example_input_shapes():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 3, 4))
    g23 = build_graph(m, example_inputs=torch.randn(1, 2, 2, 3))
    assert build_graph(m, example_inputs=torch.randn(1, 2, 2, 3)) is g23
    g32 = build_graph(m, example_inputs=torch.randn(1, 2, 3, 2))      # same 18 features, 3 x 2 maps
    assert g32 is not g23 and not torch.equal(g32.edge_pos, g23.edge_pos)
    # a later call without inputs (the optimizer's) reuses the graph recorded with them
    assert build_graph(m) is g32
    assert build_graph(m, capture="fx") is not g32


def test_untraceable_without_unstructured_params_still_warns():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    m = Root()
    with pytest.warns(UserWarning, match="every parameter is structured.*could not be traced"):
        g = build_graph(m)
    assert g.unstructured == [] and g.num_edges == 9
    check_bijection(g, m)


def test_bare_transformer_encoder_as_model():
    m = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                              norm=nn.LayerNorm(8), enable_nested_tensor=False)
    g = build_graph(m)
    # the residual stream merges with the 8 input neurons (INPUT wins the merge);
    # per layer 24 q/k/v + 16 FF hidden nodes: 8 + 2 * 40 = 88 nodes
    # edges per layer: in_proj 192 + out_proj 64 + linear1 128 + linear2 128 = 512
    # slots per layer: 24 + 8 + norm1 16 + 16 + 8 + norm2 16 = 88; final norm 16
    assert counts(g) == (88, 1024, 2 * 88 + 16)
    assert g.unstructured == []
    check_bijection(g, m)


class FusedQKV(nn.Module):
    """Hand-written single-head attention with a fused qkv projection."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.o = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
        return self.head(x + self.o(att @ v))


def test_functional_attention_chunk_and_matmul():
    m = FusedQKV()
    g = build_graph(m)
    # nodes: 8 inputs (merged with o's outputs by the residual) + qkv 24, of
    #   which q and k merge pairwise (q @ k^T contracts them) -> 16, + 3 outputs = 27
    # edges: qkv 24*8 + o 8*8 (from the v neurons) + head 3*8 = 280
    # slots: ln 16 + qkv bias 24 + o bias 8 + head bias 3 = 51
    assert counts(g) == (27, 280, 51)
    check_bijection(g, m)
    q, k, v = row_nodes(g, "qkv.weight").split(8)
    assert torch.equal(q, k) and not torch.equal(q, v)
    _, s, e = _slice(g, "o.weight")
    assert torch.equal(g.edge_index[0, s:e].view(8, 8)[0], v)

"""Mixture-of-experts layers (3-D expert tensors) and tied LM heads.

MoE: each expert a gated MLP between the same hidden units, the router a
Linear; every layout HF's experts modules use (concatenated / interleaved
gate-up rows, transposed, biases, no gate); the GMN's update commutes with
permuting experts and the units inside one expert. Tied heads: the logits
are the token nodes, typed OUTPUT (plain PyTorch, HF GPT-2; both tracers).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import l2o
from l2o.graph import EntryKind, NodeType, build_graph
from graph_helpers import part, random_gmn_update

tr = pytest.importorskip("transformers")
tr.logging.set_verbosity_error()

D = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=50)


def quiet_build(model, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # fully structured: no warning at all
        return build_graph(model, *a, use_cache=False, **kw)


def mixtral(experts=4):
    torch.manual_seed(0)
    return tr.MixtralForCausalLM(tr.MixtralConfig(**D, num_key_value_heads=2, max_position_embeddings=16,
                                                  num_local_experts=experts, num_experts_per_tok=2))


def qwen2_moe():
    torch.manual_seed(0)
    return tr.Qwen2MoeForCausalLM(tr.Qwen2MoeConfig(
        **D, num_key_value_heads=2, max_position_embeddings=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=24))


# ------------------------------------------------------------------ MoE
@pytest.mark.parametrize("make", [mixtral, qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_hf_moe_experts_are_gated_mlps_between_the_hidden_units(make):
    m = make()
    g = quiet_build(m)
    assert g.capture == "eager" and g.fractions()["fallback"] == 0.0 and g.edge_components() == 1
    assert int((g.node_type == NodeType.OUTPUT).sum()) == D["vocab_size"]
    pre = "model.layers.0.mlp."
    src, units = part(g, pre + "experts.gate_up_proj")          # [E, 2I, H]
    E, rows, H = src.shape
    I = rows // 2
    stream = part(g, "model.layers.0.self_attn.o_proj.weight")[1][:, 0]   # residual stream [H]
    # every expert reads the hidden units its router reads (the post-attention norm's output)
    router_src, router_units = part(g, pre + "gate.weight")       # [E, H]
    assert torch.equal(src, router_src[0].view(1, 1, H).expand(E, rows, H))
    assert router_units[:, 0].unique().numel() == E
    # gate row j and up row j of expert e: one unit (e, j); experts' units disjoint
    assert torch.equal(units[:, :I], units[:, I:]) and bool((units == units[..., :1]).all())
    per_expert = units[:, :I, 0]
    assert per_expert.unique().numel() == E * I
    # down_proj[e, o, j]: unit (e, j) -> out o, out shared by the experts and merged into the stream
    dsrc, ddst = part(g, pre + "experts.down_proj")               # [E, H, I]
    assert torch.equal(dsrc, per_expert.view(E, 1, I).expand(E, H, I))
    assert torch.equal(ddst, stream.view(1, H, 1).expand(E, H, I))
    if make is qwen2_moe:
        # the shared expert writes the same units; its scalar gate is one unit of its own
        assert torch.equal(part(g, pre + "shared_expert.down_proj.weight")[1][:, 0], stream)
        gate_dst = part(g, pre + "shared_expert_gate.weight")[1]
        assert gate_dst.numel() == H and gate_dst.unique().numel() == 1
        assert not bool(torch.isin(gate_dst, stream).any())


class Experts(nn.Module):
    """A hand-made experts module in each layout HF's experts modules use."""

    def __init__(self, E=3, H=6, I=4, gated=True, transposed=False, concatenated=True, bias=False):
        super().__init__()
        self.is_transposed, self.is_concatenated, self.has_bias = transposed, concatenated, bias
        rows = 2 * I if gated else I
        up = (E, H, rows) if transposed else (E, rows, H)
        name = "gate_up_proj" if gated else "up_proj"
        setattr(self, name, nn.Parameter(torch.randn(up) * 0.3))
        self.down_proj = nn.Parameter(torch.randn((E, I, H) if transposed else (E, H, I)) * 0.3)
        if bias:
            setattr(self, name + "_bias", nn.Parameter(torch.randn(E, rows) * 0.1))
            self.down_proj_bias = nn.Parameter(torch.randn(E, H) * 0.1)
        self.gated, self.E = gated, E

    def forward(self, x):          # every expert, weighted equally (the mapping ignores routing)
        up = self.gate_up_proj if self.gated else self.up_proj
        out = 0
        for e in range(self.E):
            w = up[e] if self.is_transposed else up[e].T
            h = x @ w
            if self.has_bias:
                h = h + (self.gate_up_proj_bias if self.gated else self.up_proj_bias)[e]
            if self.gated:
                g, u = (h.chunk(2, -1) if self.is_concatenated else (h[..., 0::2], h[..., 1::2]))
                h = torch.sigmoid(g) * u
            wd = self.down_proj[e] if self.is_transposed else self.down_proj[e].T
            y = h @ wd
            out = out + (y + self.down_proj_bias[e] if self.has_bias else y)
        return out


class MoENet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.router = nn.Linear(6, 3, bias=False)
        self.experts = Experts(**kw)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        weights = torch.softmax(self.router(h), -1)       # routing: no units of its own beyond the router's
        return self.head(h + self.experts(h) * weights.sum(-1, keepdim=True))


@pytest.mark.parametrize("layout", [
    dict(), dict(concatenated=False), dict(transposed=True), dict(transposed=True, concatenated=False),
    dict(bias=True), dict(gated=False), dict(gated=False, transposed=True, bias=True)])
@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_expert_layouts(layout, capture):
    E, H, I = 3, 6, 4
    m = MoENet(**layout)
    g = quiet_build(m, (torch.randn(2, 5),), capture=capture)
    assert g.fractions()["fallback"] == 0.0 and g.edge_components() == 1
    x_units = part(g, "inp.weight")[1][:, 0]
    gated, transposed = layout.get("gated", True), layout.get("transposed", False)
    name = "experts.gate_up_proj" if gated else "experts.up_proj"
    src, dst = part(g, name)
    if transposed:
        src, dst = src.transpose(1, 2), dst.transpose(1, 2)       # -> [E, rows, H]
    assert torch.equal(src, x_units.view(1, 1, H).expand_as(src))
    rows = dst[..., 0]                                            # [E, rows]
    assert bool((dst == rows.unsqueeze(-1)).all())
    if gated:
        g_rows, u_rows = (rows[:, :I], rows[:, I:]) if layout.get("concatenated", True) else (rows[:, 0::2],
                                                                                               rows[:, 1::2])
        assert torch.equal(g_rows, u_rows)
        rows = g_rows
    assert rows.unique().numel() == E * I
    dsrc, ddst = part(g, "experts.down_proj")
    if transposed:
        dsrc, ddst = dsrc.transpose(1, 2), ddst.transpose(1, 2)   # -> [E, H, I]
    assert torch.equal(dsrc, rows.view(E, 1, I).expand(E, H, I))
    out = ddst[0, :, 0]
    assert out.unique().numel() == H and bool((ddst == out.view(1, H, 1)).all())
    assert torch.equal(part(g, "head.weight")[0][0], out)        # the residual add merged them with h
    if layout.get("bias"):
        ub = part(g, name + "_bias")
        assert bool((ub.view(E, -1) == (dst[..., 0] if not transposed else part(g, name)[1][:, 0, :])).all())
        assert torch.equal(part(g, "experts.down_proj_bias"), out.expand(E, H))


def _perm(n, gen):
    p = torch.randperm(n, generator=gen)
    while torch.equal(p, torch.arange(n)):
        p = torch.randperm(n, generator=gen)
    return p


def gmn_update(model, x):
    return random_gmn_update(model, lambda m: m(x).logits.pow(2).mean())


@pytest.mark.parametrize("make,I", [(mixtral, D["intermediate_size"]), (qwen2_moe, 16)], ids=["mixtral", "qwen2_moe"])
def test_gmn_update_commutes_with_permuting_experts_and_their_units(make, I):
    a, b = make(), make()
    gen = torch.Generator().manual_seed(1)
    E = 4
    spec = []
    for layer in range(D["num_hidden_layers"]):
        pre = f"model.layers.{layer}.mlp."
        pe, pj = _perm(E, gen), _perm(I, gen)
        spec += [(pre + "gate.weight", 0, pe), (pre + "experts.gate_up_proj", 0, pe),
                 (pre + "experts.down_proj", 0, pe), (pre + "experts.gate_up_proj", 1, torch.cat([pj, I + pj])),
                 (pre + "experts.down_proj", 2, pj)]

    def permute(named):
        out = dict(named)
        for n, dim, idx in spec:
            out[n] = out[n].index_select(dim, idx)
        return out

    with torch.no_grad():
        pa = {n: p.detach().clone() for n, p in a.named_parameters()}
        for n, t in permute(pa).items():
            dict(b.named_parameters())[n].copy_(t)
    x = torch.randint(0, D["vocab_size"], (2, 6), generator=gen)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, atol=1e-5, rtol=1e-4)   # same function
    ua, ub = gmn_update(a, x), gmn_update(b, x)
    expect = permute(ua)
    scale = max(float(u.abs().max()) for u in ua.values())
    for n in ua:
        torch.testing.assert_close(ub[n], expect[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    assert not torch.allclose(ub["model.layers.0.mlp.experts.down_proj"], ua["model.layers.0.mlp.experts.down_proj"])


@pytest.mark.slow
@pytest.mark.parametrize("make", [mixtral, qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_gmn_optimizer_trains_moe(make):
    m = make()
    m.train()
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, D["vocab_size"], (2, 8), generator=gen)
    y = torch.randint(0, D["vocab_size"], (2, 8), generator=gen)
    opt = l2o.GMNOptimizer(m)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x).logits.reshape(-1, D["vocab_size"]), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses


# ------------------------------------------------------------------ tied heads
class TiedLM(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 12, bias=bias)
        self.out.weight = self.emb.weight

    def forward(self, t):
        return self.out(torch.tanh(self.mix(self.emb(t))))


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_tied_lm_logits_are_output_token_nodes(capture):
    m = TiedLM()
    g = quiet_build(m, (torch.randint(0, 12, (2, 5)),), capture=capture)
    assert g.fractions()["fallback"] == 0.0 and g.edge_components() == 1
    tokens = part(g, "emb.weight")[0][:, 0]                      # [12] source of W[t, :]
    assert torch.equal((g.node_type == NodeType.OUTPUT).nonzero().flatten(), tokens.sort().values)
    assert g.node_io_index[tokens].tolist() == list(range(12))   # logit t is output t
    assert torch.equal(part(g, "out.bias"), tokens)              # the head's bias on its logits
    assert (g.entry_kind[-12:] == EntryKind.BIAS).all()
    assert not bool((g.node_type == NodeType.INPUT).any())       # the tokens are the only inputs


def test_hf_gpt2_tied_head_has_output_nodes():
    torch.manual_seed(0)
    m = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16))
    assert m.lm_head.weight is m.transformer.wte.weight
    g = quiet_build(m)
    assert g.fractions()["fallback"] == 0.0 and g.edge_components() == 1
    tokens = part(g, "transformer.wte.weight")[0][:, 0]
    assert torch.equal((g.node_type == NodeType.OUTPUT).nonzero().flatten(), tokens.sort().values)
    assert g.node_io_index[tokens].tolist() == list(range(50))
    # the positions stay INPUT nodes (wpe's sources)
    assert bool((g.node_type[part(g, "transformer.wpe.weight")[0][:, 0]] == NodeType.INPUT).all())


def test_moe_experts_are_dense_blocks_and_the_chunked_step_follows_the_forward():
    """Expert weights are dense blocks (gate_up [E, 2I, H]: E*2I rows with one
    expert unit each; down [E, H, I]: E groups of H rows sharing the expert's
    units), so the chunked step aggregates them without a scatter; its
    trajectory is the forward's."""
    import copy

    from l2o.graph.blocks import EdgeBlock, edge_blocks

    base = mixtral()
    g = build_graph(base, use_cache=False)
    kinds = {g.param_names[g.flat_order[k]]: b for k, b in enumerate(edge_blocks(g))}
    up, down = kinds["model.layers.0.mlp.experts.gate_up_proj"], kinds["model.layers.0.mlp.experts.down_proj"]
    E, I, H = 4, D["intermediate_size"], D["hidden_size"]
    assert isinstance(up, EdgeBlock) and (up.groups, up.rows, up.cols) == (1, E * 2 * I, H)
    assert isinstance(down, EdgeBlock) and (down.groups, down.rows, down.cols) == (E, E * H, I)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, D["vocab_size"], (2, 8), generator=gen)
    y = torch.randint(0, D["vocab_size"], (2, 8), generator=gen)
    after = {}
    for impl in ("forward", "chunked"):
        m = copy.deepcopy(base)
        opt = l2o.GMNOptimizer(m, impl=impl)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x).logits.reshape(-1, D["vocab_size"]), y.reshape(-1)).backward()
            opt.step()
        after[impl] = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    moved = float((after["forward"] - torch.cat([p.detach().reshape(-1) for p in base.parameters()])).abs().max())
    assert moved > 1e-3
    torch.testing.assert_close(after["chunked"], after["forward"], atol=1e-6, rtol=1e-5)   # float rounding

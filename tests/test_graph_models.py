"""Everyday and Hugging Face models: which unit each edge joins, what falls
back (nothing, or < 0.5%), one connected graph, and training works.

Hugging Face models are tiny random-init configs (no downloads).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2o
from l2o.graph import EdgeKind, EntryKind, NodeType, build_graph, register_module, unregister_module
from graph_helpers import kinds, part

torch.manual_seed(0)


def quiet_build(model, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # fully structured: no warning at all
        return build_graph(model, *a, **kw)


def check_whole(g):
    assert g.fractions()["fallback"] == 0.0 and g.unstructured == []
    assert g.edge_components() == 1


# ------------------------------------------------------------------ RNNs
class LSTMLM(nn.Module):
    def __init__(self, kind=nn.LSTM, bidirectional=False):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = kind(6, 5, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 20)

    def forward(self, t):
        return self.head(self.rnn(self.emb(t))[0])


@pytest.mark.parametrize("kind,gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_rnn_language_model(kind, gates):
    m = LSTMLM(kind)
    g = quiet_build(m)
    check_whole(g)
    emb_dims = part(g, "emb.weight")[1][0]                       # [6]
    src, dst = part(g, "rnn.weight_ih_l0")                       # [G*5, 6]
    h0 = dst[:5, 0]
    assert torch.equal(src, emb_dims.expand(gates * 5, 6))       # input units -> gates
    assert torch.equal(dst[:, 0], h0.repeat(gates))              # gate g of unit j is unit j
    src, dst = part(g, "rnn.weight_hh_l0")
    assert torch.equal(src[0], h0) and torch.equal(dst[:, 0], h0.repeat(gates))   # recurrent
    src1, dst1 = part(g, "rnn.weight_ih_l1")
    h1 = dst1[:5, 0]
    assert torch.equal(src1[0], h0) and not bool(torch.isin(h1, h0).any())
    assert torch.equal(part(g, "head.weight")[0][0], h1)
    assert torch.equal(part(g, "rnn.bias_ih_l0"), h0.repeat(gates))
    # gates told apart by edge_pos along a row of the same (input, unit) pair
    i = g.flat_order.index(g.param_names.index("rnn.weight_ih_l0"))
    pos = g.edge_pos[g.tensor_slices[i]].view(gates, 5, 6, 2)[:, 0, 0, 0]
    assert pos.unique().numel() == gates


def test_plain_models_have_outputs():
    """LSTM/GRU/RNN LMs and an SDPA block: the head's units are OUTPUT nodes."""
    for m in (LSTMLM(nn.LSTM), LSTMLM(nn.GRU), LSTMLM(nn.RNN), SDPALM()):
        g = quiet_build(m)
        check_whole(g)
        out = part(g, "head.weight")[1][:, 0]
        assert (g.node_type[out] == NodeType.OUTPUT).all() and out.numel() == 20


class SDPALM(nn.Module):
    """A causal self-attention block written with F.scaled_dot_product_attention."""
    def __init__(self, vocab=20, d=16, heads=4):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(16, d) * 0.1)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, t):
        x = self.emb(t) + self.pos[: t.shape[1]]
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.heads, -1).transpose(1, 2) for z in self.qkv(self.norm(x)).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.o(a.transpose(1, 2).reshape(B, T, C)))


def test_bidirectional_gru_concatenates_directions():
    m = LSTMLM(nn.GRU, bidirectional=True)
    g = quiet_build(m)
    check_whole(g)
    fwd = part(g, "rnn.weight_ih_l0")[1][:5, 0]
    bwd = part(g, "rnn.weight_ih_l0_reverse")[1][:5, 0]
    assert torch.equal(part(g, "rnn.weight_ih_l1")[0][0], torch.cat([fwd, bwd]))


# ------------------------------------------------------------------ tied / bare / gated / norms
class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.pos = nn.Parameter(torch.randn(16, 8) * 0.1)        # learned positions, a bare parameter
        self.cls = nn.Parameter(torch.randn(1, 1, 8) * 0.1)      # a cls token
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.emb.weight                          # tied

    def forward(self, t):
        x = self.emb(t) + self.pos[: t.shape[1]]
        x = torch.cat([self.cls.expand(t.shape[0], -1, -1), x], dim=1)
        return self.out(torch.tanh(self.mix(x)))


def test_tied_head_bare_positions_and_cls_token():
    m = TiedLM()
    g = quiet_build(m)
    check_whole(g)
    tokens, dims = part(g, "emb.weight")                          # [12, 8] each
    dims = dims[0]
    # learned positions and the cls token: BIAS entries on the embedding units they are added to
    assert torch.equal(part(g, "pos"), dims.expand(16, 8))
    assert torch.equal(part(g, "cls"), dims.view(1, 1, 8))
    assert (kinds(g, "pos") == EntryKind.BIAS).all() and (kinds(g, "cls") == EntryKind.BIAS).all()
    # the tied head adds no edges: its logit t is token node t, its input units the embedding's
    assert "out.weight" not in g.param_names
    assert torch.equal(part(g, "mix.weight")[0][0], dims)
    assert any("tied" in n for n in g.notes)
    # with the head tied, the logits are the token nodes: typed OUTPUT (also the embedding's sources)
    assert (g.node_type[tokens[:, 0]] == NodeType.OUTPUT).all()
    assert sorted(g.node_io_index[tokens[:, 0]].tolist()) == list(range(12))


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.norm = nn.RMSNorm(6)
        self.gate, self.up = nn.Linear(6, 10, bias=False), nn.Linear(6, 10, bias=False)
        self.down = nn.Linear(10, 3)
        self.scale = nn.Parameter(torch.ones(6))                   # a hand-written RMSNorm's scale

    def forward(self, x):
        h = self.norm(self.inp(x))
        h = self.scale * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.down(F.silu(self.gate(h)) * self.up(h))


def test_swiglu_and_rms_norms():
    m = SwiGLU()
    g = quiet_build(m)
    check_whole(g)
    units = part(g, "inp.weight")[1][:, 0]
    assert torch.equal(part(g, "norm.weight"), units) and torch.equal(part(g, "scale"), units)
    assert (kinds(g, "scale") == EntryKind.NORM_WEIGHT).all()
    gate = part(g, "gate.weight")[1][:, 0]
    assert torch.equal(part(g, "up.weight")[1][:, 0], gate)         # the product merges gate/up units
    assert torch.equal(part(g, "down.weight")[0][0], gate)
    assert torch.equal(part(g, "gate.weight")[0][0], units)


def test_functional_glu():
    m = nn.Sequential(nn.Linear(4, 20), nn.GLU(), nn.Linear(10, 3))
    g = quiet_build(m)
    check_whole(g)
    both = part(g, "0.weight")[1][:, 0]
    assert torch.equal(both[:10], both[10:])                     # halves multiplied: one unit each
    assert torch.equal(part(g, "2.weight")[0][0], both[:10])


# ------------------------------------------------------------------ register_module
class LowRank(nn.Module):
    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.V = nn.Parameter(torch.randn(rank, d_in) / d_in ** 0.5)
        self.U = nn.Parameter(torch.randn(d_out, rank) / rank ** 0.5)
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.einsum("bi,ri->br", x, self.V) @ self.U.T + self.b


def map_low_rank(ctx, m, x):
    h = ctx.linear(m.V, x)                 # V[r, i]: edge x_i -> new rank unit r
    return ctx.linear(m.U, h, bias=m.b)    # U[o, r]: edge r -> new unit o; b on o


def test_register_module_worked_example():
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), LowRank(5, 4, 2), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="LowRank"):
        g = build_graph(net)
    assert set(g.unstructured) == {"2.V", "2.U", "2.b"}
    register_module(LowRank, map_low_rank)
    try:
        g = quiet_build(net)
        check_whole(g)
        a = part(g, "0.weight")[1][:, 0]
        v_src, v_dst = part(g, "2.V")
        u_src, u_dst = part(g, "2.U")
        assert torch.equal(v_src[0], a) and torch.equal(u_src[0], v_dst[:, 0])
        assert torch.equal(part(g, "2.b"), u_dst[:, 0]) and torch.equal(part(g, "3.weight")[0][0], u_dst[:, 0])
        g_fx = quiet_build(net, capture="fx")       # the fx fallback keeps it whole too
        assert torch.equal(part(g_fx, "2.U")[0][0], part(g_fx, "2.V")[1][:, 0])
    finally:
        unregister_module(LowRank)


def test_warning_once_and_not_again_for_the_optimizer():
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), LowRank(5, 4, 2), nn.Linear(4, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_graph(net, torch.randn(2, 3))
        l2o.GMNOptimizer(net, weights=None)
    ours = [str(w.message) for w in caught if "build_graph" in str(w.message)]
    assert len(ours) == 1
    msg = ours[0]
    assert "%" in msg and "LowRank" in msg and "register_module" in msg and msg.count("\n") == 0


# ------------------------------------------------------------------ Hugging Face
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
tr = transformers
D = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=50)


def _ids(n=8):
    return torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(1))


HF = {
    "gpt2": (lambda: tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50,
                                                       n_positions=16)),
             lambda m: m(_ids(), labels=_ids()).loss),
    "bert": (lambda: tr.BertForMaskedLM(tr.BertConfig(**D, max_position_embeddings=16)),
             lambda m: m(_ids(), labels=_ids()).loss),
    "llama": (lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**D, num_key_value_heads=2, max_position_embeddings=16)),
              lambda m: m(_ids(), labels=_ids()).loss),
    "t5": (lambda: tr.T5ForConditionalGeneration(tr.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4,
                                                             d_kv=8, vocab_size=50, decoder_start_token_id=0, pad_token_id=0)),
           lambda m: m(input_ids=_ids(), labels=_ids(4)).loss),
    "vit": (lambda: tr.ViTForImageClassification(tr.ViTConfig(
        **{k: v for k, v in D.items() if k != "vocab_size"}, image_size=16, patch_size=4, num_labels=3)),
        lambda m: m(pixel_values=torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)),
                    labels=torch.tensor([0, 2])).loss),
    "resnet": (lambda: tr.ResNetForImageClassification(tr.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
        lambda m: m(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                    labels=torch.tensor([0, 2])).loss),
}


@pytest.mark.parametrize("name", list(HF))
def test_hf_tiny_configs_structured(name):
    torch.manual_seed(0)
    m = HF[name][0]()
    g = quiet_build(m)
    assert g.capture == "eager"
    assert g.fractions()["fallback"] < 0.005
    assert g.edge_components() == 1
    assert g.num_edges == sum(g.numels[: g.num_edge_params])
    io = (g.node_type == NodeType.OUTPUT).sum() + (g.node_type == NodeType.INPUT).sum()
    assert io > 0
    if name in ("vit", "resnet"):
        assert (g.node_type == NodeType.OUTPUT).sum() == 3       # the class logits


def test_hf_gpt2_conv1d_wiring():
    m = HF["gpt2"][0]()
    g = quiet_build(m)
    stream = part(g, "transformer.wte.weight")[1][0]                 # residual stream units
    src, dst = part(g, "transformer.h.0.attn.c_attn.weight")         # Conv1D: [in, out]
    assert torch.equal(src[:, 0], stream)                            # rows are inputs
    q, k, v = dst[0].split(32)
    assert torch.equal(q, k)                                         # q/k paired by the scores
    p_src, p_dst = part(g, "transformer.h.0.attn.c_proj.weight")
    assert torch.equal(p_src[:, 0], v) and torch.equal(p_dst[0], stream)
    assert torch.equal(part(g, "transformer.h.0.ln_1.weight"), stream)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_t5_relative_position_tables_join_their_heads(impl):
    """T5's relative-position table (one per stack, built in layer 0 and
    added to every self-attention's scores) is an embedding from distance
    buckets to heads. Column h feeds head h of the first attention that reads
    it: the table's head node and that head's q/k units are one node (a
    score bias belongs to the head as a whole). Later layers, the decoder's
    cross-attention and every v/o unit keep their units."""
    torch.manual_seed(0)
    m = HF["t5"][0]()
    m.config._attn_implementation = impl
    g = quiet_build(m)
    H, d = 4, 8
    stream = part(g, "shared.weight")[1][0]                               # [32] residual stream (tied)
    for stack, attn_names in (("encoder", ["layer.0.SelfAttention"]),
                              ("decoder", ["layer.0.SelfAttention", "layer.1.EncDecAttention"])):
        src, dst = part(g, f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")  # [32, H]
        buckets, heads = src[:, 0], dst[0]
        assert torch.equal(src, buckets.view(-1, 1).expand(-1, H)) and torch.equal(dst, heads.expand(32, H))
        assert bool((g.node_type[buckets] == NodeType.INPUT).all()) and heads.unique().numel() == H
        for block in (0, 1):
            for attn in attn_names:
                pre = f"{stack}.block.{block}.{attn}"
                q_src, q_dst = part(g, f"{pre}.q.weight")                   # [H*d, 32]
                k_src, k_dst = part(g, f"{pre}.k.weight")
                v_dst = part(g, f"{pre}.v.weight")[1][:, 0]
                o_src, o_dst = part(g, f"{pre}.o.weight")
                assert torch.equal(q_dst, k_dst)                            # q/k paired by the scores
                if stack == "encoder" or attn.endswith("SelfAttention"):
                    assert torch.equal(q_src[0], stream)
                assert torch.equal(o_src[0], v_dst) and v_dst.unique().numel() == H * d
                assert torch.equal(o_dst[:, 0], stream)
                qk = q_dst[:, 0].view(H, d)
                if block == 0 and attn.endswith("SelfAttention"):
                    assert torch.equal(qk, heads.view(H, 1).expand(H, d))   # head h: one node, the table's
                else:
                    assert qk.unique().numel() == H * d and not bool(torch.isin(qk, heads).any())
    check_whole(g)


def test_hf_llama_rms_norm_and_swiglu():
    m = HF["llama"][0]()
    g = quiet_build(m)
    stream = part(g, "model.embed_tokens.weight")[1][0]
    assert torch.equal(part(g, "model.layers.0.input_layernorm.weight"), stream)
    assert (kinds(g, "model.norm.weight") == EntryKind.NORM_WEIGHT).all()
    gate = part(g, "model.layers.0.mlp.gate_proj.weight")[1][:, 0]
    assert torch.equal(part(g, "model.layers.0.mlp.up_proj.weight")[1][:, 0], gate)
    assert torch.equal(part(g, "model.layers.0.mlp.down_proj.weight")[0][0], gate)
    # grouped-query attention: 4 q heads share 2 kv heads; q heads 0,1 pair with kv head 0
    q = part(g, "model.layers.0.self_attn.q_proj.weight")[1][:, 0].view(4, 8)
    k = part(g, "model.layers.0.self_attn.k_proj.weight")[1][:, 0].view(2, 8)
    assert torch.equal(q[0], k[0]) and torch.equal(q[1], k[0]) and torch.equal(q[2], k[1])
    v = part(g, "model.layers.0.self_attn.v_proj.weight")[1][:, 0].view(2, 8)
    o_src = part(g, "model.layers.0.self_attn.o_proj.weight")[0][0].view(4, 8)
    assert torch.equal(o_src[1], v[0]) and torch.equal(o_src[3], v[1])


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "t5", "vit", "resnet"])
def test_hf_training_loss_falls(name):
    make, loss_fn = HF[name]
    torch.manual_seed(0)
    m = make()
    m.train()
    opt = l2o.GMNOptimizer(m)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(m)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda x: x == x, losses))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_plain_lstm_and_tied_models_train():
    """The loss falls over 30 steps, and at least as far as with Adam at its
    default lr (what an untrained metanetwork amounts to; a useful learned
    optimizer must not do worse on its first steps)."""
    def train(make, optimizer):
        torch.manual_seed(0)
        m = make()
        t = torch.randint(0, 12, (4, 7))
        opt = optimizer(m)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            y = m(t)
            loss = F.cross_entropy(y[:, -7:, :12].reshape(-1, 12), t.reshape(-1))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses[:5]) / 5, sum(losses[-5:]) / 5

    for make in (lambda: LSTMLM(nn.LSTM), lambda: LSTMLM(nn.GRU), TiedLM, SDPALM):
        first, last = train(make, l2o.GMNOptimizer)
        _, adam_last = train(make, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
        assert last < 0.95 * first and last <= adam_last, (first, last, adam_last)


def test_hf_swin_relative_position_tables_join_their_heads():
    """Swin: each attention's relative-position bias table ``[R, H]``
    (``table[rel_index]`` added to the scores; in the shifted block together
    with the window mask) is an embedding from R relative positions to the
    heads: edges from R INPUT nodes to H head nodes, head h one node with
    head h's q/k units of that attention; v/o units untouched."""
    torch.manual_seed(0)
    m = tr.SwinModel(tr.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                   window_size=4))
    g = quiet_build(m)
    check_whole(g)
    seen = set()
    for stage, H in ((0, 2), (1, 4)):
        for block in (0, 1):
            pre = f"encoder.layers.{stage}.blocks.{block}.attention"
            src, dst = part(g, f"{pre}.relative_position_bias.relative_position_bias_table")   # [49, H]
            assert (kinds(g, f"{pre}.relative_position_bias.relative_position_bias_table")
                    == EdgeKind.EMBEDDING).all()
            pos, heads = src[:, 0], dst[0]
            assert torch.equal(src, pos.view(-1, 1).expand(-1, H)) and torch.equal(dst, heads.expand(49, H))
            assert (g.node_type[pos] == NodeType.INPUT).all() and pos.unique().numel() == 49
            assert heads.unique().numel() == H and not seen.intersection(pos.tolist() + heads.tolist())
            seen.update(pos.tolist() + heads.tolist())
            q, k = part(g, f"{pre}.q_proj.weight")[1][:, 0], part(g, f"{pre}.k_proj.weight")[1][:, 0]
            d = q.numel() // H
            assert torch.equal(q, k) and torch.equal(q.view(H, d), heads.view(H, 1).expand(H, d))
            v = part(g, f"{pre}.v_proj.weight")[1][:, 0]
            assert v.unique().numel() == H * d and torch.equal(part(g, f"{pre}.o_proj.weight")[0][0], v)


def test_hf_swinv2_logit_scale_on_head_nodes():
    """Swinv2's per-head ``logit_scale`` multiplies the scores: node-held
    (NORM_WEIGHT) by head h's node, which its position MLP's output h (the
    score bias) made one with head h's q/k units."""
    torch.manual_seed(0)
    m = tr.Swinv2Model(tr.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                       num_heads=[2, 4], window_size=4))
    g = quiet_build(m)
    check_whole(g)
    pre = "encoder.layers.1.blocks.1.attention.self"
    heads = part(g, f"{pre}.continuous_position_bias_mlp.2.weight")[1][:, 0]          # [4]
    assert torch.equal(part(g, f"{pre}.logit_scale").flatten(), heads)
    assert (kinds(g, f"{pre}.logit_scale") == EntryKind.NORM_WEIGHT).all()
    q = part(g, f"{pre}.query.weight")[1][:, 0].view(4, 8)
    assert torch.equal(q, heads.view(4, 1).expand(4, 8))


# ------------------------------------------------------------------ every config of the README table
def _hf_support():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "hf_support.py"
    spec = importlib.util.spec_from_file_location("hf_support", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HF_SUPPORT = _hf_support()
HF_TABLE = dict(HF_SUPPORT.configs())


def _readme_rows():
    import pathlib
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("| Model (tiny random config, transformers")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows[line.split("|")[1].strip()] = line
    return rows


@pytest.mark.parametrize("name", list(HF_TABLE))
def test_hf_support_table_configs(name):
    """Every architecture of the README table (bench/hf_support.py): < 0.5%
    fallback, one connected graph, OUTPUT nodes present (with a tied head:
    the token nodes its logits are); and the README's row is current (all
    columns but the loss)."""
    r = HF_SUPPORT.measure(HF_TABLE[name])
    assert r["capture"] == "eager" and r["fallback"] < 0.5 and r["pieces"] == 1, r
    assert r["outputs"] > 0, r
    row = _readme_rows().get(name)
    assert row is not None, f"{name} missing from the README table: rerun bench/hf_support.py --markdown"
    assert row.startswith(HF_SUPPORT.markdown_row(name, r)), (row, HF_SUPPORT.markdown_row(name, r))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", list(HF_TABLE))
def test_hf_support_table_configs_train(name):
    first, last = HF_SUPPORT.train(HF_TABLE[name])
    assert last < 0.9 * first, (first, last)

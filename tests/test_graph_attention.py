"""Attention symmetries: the GMN's update commutes with every permutation of
attention units that leaves the network's function unchanged.

For each attention kind, model B is model A with (i) q and k units permuted
jointly within each head, (ii) v units (and the matching output-projection
columns) permuted within each head, (iii) whole heads permuted -- all at once.
B computes the same function; the GMN's update on B must be A's update with
the same permutation applied, to float tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2o.graph import build_graph
from graph_helpers import random_gmn_update

E, H = 16, 4


@pytest.fixture(autouse=True)
def _fixed_inputs():
    """The tests draw their token ids from the global generator: seeded per
    test, so what they check does not depend on which tests ran before. (With
    other ids, about one entry in 256 of a random GMN's update on the HF models
    can differ from the permuted one by ~1e-4 of the largest update, float
    rounding that the Adam-normalised features amplify, over this tolerance.)"""
    torch.manual_seed(1234)
D = E // H


def _perm(n, g):
    p = torch.randperm(n, generator=g)
    while n > 1 and torch.equal(p, torch.arange(n)):
        p = torch.randperm(n, generator=g)
    return p


def draw_head_perms(g, within_qk=True, within_v=True, heads=H, d=D):
    """(head permutation, q/k unit permutation, v unit permutation) drawn from ``g``:
    whole heads move, and units move within each head."""
    hp = _perm(heads, g)
    dqk = _perm(d, g) if within_qk else torch.arange(d)
    dv = _perm(d, g) if within_v else torch.arange(d)
    p_qk = torch.cat([h * d + dqk for h in hp.tolist()])
    p_v = torch.cat([h * d + dv for h in hp.tolist()])
    return hp, p_qk, p_v


def head_perms(seed=0, within_qk=True, within_v=True, heads=H, d=D):
    return draw_head_perms(torch.Generator().manual_seed(seed), within_qk, within_v, heads, d)[1:]


def permuted(named: dict, spec: list) -> dict:
    """``named`` (name -> tensor) with ``index_select(dim, idx)`` applied per spec."""
    out = dict(named)
    for name, dim, idx in spec:
        out[name] = out[name].index_select(dim, idx)
    return out


def gmn_update(model, x, loss_fn):
    return random_gmn_update(model, lambda m: loss_fn(m, x))


def check_commutes(make, spec_fn, x, loss_fn=None):
    loss_fn = loss_fn or (lambda m, x: _out(m(x)).pow(2).mean())
    torch.manual_seed(0)
    a = make()
    b = make()
    spec = spec_fn(a)
    with torch.no_grad():
        pa = {n: p.detach().clone() for n, p in a.named_parameters()}
        for n, t in permuted(pa, spec).items():
            dict(b.named_parameters())[n].copy_(t)
    a.eval(), b.eval()
    with torch.no_grad():
        ya, yb = _out(a(x)), _out(b(x))
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-4)   # same function
    ua, ub = gmn_update(a, x, loss_fn), gmn_update(b, x, loss_fn)
    expect = permuted(ua, spec)
    scale = max(float(u.abs().max()) for u in ua.values())
    for n in ua:
        torch.testing.assert_close(ub[n], expect[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    pb = permuted(pa, spec)
    assert any(not torch.equal(pb[n], pa[n]) for n, _, _ in spec), "test permutation is trivial"
    assert not all(torch.allclose(ub[n], ua[n]) for n, _, _ in spec), "updates do not move"


def _out(y):
    if isinstance(y, tuple):
        return y[0]
    if hasattr(y, "logits"):
        return y.logits
    if hasattr(y, "last_hidden_state"):
        return y.last_hidden_state
    return y


def _attn_spec(prefix_q, prefix_k, prefix_v, out_w, p_qk, p_v, bias=True):
    spec = [(prefix_q + ".weight", 0, p_qk), (prefix_k + ".weight", 0, p_qk), (prefix_v + ".weight", 0, p_v),
            (out_w, 1, p_v)]
    if bias:
        spec += [(prefix_q + ".bias", 0, p_qk), (prefix_k + ".bias", 0, p_qk), (prefix_v + ".bias", 0, p_v)]
    return spec


# ------------------------------------------------------------------ torch modules
class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, 13)

    def forward(self, t):
        h = self.emb(t)
        return self.head(self.attn(h, h, h)[0] + h)


def _mha_spec(prefix):
    def spec(_):
        p_qk, p_v = head_perms()
        rows = torch.cat([p_qk, E + p_qk, 2 * E + p_v])
        return [(f"{prefix}.in_proj_weight", 0, rows), (f"{prefix}.in_proj_bias", 0, rows),
                (f"{prefix}.out_proj.weight", 1, p_v)]
    return spec


def test_multihead_attention():
    check_commutes(MHANet, _mha_spec("attn"), torch.randint(0, 13, (2, 6)))


class EncoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, E)
        self.block = nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 13)

    def forward(self, t):
        return self.head(self.block(self.emb(t)))


def test_transformer_encoder_layer():
    check_commutes(EncoderNet, _mha_spec("block.self_attn"), torch.randint(0, 13, (2, 6)))


class SDPABlock(nn.Module):
    """A hand-written block: separate q/k/v/out projections, functional attention."""
    def __init__(self, functional=True, causal=False):
        super().__init__()
        self.functional, self.causal = functional, causal
        self.emb = nn.Embedding(13, E)
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))
        self.head = nn.Linear(E, 13)

    def forward(self, t):
        x = self.emb(t)
        B, T, _ = x.shape

        def heads(z):
            return z.view(B, T, H, D).transpose(1, 2)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.functional:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / D ** 0.5, dim=-1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(B, T, E)))


@pytest.mark.parametrize("functional,causal", [(True, False), (True, True), (False, False)])
def test_sdpa_and_hand_written_attention(functional, causal):
    def spec(_):
        p_qk, p_v = head_perms()
        return _attn_spec("q", "k", "v", "o.weight", p_qk, p_v)
    check_commutes(lambda: SDPABlock(functional, causal), spec, torch.randint(0, 13, (2, 6)))


def test_sdpa_out_projection_reads_v_units():
    m = SDPABlock(True)
    g = build_graph(m)
    names = g.param_names

    def rows(name):
        k = g.flat_order.index(names.index(name))
        s = g.tensor_slices[k]
        return g.edge_index[1, s].view(E, E)[:, 0]

    k = g.flat_order.index(names.index("o.weight"))
    src = g.edge_index[0, g.tensor_slices[k]].view(E, E)[0]
    assert torch.equal(src, rows("v.weight"))              # column c of o is v unit c
    assert torch.equal(rows("q.weight"), rows("k.weight"))  # q unit (h, j) paired with k unit (h, j)
    assert not bool(torch.isin(src, rows("q.weight")).any())


# ------------------------------------------------------------------ Hugging Face
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(n_layer=2, n_embd=E, n_head=H, vocab_size=30,
                                                          n_positions=16, resid_pdrop=0, embd_pdrop=0,
                                                          attn_pdrop=0))


@pytest.mark.integration
def test_hf_gpt2_attention():
    def spec(m):
        out = []
        for i in range(2):
            p_qk, p_v = head_perms(seed=i)
            cols = torch.cat([p_qk, E + p_qk, 2 * E + p_v])
            pre = f"h.{i}.attn"
            out += [(f"{pre}.c_attn.weight", 1, cols), (f"{pre}.c_attn.bias", 0, cols),
                    (f"{pre}.c_proj.weight", 0, p_v)]
        return out
    check_commutes(_gpt2, spec, torch.randint(0, 30, (2, 6)))


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=E, num_hidden_layers=2, num_attention_heads=H, intermediate_size=24, vocab_size=30,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        add_pooling_layer=False)


def test_hf_bert_attention():
    def spec(m):
        out = []
        for i in range(2):
            p_qk, p_v = head_perms(seed=i)
            pre = f"encoder.layer.{i}.attention"
            out += _attn_spec(f"{pre}.self.query", f"{pre}.self.key", f"{pre}.self.value",
                              f"{pre}.output.dense.weight", p_qk, p_v)
        return out
    check_commutes(_bert, spec, torch.randint(0, 30, (2, 6)))


def _llama(kv_heads):
    return transformers.LlamaModel(transformers.LlamaConfig(
        hidden_size=E, num_hidden_layers=1, num_attention_heads=H, num_key_value_heads=kv_heads,
        intermediate_size=24, vocab_size=30, max_position_embeddings=16))


@pytest.mark.parametrize("kv_heads", [H, 2])
def test_hf_llama_attention_heads_and_v_units(kv_heads):
    # rotary embeddings pair q/k dims inside a head: only whole heads (with
    # their kv group) and v units within a head are symmetries here
    rep = H // kv_heads
    g = torch.Generator().manual_seed(3)
    groups = _perm(kv_heads, g)
    dv = _perm(D, g)
    kv_heads_order = groups.tolist()
    q_heads = [kh * rep + r for kh in kv_heads_order for r in range(rep)]
    p_q = torch.cat([h * D + torch.arange(D) for h in q_heads])
    p_k = torch.cat([h * D + torch.arange(D) for h in kv_heads_order])
    p_v = torch.cat([h * D + dv for h in kv_heads_order])
    p_o = torch.cat([kv_heads_order[h // rep] * D + dv for h in range(H)]) if rep > 1 else p_v
    if rep > 1:
        # o reads attention output of q head h, which is v of kv group h // rep, reordered with q heads
        p_o = torch.cat([q_heads[h] * D + dv for h in range(H)])

    def spec(_):
        pre = "layers.0.self_attn"
        return [(f"{pre}.q_proj.weight", 0, p_q), (f"{pre}.k_proj.weight", 0, p_k),
                (f"{pre}.v_proj.weight", 0, p_v), (f"{pre}.o_proj.weight", 1, p_o)]
    check_commutes(lambda: _llama(kv_heads), spec, torch.randint(0, 30, (2, 6)))


def _t5(impl):
    m = transformers.T5EncoderModel(transformers.T5Config(
        d_model=E, d_ff=24, num_layers=2, num_heads=H, d_kv=D, vocab_size=30, dropout_rate=0.0))
    m.config._attn_implementation = impl
    return m


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_t5_attention_with_relative_position_table(impl):
    """T5: the relative-position table is shared by every layer's heads, so
    whole heads permute together in all layers (and the table's columns with
    them); q/k and v units still permute within each head, independently per
    layer -- including the first layer, whose heads' q/k units are one node
    with the table's head node."""
    g = torch.Generator().manual_seed(5)
    hp = _perm(H, g)

    def spec(_):
        out = [("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1, hp)]
        for i in range(2):
            dqk, dv = _perm(D, g), _perm(D, g)
            p_qk = torch.cat([h * D + dqk for h in hp.tolist()])
            p_v = torch.cat([h * D + dv for h in hp.tolist()])
            pre = f"encoder.block.{i}.layer.0.SelfAttention"
            out += _attn_spec(f"{pre}.q", f"{pre}.k", f"{pre}.v", f"{pre}.o.weight", p_qk, p_v, bias=False)
        return out
    check_commutes(lambda: _t5(impl), spec, torch.randint(0, 30, (2, 6)))


def _swin(impl):
    torch.manual_seed(0)
    m = transformers.SwinModel(transformers.SwinConfig(
        image_size=16, patch_size=2, embed_dim=E, depths=[2], num_heads=[H], window_size=4,
        drop_path_rate=0.0))
    m.config._attn_implementation = impl
    with torch.no_grad():     # the tables start at zero: give them values to permute
        for n, p in m.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape) * 0.5)
    return m


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_swin_attention_with_relative_position_tables(impl):
    """Swin: each block's relative-position bias table (``table[rel_index]``
    added to the scores; the second block's with the shifted-window mask)
    biases one head per column, so whole heads permute with the table's
    columns; q/k and v units permute within each head (its q/k units are one
    node with the table's head node)."""
    g = torch.Generator().manual_seed(7)

    def spec(_):
        out = []
        for j in range(2):
            hp, p_qk, p_v = draw_head_perms(g)
            pre = f"encoder.layers.0.blocks.{j}.attention"
            out += _attn_spec(f"{pre}.q_proj", f"{pre}.k_proj", f"{pre}.v_proj", f"{pre}.o_proj.weight",
                              p_qk, p_v)
            out.append((f"{pre}.relative_position_bias.relative_position_bias_table", 1, hp))
        return out
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # the output is layer-normed, so its mean square is flat (gradients of pure
    # rounding noise): a fixed random readout instead
    w = torch.randn(2, 64, E, generator=torch.Generator().manual_seed(2))
    check_commutes(lambda: _swin(impl), spec, x, loss_fn=lambda m, x: (_out(m(x)) * w).sum())


def _swinv2():
    torch.manual_seed(0)
    m = transformers.Swinv2Model(transformers.Swinv2Config(
        image_size=16, patch_size=2, embed_dim=E, depths=[2], num_heads=[H], window_size=4,
        drop_path_rate=0.0))
    with torch.no_grad():     # per-head logit scales that differ
        for n, p in m.named_parameters():
            if n.endswith("logit_scale"):
                p.copy_(torch.rand(p.shape) + 1.0)
    return m


def test_hf_swinv2_attention_with_logit_scales_and_position_mlp():
    """Swinv2: cosine attention scaled per head (``logit_scale``, [H, 1, 1]),
    plus a bias from a small MLP over relative coordinates whose last layer
    has one output per head: whole heads permute with the scales and that
    layer's rows; q/k and v units within each head."""
    g = torch.Generator().manual_seed(8)

    def spec(_):
        out = []
        for j in range(2):
            hp, p_qk, p_v = draw_head_perms(g)
            pre = f"encoder.layers.0.blocks.{j}.attention"
            out += [(f"{pre}.self.query.weight", 0, p_qk), (f"{pre}.self.query.bias", 0, p_qk),
                    (f"{pre}.self.key.weight", 0, p_qk), (f"{pre}.self.value.weight", 0, p_v),
                    (f"{pre}.self.value.bias", 0, p_v), (f"{pre}.output.dense.weight", 1, p_v),
                    (f"{pre}.self.logit_scale", 0, hp),
                    (f"{pre}.self.continuous_position_bias_mlp.2.weight", 0, hp)]
        return out
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 64, E, generator=torch.Generator().manual_seed(2))
    check_commutes(_swinv2, spec, x, loss_fn=lambda m, x: (_out(m(x)) * w).sum())


def _beit(shared):
    torch.manual_seed(0)
    m = transformers.BeitModel(transformers.BeitConfig(
        hidden_size=E, num_hidden_layers=2, num_attention_heads=H, intermediate_size=24, image_size=16,
        patch_size=4, use_relative_position_bias=not shared, use_shared_relative_position_bias=shared,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0),
        add_pooling_layer=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape) * 0.5)
    return m


@pytest.mark.parametrize("shared", [False, True])
def test_hf_beit_attention_with_relative_position_tables(shared):
    """BEiT (tables with extra cls rows, re-assembled with torch.cat): a
    table per layer, or one shared by all layers (whole heads then permute
    together in every layer, with the table's columns)."""
    g = torch.Generator().manual_seed(9)
    hp_all = _perm(H, g)

    def spec(_):
        out = []
        for i in range(2):
            hp = hp_all if shared else _perm(H, g)
            dqk, dv = _perm(D, g), _perm(D, g)
            p_qk = torch.cat([h * D + dqk for h in hp.tolist()])
            p_v = torch.cat([h * D + dv for h in hp.tolist()])
            pre = f"layers.{i}"
            out += _attn_spec(f"{pre}.attention.q_proj", f"{pre}.attention.k_proj", f"{pre}.attention.v_proj",
                              f"{pre}.attention.o_proj.weight", p_qk, p_v, bias=False)
            out += [(f"{pre}.attention.q_proj.bias", 0, p_qk), (f"{pre}.attention.v_proj.bias", 0, p_v)]
            if not shared:
                out.append((f"{pre}.relative_position_bias.relative_position_bias_table", 1, hp))
        if shared:
            out.append(("shared_position_bias.relative_position_bias_table", 1, hp_all))
        return out
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 17, E, generator=torch.Generator().manual_seed(2))
    check_commutes(lambda: _beit(shared), spec, x, loss_fn=lambda m, x: (_out(m(x)) * w).sum())

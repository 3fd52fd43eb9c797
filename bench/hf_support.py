"""Which Hugging Face architectures the parameter graph structures, measured.

Builds the graph of tiny random-init configs (no downloads) and prints, per
model: capture used, % of parameters on edges / node slots / fallback,
connected pieces among edge-bearing nodes, input/output node counts, build
time, and whether ``GMNOptimizer`` (shipped weights) trains it: the loss
(see :func:`train`) averaged over the first and the last 5 of 30 steps. ``--markdown`` prints the README table; ``--no-train`` skips
training. ``tests/test_graph_models.py`` runs every config listed here.

Usage: .venv/bin/python bench/hf_support.py [--markdown] [--no-train]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from l2o.graph import EdgeKind, NodeType, build_graph

D = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100)


def configs():
    import transformers as tr
    out = [
        ("GPT-2", lambda: tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100,
                                                           n_positions=32))),
        ("GPT-2 (untied head)", lambda: tr.GPT2LMHeadModel(tr.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, tie_word_embeddings=False))),
        ("BERT", lambda: tr.BertModel(tr.BertConfig(**D, max_position_embeddings=32))),
        ("BERT (masked LM)", lambda: tr.BertForMaskedLM(tr.BertConfig(**D, max_position_embeddings=32))),
        ("RoBERTa", lambda: tr.RobertaModel(tr.RobertaConfig(**D, max_position_embeddings=40))),
        ("DistilBERT", lambda: tr.DistilBertModel(tr.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100, max_position_embeddings=32))),
        ("Llama", lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**D, num_key_value_heads=4,
                                                             max_position_embeddings=32))),
        ("Llama (GQA, 2 kv heads)", lambda: tr.LlamaForCausalLM(tr.LlamaConfig(
            **D, num_key_value_heads=2, max_position_embeddings=32))),
        ("Mistral", lambda: tr.MistralForCausalLM(tr.MistralConfig(**D, num_key_value_heads=2,
                                                                   max_position_embeddings=32))),
        ("Qwen2", lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**D, num_key_value_heads=2,
                                                             max_position_embeddings=32))),
        ("T5", lambda: tr.T5ForConditionalGeneration(tr.T5Config(
            d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=100))),
        ("ViT", lambda: tr.ViTModel(tr.ViTConfig(**{k: v for k, v in D.items() if k != "vocab_size"},
                                                 image_size=32, patch_size=8))),
        ("ViT (classifier)", lambda: tr.ViTForImageClassification(tr.ViTConfig(
            **{k: v for k, v in D.items() if k != "vocab_size"}, image_size=32, patch_size=8, num_labels=5))),
        ("ResNet", lambda: tr.ResNetModel(tr.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32],
                                                          depths=[1, 1], num_channels=3))),
        ("ResNet (classifier)", lambda: tr.ResNetForImageClassification(tr.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5))),
        ("OPT", lambda: tr.OPTForCausalLM(tr.OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                                      num_attention_heads=4, vocab_size=100,
                                                      max_position_embeddings=32, word_embed_proj_dim=64))),
        ("GPT-Neo", lambda: tr.GPTNeoForCausalLM(tr.GPTNeoConfig(
            hidden_size=64, num_layers=2, num_heads=4, vocab_size=100, max_position_embeddings=32,
            attention_types=[[["global", "local"], 1]], window_size=8))),
        ("GPT-J", lambda: tr.GPTJForCausalLM(tr.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                          n_positions=32, rotary_dim=8))),
        ("Falcon", lambda: tr.FalconForCausalLM(tr.FalconConfig(**D, max_position_embeddings=32))),
        ("Phi", lambda: tr.PhiForCausalLM(tr.PhiConfig(**D, max_position_embeddings=32))),
        ("Gemma", lambda: tr.GemmaForCausalLM(tr.GemmaConfig(**D, num_key_value_heads=2, head_dim=16,
                                                             max_position_embeddings=32))),
        ("ALBERT (shared layers)", lambda: tr.AlbertModel(tr.AlbertConfig(**D, embedding_size=32,
                                                                           max_position_embeddings=32))),
        ("ELECTRA", lambda: tr.ElectraModel(tr.ElectraConfig(**D, embedding_size=32,
                                                             max_position_embeddings=32))),
        ("BART", lambda: tr.BartForConditionalGeneration(tr.BartConfig(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100,
            max_position_embeddings=32))),
        ("DeiT", lambda: tr.DeiTModel(tr.DeiTConfig(**{k: v for k, v in D.items() if k != "vocab_size"},
                                                    image_size=32, patch_size=8))),
        ("Swin (shifted windows)", lambda: tr.SwinModel(tr.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4))),
        ("Swinv2", lambda: tr.Swinv2Model(tr.Swinv2Config(
            image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4))),
        ("BEiT", lambda: tr.BeitModel(tr.BeitConfig(**{k: v for k, v in D.items() if k != "vocab_size"},
                                                    image_size=32, patch_size=8, use_relative_position_bias=True))),
        ("BEiT (shared position bias)", lambda: tr.BeitModel(tr.BeitConfig(
            **{k: v for k, v in D.items() if k != "vocab_size"}, image_size=32, patch_size=8,
            use_shared_relative_position_bias=True))),
        ("CLIP (vision)", lambda: tr.CLIPVisionModel(tr.CLIPVisionConfig(
            **{k: v for k, v in D.items() if k != "vocab_size"}, image_size=32, patch_size=8))),
        ("DeBERTa-v2", lambda: tr.DebertaV2Model(tr.DebertaV2Config(**D, max_position_embeddings=32))),
        ("ConvNeXt", lambda: tr.ConvNextModel(tr.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                                                num_channels=3))),
        ("Mixtral (MoE, 4 experts)", lambda: tr.MixtralForCausalLM(tr.MixtralConfig(
            **D, num_key_value_heads=2, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2))),
        ("Qwen2-MoE (4 experts + shared)", lambda: tr.Qwen2MoeForCausalLM(tr.Qwen2MoeConfig(
            **D, num_key_value_heads=2, max_position_embeddings=32, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, shared_expert_intermediate_size=64))),
        ("Wav2Vec2 (weight-norm positional conv)", lambda: tr.Wav2Vec2Model(tr.Wav2Vec2Config(
            **{k: v for k, v in D.items() if k != "vocab_size"}, conv_dim=(16, 16), conv_stride=(5, 2),
            conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4))),
        ("Whisper", lambda: tr.WhisperModel(tr.WhisperConfig(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, vocab_size=100, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))),
        ("Mamba (selective state space)", lambda: tr.MambaForCausalLM(tr.MambaConfig(
            hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=4, expand=2))),
    ]
    return out


def measure(make):
    torch.manual_seed(0)
    model = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        g = build_graph(model, use_cache=False)
        dt = time.perf_counter() - t0
    f = g.fractions()
    ours = [w for w in caught if "build_graph" in str(w.message)]
    # a tied head: its logits are the token nodes, whose embedding edges leave them
    embedding_sources = g.edge_index[0][g.edge_kind == EdgeKind.EMBEDDING]
    return dict(capture=g.capture, edges=100 * f["edges"], slots=100 * f["node_slots"],
                fallback=100 * f["fallback"], pieces=g.edge_components(),
                inputs=int((g.node_type == NodeType.INPUT).sum()),
                outputs=int((g.node_type == NodeType.OUTPUT).sum()), seconds=dt,
                tied=bool((g.node_type[embedding_sources] == NodeType.OUTPUT).any()),
                params=g.num_params, unstructured=g.unstructured, warned=len(ours), notes=g.notes)


def _first_output(y):
    """(name, tensor) of the model's first floating output."""
    if isinstance(y, dict):
        return next((k, v) for k, v in y.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return "", y[0] if isinstance(y, tuple) else y


def train(make, steps: int = 30) -> tuple[float, float]:
    """(mean loss of the first 5 steps, of the last 5) of ``GMNOptimizer``
    (shipped weights, model in train mode) on fixed inputs (a batch of 2 made
    from the config): cross-entropy against fixed random labels when the
    first output is ``logits`` (LM heads, classifiers), else the mean square
    error of the first output (``last_hidden_state``) against a fixed random
    target."""
    import torch.nn.functional as F

    import l2o
    from l2o.graph import example_inputs_for

    torch.manual_seed(0)
    model = make()
    model.train()
    gen = torch.Generator().manual_seed(1)
    inputs = {k: torch.randint(0, int(v.max()) + 1, (2, *v.shape[1:]), generator=gen) if not v.is_floating_point()
              else torch.randn(2, *v.shape[1:], generator=gen) for k, v in example_inputs_for(model).items()}
    with torch.no_grad():
        name, y = _first_output(model(**inputs))
    if name == "logits":
        labels = torch.randint(0, y.shape[-1], y.shape[:-1], generator=gen)

        def loss_of(out):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1))
    else:
        target = torch.randn(y.shape, generator=gen)

        def loss_of(out):
            return (out - target).pow(2).mean()
    opt = l2o.GMNOptimizer(model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(_first_output(model(**inputs))[1])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def markdown_row(name: str, r: dict) -> str:
    """The README table's row for ``measure``'s result (plus ``train``'s as ``r["loss"]``)."""
    outs = str(r["outputs"]) + (" (tied: = token nodes)" if r["tied"] else "")
    loss = f" {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} |" if "loss" in r else ""
    return (f"| {name} | {r['capture']} | {r['edges']:.1f}% | {r['slots']:.1f}% | {r['fallback']:.2f}% | "
            f"{'yes' if r['pieces'] == 1 else str(r['pieces']) + ' pieces'} | {outs} |{loss}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers
    transformers.logging.set_verbosity_error()
    rows = []
    for name, make in configs():
        try:
            r = measure(make)
            if not args.no_train:
                r["loss"] = train(make)
            rows.append((name, r))
        except Exception as e:  # an architecture this transformers version lacks, ...
            rows.append((name, {"error": f"{type(e).__name__}: {e}"}))
    if args.markdown:
        train_col = "" if args.no_train else " loss, 30 steps |"
        print(f"| Model (tiny random config, transformers {transformers.__version__}) | capture | "
              f"edges | node slots | fallback | connected | outputs |{train_col}")
        print("|---|---|---|---|---|---|---|" + ("" if args.no_train else "---|"))
        for name, r in rows:
            if "error" in r:
                print(f"| {name} | error: {r['error'][:60]} | | | | | |" + ("" if args.no_train else " |"))
                continue
            print(markdown_row(name, r))
        return
    for name, r in rows:
        if "error" in r:
            print(f"{name:26s} ERROR {r['error'][:200]}")
            continue
        print(f"{name:26s} {r['capture']:6s} edges {r['edges']:5.1f}% slots {r['slots']:4.1f}% "
              f"fallback {r['fallback']:5.2f}% pieces {r['pieces']} in {r['inputs']} out {r['outputs']} "
              f"{r['seconds']:.2f}s warned {r['warned']}"
              + (f" loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}" if "loss" in r else "")
              + f" {r['unstructured'][:4]}")


if __name__ == "__main__":
    main()

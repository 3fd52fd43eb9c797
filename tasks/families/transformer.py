"""Small transformers on algorithmic sequences and a char-level LM.

Token + learned position embeddings, a stack of blocks, a final LayerNorm
and a Linear head, either per position or on the mean over positions.
Blocks are `nn.TransformerEncoderLayer` (batch_first, dropout 0 so the
functional and module losses agree exactly) or, held out only, a
hand-written pre-norm block from `nn.MultiheadAttention` + LayerNorm + MLP.

Train: 1-2 post-norm encoder layers, d_model 16-32, relu/gelu, on parity,
sort and modular addition.  Held out: pre-norm blocks (norm_first or the
MHA block), more layers, and datasets absent from train: reversing a
sequence and causal character-level language modelling.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data import chars, sequences
from ..task import Task
from .layers import family_rng, sampled_name

FAMILY = "transformer"

# dataset -> (vocab size, sequence length, outputs, pooled single label?)
SEQUENCE_SPECS = {
    "parity": (2, sequences.PARITY_LEN, 2, False),
    "reverse": (sequences.REVERSE_VOCAB, sequences.REVERSE_LEN, sequences.REVERSE_VOCAB, False),
    "sort": (sequences.SORT_VOCAB, sequences.SORT_LEN, sequences.SORT_VOCAB, False),
    "modadd": (sequences.MODADD_P, 2, sequences.MODADD_P, True),
    "chars": (len(chars.ALPHABET), chars.SEQ_LEN, len(chars.ALPHABET), False),
}


class PreNormBlock(nn.Module):
    """x + MHA(LN(x)); x + MLP(LN(x)) -- the GPT-style block."""

    def __init__(self, d_model: int, heads: int, ff: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ff), nn.GELU(), nn.Linear(ff, d_model))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SequenceTransformer(nn.Module):
    def __init__(self, vocab: int, seq_len: int, outputs: int, d_model: int, heads: int, ff: int,
                 layers: int, block: str, act: str = "relu", pool: bool = False, causal: bool = False,
                 tied: bool = False):
        super().__init__()
        self.seq_len, self.pool, self.causal = seq_len, pool, causal
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        if block == "prenorm_mha":
            blocks = [PreNormBlock(d_model, heads, ff) for _ in range(layers)]
        elif block in ("encoder_layer", "encoder_layer_norm_first"):
            blocks = [nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation=act,
                                                 batch_first=True, norm_first=block.endswith("norm_first"))
                      for _ in range(layers)]
        else:
            raise ValueError(f"unknown block {block!r}")
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, outputs)
        if tied:  # output layer shares the token embedding (as most LMs do)
            if outputs != vocab:
                raise ValueError(f"a tied head needs outputs == vocab, got {outputs} and {vocab}")
            self.head.weight = self.token.weight

    def forward(self, tokens: Tensor) -> Tensor:
        # Sequence length is fixed per task, so positions and the causal mask
        # are built from a Python int: fx traces them as plain tensor ops.
        positions = torch.arange(self.seq_len, device=tokens.device)
        h = self.token(tokens) + self.position(positions)
        mask = None
        if self.causal:
            mask = torch.triu(torch.full((self.seq_len, self.seq_len), float("-inf"), device=tokens.device), 1)
        for block in self.blocks:
            h = block(h, mask) if isinstance(block, PreNormBlock) else block(h, src_mask=mask)
        h = self.norm(h)
        if self.pool:
            h = h.mean(1)
        return self.head(h)


def transformer_task(name, split, dataset, d_model, heads, ff, layers, block, act="relu",
                     batch_size=64, tied=False) -> Task:
    vocab, seq_len, outputs, pool = SEQUENCE_SPECS[dataset]
    causal = dataset == "chars"
    config = dict(d_model=d_model, heads=heads, ff=ff, layers=layers, block=block, activation=act,
                  pool=pool, causal=causal, tied=tied)
    return Task(name=name, family=FAMILY, split=split, dataset=dataset, batch_size=batch_size,
                build=lambda: SequenceTransformer(vocab, seq_len, outputs, d_model, heads, ff, layers,
                                                  block, act, pool, causal, tied),
                objective="classify", input_shape=(seq_len,), input_dtype=torch.long,
                vocab_size=vocab, config=config)


def named_tasks() -> list[Task]:
    return [
        transformer_task("transformer_parity", "train", "parity", 16, 2, 32, 1, "encoder_layer"),
        transformer_task("transformer_sort", "train", "sort", 32, 4, 64, 1, "encoder_layer", "gelu"),
        transformer_task("transformer_modadd", "train", "modadd", 32, 4, 64, 1, "encoder_layer", batch_size=128),
        transformer_task("transformer_reverse_prenorm", "heldout", "reverse", 32, 4, 64, 2,
                         "encoder_layer_norm_first", "gelu"),
        transformer_task("transformer_charlm", "heldout", "chars", 48, 4, 128, 2, "prenorm_mha", batch_size=32),
        # >= 10x the largest meta-training model (~100k parameters): users train bigger
        transformer_task("transformer_charlm_large", "heldout", "chars", 128, 4, 512, 6, "prenorm_mha",
                         batch_size=32),
    ]


def sample(seed: int, split: str = "train") -> Task:
    rng = family_rng(FAMILY, split, seed)
    if split == "train":
        dataset = rng.choice(["parity", "sort", "modadd"])
        d_model, layers = rng.choice([8, 16, 32, 64]), rng.randint(1, 2)
        block = rng.choice(["encoder_layer", "encoder_layer_norm_first", "prenorm_mha"])
    else:
        dataset = rng.choice(["reverse", "chars"])
        d_model, layers = rng.choice([32, 48, 64]), rng.randint(2, 3)
        block = rng.choice(["encoder_layer_norm_first", "prenorm_mha"])
    heads = rng.choice([h for h in (1, 2, 4) if d_model % h == 0])
    ff, act, batch_size = d_model * rng.choice([2, 4]), rng.choice(["relu", "gelu"]), rng.choice([32, 64])
    # Drawn last, and on train only, so validation and test configurations stay as they were.
    vocab, _, outputs, _ = SEQUENCE_SPECS[dataset]
    tied = split == "train" and outputs == vocab and rng.random() < 0.5
    return transformer_task(sampled_name(FAMILY, split, seed), split, dataset, d_model, heads, ff, layers, block,
                            act, batch_size=batch_size, tied=tied)

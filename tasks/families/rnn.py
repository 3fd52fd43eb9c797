"""Recurrent language models: embedding, LSTM/GRU/RNN layers, a token head.

The head is optionally tied to the embedding (`head.weight = embedding.weight`,
as most LMs do), which needs the last recurrent width to equal the embedding
width. Next-token prediction at every position.

Train: 1-2 layers of width 16-64 on a procedural Markov language of 64
tokens. Validation and test: wider and deeper models on the character corpus
and on a 512-token Markov language (a vocabulary 8x the train one: the
embedding and head dominate the parameter count, as in real LMs).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data import chars, markov
from ..task import Task
from .layers import family_rng, sampled_name

FAMILY = "rnn"
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
VOCABS = {"markov": 64, "markov_large": 512, "chars": len(chars.ALPHABET)}
SEQ_LENS = {"markov": markov.SEQ_LEN, "markov_large": markov.SEQ_LEN, "chars": chars.SEQ_LEN}


class RecurrentLM(nn.Module):
    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, cell: str, tied: bool):
        super().__init__()
        if tied and hidden != embed:
            raise ValueError(f"a tied head needs hidden == embed, got {hidden} and {embed}")
        self.embedding = nn.Embedding(vocab, embed)
        self.rnn = CELLS[cell](embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        if tied:
            self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embedding(tokens))[0])


def rnn_task(name, split, dataset, embed, hidden, layers, cell, tied, batch_size=32) -> Task:
    vocab, seq_len = VOCABS[dataset], SEQ_LENS[dataset]
    config = dict(embed=embed, hidden=hidden, layers=layers, cell=cell, tied=tied)
    return Task(name=name, family=FAMILY, split=split, dataset=dataset, batch_size=batch_size,
                build=lambda: RecurrentLM(vocab, embed, hidden, layers, cell, tied),
                objective="classify", input_shape=(seq_len,), input_dtype=torch.long,
                vocab_size=vocab, config=config)


def named_tasks() -> list[Task]:
    return [
        rnn_task("rnn_lstm_markov", "train", "markov", 32, 32, 1, "lstm", True),
        rnn_task("rnn_lstm_charlm", "heldout", "chars", 64, 128, 2, "lstm", False),
        rnn_task("rnn_gru_markov_large_tied", "heldout", "markov_large", 96, 96, 2, "gru", True),
    ]


def sample(seed: int, split: str = "train") -> Task:
    rng = family_rng(FAMILY, split, seed)
    if split == "train":
        dataset, widths, layers = "markov", [16, 32, 64], rng.randint(1, 2)
    else:
        dataset, widths, layers = rng.choice(["chars", "markov_large"]), [48, 64, 96], rng.randint(1, 3)
    cell, tied = rng.choice(sorted(CELLS)), rng.random() < 0.5
    embed = rng.choice(widths)
    hidden = embed if tied else rng.choice(widths)
    return rnn_task(sampled_name(FAMILY, split, seed), split, dataset, embed, hidden, layers, cell, tied,
                    batch_size=rng.choice([32, 64]))

"""Procedural language-modelling text: token streams from a random Markov chain.

A language model for meta-training needs text whose statistics a recurrent
or attention model can learn within a few hundred steps, at vocabulary sizes
the bundled character corpus does not have. Each token here has a handful of
likely successors with Zipf-like probabilities (plus a little uniform mass, so
every transition is possible): unigram statistics are learned first, then the
transitions, as in real text. The chain and its streams are a pure function
of (vocabulary, seed); train and test are disjoint stretches of it.
"""
from __future__ import annotations

import torch

from .arrays import TokenStreamData

SEQ_LEN = 32
SUCCESSORS = 6          # likely next tokens per token
UNIFORM_MASS = 0.05     # probability spread over the whole vocabulary
CHAINS, CHAIN_LEN = 512, 256   # sampled in parallel, then concatenated


def transition_matrix(vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(vocab, vocab) row-stochastic matrix: a few successors per token, Zipf-weighted."""
    successors = torch.stack([torch.randperm(vocab, generator=generator)[:SUCCESSORS] for _ in range(vocab)])
    zipf = 1.0 / torch.arange(1, SUCCESSORS + 1, dtype=torch.float64)
    probs = torch.full((vocab, vocab), UNIFORM_MASS / vocab, dtype=torch.float64)
    probs.scatter_add_(1, successors, ((1 - UNIFORM_MASS) * zipf / zipf.sum()).expand(vocab, -1).contiguous())
    return probs


def sample_stream(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CHAINS x CHAIN_LEN tokens: independent chains sampled step by step in parallel."""
    vocab = probs.shape[0]
    tokens = torch.empty(CHAINS, CHAIN_LEN, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (CHAINS,), generator=generator)
    for t in range(1, CHAIN_LEN):
        tokens[:, t] = torch.multinomial(probs[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
    return tokens.flatten()


def load_markov_data(vocab: int, seed: int = 0) -> TokenStreamData:
    generator = torch.Generator().manual_seed(seed * 7919 + vocab)
    probs = transition_matrix(vocab, generator)
    train, test = sample_stream(probs, generator), sample_stream(probs, generator)
    return TokenStreamData(train, test[: test.numel() // 8], SEQ_LEN, [str(i) for i in range(vocab)])

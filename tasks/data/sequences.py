"""Algorithmic sequence tasks for small transformers.

Each returns token inputs (N, T) and integer targets; per-position targets
(N, T) unless noted.  Train and test draw fresh sequences from different
seeds (for modular addition the finite table of pairs is split instead).
"""
from __future__ import annotations

import torch

from .arrays import ArrayData

N_TRAIN, N_TEST = 8192, 2048
PARITY_LEN = 12
REVERSE_LEN, REVERSE_VOCAB = 10, 8
SORT_LEN, SORT_VOCAB = 10, 10
MODADD_P = 23
MODADD_TRAIN_FRACTION = 0.7


def _two_splits(make, seed: int) -> ArrayData:
    g = torch.Generator().manual_seed(seed)
    return ArrayData(make(N_TRAIN, g), make(N_TEST, g))


def load_parity_data(seed: int = 0) -> ArrayData:
    """Bits in, running parity (prefix XOR) out at every position."""
    def make(n, g):
        bits = torch.randint(2, (n, PARITY_LEN), generator=g)
        return bits, bits.cumsum(1) % 2
    return _two_splits(make, seed)


def load_reverse_data(seed: int = 0) -> ArrayData:
    """Copy the sequence in reverse order (a pure positional-routing task)."""
    def make(n, g):
        tokens = torch.randint(REVERSE_VOCAB, (n, REVERSE_LEN), generator=g)
        return tokens, tokens.flip(1)
    return _two_splits(make, seed)


def load_sort_data(seed: int = 0) -> ArrayData:
    """Output the sorted sequence; position i predicts the i-th smallest token."""
    def make(n, g):
        tokens = torch.randint(SORT_VOCAB, (n, SORT_LEN), generator=g)
        return tokens, tokens.sort(1).values
    return _two_splits(make, seed)


def load_modadd_data(seed: int = 0) -> ArrayData:
    """(a, b) -> (a + b) mod p; one label per sequence, pairs split train/test."""
    a, b = torch.meshgrid(torch.arange(MODADD_P), torch.arange(MODADD_P), indexing="ij")
    pairs = torch.stack([a.flatten(), b.flatten()], 1)
    labels = pairs.sum(1) % MODADD_P
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    n_train = int(MODADD_TRAIN_FRACTION * len(pairs))
    train, test = order[:n_train], order[n_train:]
    return ArrayData((pairs[train], labels[train]), (pairs[test], labels[test]))

"""The scikit-learn 8x8 handwritten digits, shipped with scikit-learn (no download)."""
from __future__ import annotations

import torch

from .arrays import ArrayData

# Fixed split: 1797 images, the last ~17% (after a seeded shuffle) are the test set.
_SPLIT_SEED = 0
_N_TEST = 300


def load_digits_data() -> ArrayData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    images, labels = images[order], labels[order]
    train_x, test_x = images[_N_TEST:], images[:_N_TEST]
    # Standardise with train statistics (one scalar: many border pixels are constant 0).
    mean, std = train_x.mean(), train_x.std()
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    return ArrayData((train_x, labels[_N_TEST:]), (test_x, labels[:_N_TEST]))

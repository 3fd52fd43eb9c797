"""In-memory datasets that produce seeded batches by tensor indexing only.

Meta-training draws hundreds of thousands of batches, so a batch is one
`randint` for the indices and one gather per tensor: no per-sample Python,
no DataLoader.  Each dataset holds its splits as whole tensors and keeps one
copy per device it has been asked for.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class ArrayData:
    """Paired (inputs, targets) tensors per split; batches sampled with replacement.

    `mean`/`std` normalise inputs per batch: datasets read from disk stay
    uint8 in memory (CIFAR-10 as float32 would be 600 MB) and become float
    only for the rows actually drawn.
    """

    def __init__(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                 mean: float | None = None, std: float | None = None):
        self.splits = {"train": train, "test": test}
        self.mean, self.std = mean, std
        self._on_device: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}

    def size(self, split: str) -> int:
        _check_split(split)
        return self.splits[split][0].shape[0]

    def _tensors(self, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {s: tuple(t.to(device) for t in ts) for s, ts in self.splits.items()}
        return self._on_device[key][split]

    def _prepare(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x
        return (x.float() - self.mean) / self.std

    def batch(self, split: str, batch_size: int, generator: torch.Generator,
              device: torch.device) -> tuple[Tensor, Tensor]:
        _check_split(split)
        x, y = self._tensors(split, device)
        # Indices come from a CPU generator so streams are identical on every device.
        idx = torch.randint(x.shape[0], (batch_size,), generator=generator).to(device)
        return self._prepare(x[idx]), y[idx]

    def first(self, split: str, n: int) -> tuple[Tensor, Tensor]:
        x, y = self.splits[split]
        return self._prepare(x[:n]), y[:n]


class TokenStreamData:
    """One long token sequence per split; a batch is `n` random windows.

    Inputs are windows of `seq_len` tokens, targets the same windows shifted
    by one (next-token prediction).  Windows are gathered with a single
    broadcasted index, so cost does not grow with the corpus.
    """

    def __init__(self, train: Tensor, test: Tensor, seq_len: int, vocab: list[str]):
        self.splits = {"train": train, "test": test}
        self.seq_len = seq_len
        self.vocab = vocab
        self._offsets = torch.arange(seq_len + 1)
        self._on_device: dict[str, dict[str, Tensor]] = {}

    def size(self, split: str) -> int:
        _check_split(split)
        return self.splits[split].numel() - self.seq_len

    def _stream(self, split: str, device: torch.device) -> Tensor:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = {s: t.to(device) for s, t in self.splits.items()}
        return self._on_device[key][split]

    def _windows(self, stream: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
        windows = stream[starts[:, None] + self._offsets.to(stream.device)]
        return windows[:, :-1], windows[:, 1:]

    def batch(self, split: str, batch_size: int, generator: torch.Generator,
              device: torch.device) -> tuple[Tensor, Tensor]:
        _check_split(split)
        stream = self._stream(split, device)
        starts = torch.randint(self.size(split), (batch_size,), generator=generator).to(device)
        return self._windows(stream, starts)

    def first(self, split: str, n: int) -> tuple[Tensor, Tensor]:
        stream = self.splits[split]
        return self._windows(stream, torch.arange(n) * self.seq_len)


def batch_stream(data, split: str, batch_size: int, seed: int, device) -> Iterator[tuple[Tensor, Tensor]]:
    """Infinite, reproducible stream of batches: same seed -> same batches."""
    _check_split(split)
    generator = torch.Generator().manual_seed(int(seed))
    device = torch.device(device)
    while True:
        yield data.batch(split, batch_size, generator, device)


def as_reconstruction(data: ArrayData) -> ArrayData:
    """The same inputs as their own targets (for autoencoders); shares storage."""
    (train_x, _), (test_x, _) = data.splits["train"], data.splits["test"]
    return ArrayData((train_x, train_x), (test_x, test_x), mean=data.mean, std=data.std)

"""Running a user's module for the build without changing it."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode without autograd for the block (dropout off,
    batch statistics not updated, spectral_norm's power iteration not
    stepped); every submodule's own training flag is restored after, also a
    submodule the user had left in eval mode inside a training model."""
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            # reentrant activation checkpointing warns that no input needs a
            # gradient, which is the point here: the user's training is unaffected
            warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
            yield
    finally:
        for m, training in modes.items():
            m.training = training

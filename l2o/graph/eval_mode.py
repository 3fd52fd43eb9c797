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
    submodule the user had left in eval mode inside a training model.

    Its parameters come out as they went in: an embedding with ``max_norm``
    renormalises the rows it looks up in place, in eval mode and under
    ``no_grad`` too, so those weights are copied before and restored after.
    Any other parameter the block changes in place (the model's own code) is
    named in a warning: its change stays (a write through ``p.data`` bumps no
    version counter and is not seen)."""
    modes = {m: m.training for m in module.modules()}
    renormed = {id(m.weight): (m.weight, m.weight.detach().clone()) for m in module.modules()
                if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None}
    # inference tensors keep no version counter (a model built under inference_mode)
    versions = {id(p): (name, p, p._version) for name, p in module.named_parameters() if not p.is_inference()}
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
        changed = [name for key, (name, p, version) in versions.items()
                   if p._version != version and key not in renormed]
        for weight, saved in renormed.values():
            with torch.inference_mode() if weight.is_inference() else torch.no_grad():
                weight.copy_(saved)
        if changed:
            warnings.warn(f"l2o: running {type(module).__name__} once to build its graph changed "
                          f"{', '.join(changed)} in place (the model's forward writes to its parameters)",
                          RuntimeWarning, stacklevel=3)

"""What the learned optimizers' constructors take: the model (seen through
DDP / DataParallel / ``torch.compile`` wrappers), its parameter groups, and
the metanetwork's weights (:class:`l2o.optim.GMNOptimizer`, ``MLPOptimizer``)."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from . import checkpoint
from .lopt import LearnedOptimizer

__all__ = ["model_and_groups", "resolve_lopt", "unwrap_model"]


def resolve_lopt(weights, kind: str) -> LearnedOptimizer:
    """The optimizer's own metanetwork from ``weights``: ``"pretrained"``,
    ``None`` (fresh), a path, or a module (copied)."""
    if weights is None:
        return checkpoint.make_lopt(kind)   # a random metanetwork: drawn from torch's generator, as nn.Modules are
    if isinstance(weights, LearnedOptimizer):
        return copy.deepcopy(weights)  # the optimizer freezes and moves its own copy, never the caller's
    # loaded weights overwrite the initial ones: their draws must not move the user's seeded generator
    with torch.random.fork_rng(devices=[]):
        if weights == "pretrained":
            return checkpoint.load_pretrained(kind)
        if isinstance(weights, (str, os.PathLike)):
            return checkpoint.load_lopt(weights, expect_kind=kind)
    raise TypeError(f"weights must be 'pretrained', None, a path or a LearnedOptimizer module, "
                    f"got {type(weights).__name__}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers,
    whose forward fx cannot trace; parameters are the same objects."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def model_and_groups(cls_name: str, params, model: nn.Module | None, graph_model: nn.Module | None = None):
    """``(model or None, param groups or None)`` from the two call forms:
    ``Opt(model)`` (one group of all its parameters) and ``Opt(params, model=model)``
    (``graph_model=``: the same, under a name HF Trainer does not intercept)."""
    if graph_model is not None:
        if model is not None and unwrap_model(model) is not unwrap_model(graph_model):
            raise ValueError(f"{cls_name} got two different models (model= and graph_model=)")
        model = graph_model
    if isinstance(params, nn.Module):
        if model is not None and unwrap_model(model) is not unwrap_model(params):
            raise ValueError(f"{cls_name} got two different models (as params and as model=)")
        return unwrap_model(params), None
    return (unwrap_model(model) if model is not None else None), params

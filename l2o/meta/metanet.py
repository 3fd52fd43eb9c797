"""The metanetwork a meta-training run trains, and its outer optimizer.

A new one is built from ``lopt_config`` (checked against the constructor's
arguments, so a typo is a ConfigError, not a TypeError traceback), optionally
warm-started from another run's weights (``init_from``) and partly frozen
(``freeze``). The outer optimizer is Adam (AdamW with ``weight_decay``).
"""
from __future__ import annotations

import inspect
import sys

import torch

from ..checkpoint import LOPT_CLASSES, load_lopt, make_lopt
from .config import ConfigError, MetaConfig

# The scalar step-size parameters (nominal weight, controller rate) get a faster outer lr
# (nominal_lr_mult): one scalar otherwise moves ~lr per step, far slower than what it controls.
SCALAR_STEP_SIZES = ("log_nominal", "log_adapt_rate")


def lopt_arguments(kind: str) -> set[str]:
    """The keyword arguments the ``kind`` metanetwork accepts (its class and the bases
    its ``**kwargs`` are passed on to)."""
    names: set[str] = set()
    for klass in LOPT_CLASSES[kind].__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def new_lopt(cfg: MetaConfig) -> torch.nn.Module:
    """A fresh metanetwork of ``cfg.lopt_config``: a misspelt argument or a value its
    constructor refuses is a ConfigError naming lopt_config, not a TypeError traceback."""
    known = lopt_arguments(cfg.lopt)
    unknown = sorted(set(cfg.lopt_config) - known)
    if unknown:
        raise ConfigError(f"lopt_config: unknown argument(s) {unknown} of the {cfg.lopt} metanetwork; "
                          f"its arguments: {sorted(known)}")
    try:
        return make_lopt(cfg.lopt, **cfg.lopt_config)
    except ValueError as err:
        raise ConfigError(f"lopt_config: {err}") from None


def warm_start(lopt, path: str) -> None:
    """Start from another run's metanetwork weights (``init_from``): every
    weight of the same name and shape is copied; the rest (e.g. a parameter
    the other config lacked) keeps its initialisation. Says what it did."""
    source = load_lopt(path).state_dict()
    own = lopt.state_dict()
    copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    lopt.load_state_dict(copied, strict=False)
    fresh = sorted(set(own) - set(copied))
    print(f"meta_train.py: warm start from {path}: {len(copied)} weights copied"
          + (f", kept at initialisation: {', '.join(fresh)}" if fresh else ""), file=sys.stderr)


def freeze(lopt, names: list[str]) -> None:
    """Keep the named metanetwork parameters (``freeze``: names or name prefixes) at
    their current values: they get no meta-gradient and no outer-optimizer slot."""
    own = dict(lopt.named_parameters())
    for name in names:
        hits = [n for n in own if n == name or n.startswith(name + ".")]
        if not hits:
            raise ConfigError(f"freeze: {name!r} names no parameter of the {type(lopt).__name__}; "
                                f"its parameters: {sorted(own)}")
        for n in hits:
            own[n].requires_grad_(False)


def outer_optimizer(lopt, cfg: MetaConfig, ckpt: dict | None) -> torch.optim.Optimizer:
    """Adam (AdamW with ``weight_decay``) over the trainable weights; the scalar step
    sizes in a group of their own when ``nominal_lr_mult`` != 1."""
    named = [(n, p) for n, p in lopt.named_parameters() if p.requires_grad]
    scalars = [p for n, p in named if n in SCALAR_STEP_SIZES]
    if cfg.nominal_lr_mult != 1.0 and scalars:
        groups = [{"params": [p for n, p in named if n not in SCALAR_STEP_SIZES], "lr_mult": 1.0},
                  {"params": scalars, "lr_mult": cfg.nominal_lr_mult}]
    else:
        groups = [{"params": [p for _, p in named], "lr_mult": 1.0}]
    if cfg.weight_decay > 0:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(groups, lr=cfg.lr)
    if ckpt:
        opt.load_state_dict(ckpt["optimizer"])
    return opt

"""Teach the graph builder a module: :func:`register_module`.

A mapper says which parameter entry connects which units. It is called as
``mapper(ctx, module, *inputs, **kwargs)`` where each tensor input arrives
as a value whose units ``ctx`` can read, and returns the output value (or a
tuple of them, matching the module's outputs). Example -- a low-rank layer
``y = U (V x) + b`` that neither tracer can structure on its own
(``x @ self.V.T @ self.U.T`` uses the parameters through products)::

    import l2o

    class LowRank(nn.Module):
        def __init__(self, d_in, d_out, rank):
            super().__init__()
            self.V = nn.Parameter(torch.randn(rank, d_in) / d_in ** 0.5)
            self.U = nn.Parameter(torch.randn(d_out, rank) / rank ** 0.5)
            self.b = nn.Parameter(torch.zeros(d_out))

        def forward(self, x):
            return x @ self.V.T @ self.U.T + self.b

    def map_low_rank(ctx, m, x):
        h = ctx.linear(m.V, x)             # V[r, i]: edge x_i -> new rank unit r
        return ctx.linear(m.U, h, bias=m.b)  # U[o, r]: edge r -> new unit o; b on o

    l2o.graph.register_module(LowRank, map_low_rank)

Registered classes (and their subclasses) are kept whole by both tracers
and win over the built-in mappers.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from .layers import USER
from .layers.embedding import embedding_core
from .layers.hf import conv1d_core
from .layers.linear import linear_core
from .param_graph import EntryKind, NodeType
from .values import TupleVal, Val, depth_of, resolve

_KINDS = {"bias": EntryKind.BIAS, "scale": EntryKind.NORM_WEIGHT, "shift": EntryKind.NORM_BIAS,
          "attn_bias": EntryKind.ATTN_BIAS}


class ModuleContext:
    """What a registered mapper can do (see :func:`register_module`)."""

    def __init__(self, state, qualname: str):
        self._state, self.qualname = state, qualname

    def units(self, x, n: int) -> Tensor:
        """Node ids of the ``n`` features of input ``x`` (its last dim)."""
        nodes = resolve(self._state, x, n)
        if int(nodes.shape[0]) != n:
            nodes = self._state.new_nodes(n, NodeType.HIDDEN, depth_of(x))
        return nodes

    def new_units(self, n: int, like=None) -> Val:
        """A value with ``n`` fresh hidden units, one layer deeper than ``like``."""
        d = depth_of(like) + 1
        return Val(own_nodes=self._state.new_nodes(n, NodeType.HIDDEN, d), depth=d, fdim="last")

    def linear(self, weight: nn.Parameter, x, bias: nn.Parameter | None = None,
               transposed: bool = False) -> Val:
        """``weight[o, i]`` (``[i, o]`` if ``transposed``) as edges ``x_i -> o``
        onto new units; ``bias`` as entries on them."""
        if transposed:
            return conv1d_core(self._state, weight, bias, x)
        return linear_core(self._state, weight, bias, x)

    def embedding(self, weight: nn.Parameter, tokens) -> Val:
        """``weight[t, d]`` as edges token ``t`` -> new unit ``d``."""
        return embedding_core(self._state, weight, tokens)

    def entries(self, param: nn.Parameter, x, kind: str = "bias") -> Val:
        """Every entry of 1-D ``param`` held by the matching unit of ``x``
        (``kind``: "bias", "scale", "shift" or "attn_bias"); returns ``x``."""
        nodes = self.units(x, param.numel())
        self._state.add_entries(param, nodes, _KINDS[kind])
        return x if isinstance(x, Val) and x.nodes is nodes else Val(own_nodes=nodes, depth=depth_of(x),
                                                                      fdim="last")

    def same_units(self, a, b) -> Val:
        """``a`` and ``b`` are the same units (a residual add, a gate product)."""
        na = a.nodes if isinstance(a, Val) and a.nodes is not None else None
        if na is None:
            return b
        self._state.merge(na, self.units(b, int(na.shape[0])))
        return a

    def tuple(self, *vals) -> TupleVal:
        """Several outputs (a module returning a tuple)."""
        return TupleVal(list(vals))


def register_module(cls: type, mapper: Callable) -> None:
    """Map every instance of ``cls`` (an ``nn.Module`` subclass) with
    ``mapper(ctx, module, *inputs, **kwargs)``; see the module docstring."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError("register_module needs an nn.Module subclass")

    def internal(state, module, qualname, args, kwargs):
        return mapper(ModuleContext(state, qualname), module, *args, **kwargs)

    internal.user_mapper = mapper
    USER[cls] = internal
    from . import builder
    builder.clear_cache()


def unregister_module(cls: type) -> None:
    USER.pop(cls, None)
    from . import builder
    builder.clear_cache()

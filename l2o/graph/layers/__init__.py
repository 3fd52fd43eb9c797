"""Per-module-kind mappers: each turns one leaf module into nodes, edges and
node-held entries. A mapper is ``fn(state, module, qualname, args, kwargs)``
returning the output value (see :mod:`l2o.graph.values`)."""
from __future__ import annotations

from torch import nn

from .attention import map_mha
from .conv import map_conv
from .embedding import map_embedding
from .linear import map_linear
from .norm import map_channel_norm, map_layer_norm
from .transformer import map_encoder, map_encoder_layer

_norms_per_channel = (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d,
                      nn.InstanceNorm2d, nn.GroupNorm)
_layer_norms = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

MAPPERS = [
    (nn.Linear, map_linear),
    ((nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d), map_conv),
    (nn.Embedding, map_embedding),
    (_norms_per_channel, map_channel_norm),
    (_layer_norms, map_layer_norm),
    (nn.MultiheadAttention, map_mha),
    (nn.TransformerEncoderLayer, map_encoder_layer),
    (nn.TransformerEncoder, map_encoder),
]

LEAF_TYPES: tuple[type, ...] = tuple(
    t for types, _ in MAPPERS for t in (types if isinstance(types, tuple) else (types,)))


def mapper_for(module: nn.Module):
    for types, fn in MAPPERS:
        if isinstance(module, types):
            return fn
    return None

"""Per-module-kind mappers: each turns one leaf module into nodes, edges and
node-held entries. A mapper is ``fn(state, module, qualname, args, kwargs)``
returning the output value (see :mod:`l2o.graph.values`)."""
from __future__ import annotations

from torch import nn

from .attention import map_mha
from .conv import map_conv
from .embedding import map_embedding
from .linear import map_linear
from .moe import is_moe_experts, map_moe_experts
from .hf import is_conv1d, is_rms_norm, map_hf_conv1d, map_rms_norm
from .norm import map_channel_norm, map_layer_norm
from .rnn import map_rnn, map_rnn_cell
from .transformer import map_encoder, map_encoder_layer

_norms_per_channel = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                      nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm)
_convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_layer_norms = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

MAPPERS = [
    (nn.Linear, map_linear),
    (_convs, map_conv),
    ((nn.Embedding, nn.EmbeddingBag), map_embedding),
    (_norms_per_channel, map_channel_norm),
    (_layer_norms, map_layer_norm),
    (nn.MultiheadAttention, map_mha),
    (nn.TransformerEncoderLayer, map_encoder_layer),
    (nn.TransformerEncoder, map_encoder),
    ((nn.LSTM, nn.GRU, nn.RNN), map_rnn),
    ((nn.RNNCell, nn.LSTMCell, nn.GRUCell), map_rnn_cell),
]

# recognised by a predicate (class names of libraries we do not import)
PREDICATES = [(is_conv1d, map_hf_conv1d), (is_rms_norm, map_rms_norm), (is_moe_experts, map_moe_experts)]

# filled by l2o.graph.register_module: class -> internal mapper; wins over the built-ins
USER: dict[type, object] = {}

LEAF_TYPES: tuple[type, ...] = tuple(
    t for types, _ in MAPPERS for t in (types if isinstance(types, tuple) else (types,)))


def mapper_for(module: nn.Module):
    for cls in type(module).__mro__:
        fn = USER.get(cls)
        if fn is not None:
            return fn
    for types, fn in MAPPERS:
        if isinstance(module, types):
            return fn
    for pred, fn in PREDICATES:
        if pred(module):
            return fn
    return None


def keep_whole(module: nn.Module) -> bool:
    """Whether the eager capture should hand ``module`` to its mapper rather
    than record what it computes: yes for registered and recognised modules,
    and for built-in kinds unless a subclass overrides ``forward`` (HF's
    channels-first ``ConvNextLayerNorm`` is a LayerNorm that permutes first)."""
    if mapper_for(module) is None:
        return False
    if any(cls in USER for cls in type(module).__mro__):
        return True
    for types, _ in MAPPERS:
        types = types if isinstance(types, tuple) else (types,)
        for t in types:
            if isinstance(module, t):
                return type(module).forward is t.forward
    return True


_CHANNEL = _norms_per_channel + _convs


def feature_dim_for(module: nn.Module):
    """Which dim of its input tensors a module's mapper reads as the neurons:
    1 for convs and per-channel norms, ``"tokens"`` for an embedding (or bag), else -1."""
    if isinstance(module, _CHANNEL):
        return 1
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "tokens"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) > 1:
        return 1
    return -1

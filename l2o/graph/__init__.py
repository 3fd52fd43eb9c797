"""The parameter graph: any ``nn.Module`` as the graph a metanetwork reads.

``build_graph(model, example_inputs=None, strict=False)`` records one run of
the model on example inputs (:mod:`l2o.graph.capture`; given, or made up from
a Hugging Face config or the first layer), with ``torch.fx`` and then
module-by-module mapping as fallbacks (:mod:`l2o.graph.fx_walk`;
the order: :mod:`l2o.graph.builder`). Nodes are neurons / channels / token ids / attention units;
every weight entry is an edge, every bias / norm entry a node-held slot, and
anything unrecognised a per-tensor fallback node. Supported layers:

| Module / op | Nodes | Edges (kind, edge_pos) | Node-held entries |
|---|---|---|---|
| ``Linear`` | ``out_features`` new | ``W[o,i]``: in ``i`` -> out ``o`` (LINEAR; spatial pos after a flatten) | bias: BIAS |
| ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (groups, depthwise, any stride/padding) | ``out_channels`` new | every kernel tap (CONV, kernel offset in [-1,1]; 3-D: of the two inner axes) | bias: BIAS |
| ``Embedding``, ``EmbeddingBag`` | ``num_embeddings`` INPUT token nodes, ``embedding_dim`` new | ``W[t,d]``: token -> dim (EMBEDDING) | -- |
| ``BatchNorm1d/2d/3d``, ``InstanceNorm1d/2d/3d``, ``GroupNorm`` | none | -- | weight/bias: NORM_WEIGHT/NORM_BIAS per channel |
| ``LayerNorm``, ``RMSNorm`` | none | -- | NORM_WEIGHT/NORM_BIAS on the normalised neurons |
| ``MultiheadAttention`` | 3E q/k/v + E out | in-proj (ATTN_Q/K/V), out-proj from v units (ATTN_OUT) | in_proj_bias, bias_k/v: ATTN_BIAS; out bias: BIAS |
| ``TransformerEncoderLayer`` / ``TransformerEncoder`` | as MHA + FF Linear | as above | residual stream merged; norms as LayerNorm |
| ``x + f(x)``, ``a * b``, ``stack``, ``where`` | merged pairwise | -- | -- |
| ``torch.cat`` on the feature dim (other dims: merge) | concatenated | -- | -- |
| flatten / view / reshape of a ``C x H x W`` map | C channel nodes kept | next Linear: column -> channel ``col // HW``, pos = (y, x) in [-1,1] | -- |
| activations, dropout, pooling, ``mean``, softmax, transpose, ... | passed through | -- | -- |
| HF ``Conv1D``; ``addmm(b, x, W)``, ``x @ W``, ``x @ W.T`` with a parameter ``W`` | new | ``W[i,o]`` (or ``W[o,i]``): in -> out (LINEAR) | bias: BIAS |
| ``nn.LSTM/GRU/RNN`` | ``hidden`` per layer/direction | ``W_ih``: in -> unit, ``W_hh``: unit -> unit (recurrent), gate as ``edge_pos`` | biases: BIAS |
| ``nn.LSTMCell/GRUCell/RNNCell`` (called per step) | ``hidden``, one set for every call | as one LSTM/GRU/RNN layer; a given state's units merged with the cell's | biases: BIAS |
| ``scaled_dot_product_attention``, ``q @ k^T``, ``attn @ v`` | -- | -- | q/k units merged per head (GQA: with their kv head); output carries v's units |
| a per-head term added to the scores (T5's relative-position table: ``attn_mask`` / ``scores + bias``) | its head nodes: one node with the head's q/k units, in the first attention it meets | -- | -- |
| a parameter added to the scores, one head per entry (Swin / BEiT ``table[rel_index]``) | one INPUT node per table row; H head nodes, joined as above | ``table[r, h]``: row ``r`` -> head ``h`` (EMBEDDING) | -- |
| a parameter multiplied into the scores, one head per entry (Swinv2's ``logit_scale``) | none | -- | NORM_WEIGHT on head ``h``'s node, when its q/k units are one node |
| a parameter (view) ``* x`` / ``+ x`` / ``cat``-ed with ``x`` (RMSNorm scales, positions, cls tokens) | none | -- | NORM_WEIGHT (product) / BIAS (sum, concat) on the units it meets |
| a weight used again (tied head, module called twice) | the later use's endpoints merged with the first's (a tied head's logits are the token nodes, typed OUTPUT) | first use only | -- |
| MoE experts as 3-D tensors (HF ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, any layout flag) | ``I`` per expert, ``H`` output units shared by the experts | ``x_h -> (e, j)`` (gate and up row ``j`` both), ``(e, j) -> out_o`` (LINEAR) | biases: BIAS |
| a parametrized weight (``torch.nn.utils.parametrize``: orthogonal, spectral_norm, weight_norm) | as its layer | the one original with the weight's shape, on the weight's edges (one to one) | other originals (weight_norm's gain): FALLBACK |
| ``register_module(cls, mapper)`` | as the mapper says | | |
| anything else with parameters (custom module, bare ``nn.Parameter``, untraceable code) | one TENSOR node per tensor | -- | all entries: FALLBACK (+ one warning; ``strict=True`` raises) |

The merged node of a residual add is HIDDEN unless one side is INPUT/OUTPUT;
a node that is both an input and an output of the network is OUTPUT.
``node_depth`` is the layer index (longest chain of weight layers from the
inputs) divided by the maximum; TENSOR nodes have depth 0.
"""
from .builder import build_graph
from .example_inputs import example_inputs_for
from .registry import ModuleContext, register_module, unregister_module
from .draw import draw_graph
from .errors import UnsupportedModuleError
from .param_graph import EdgeKind, EntryKind, NodeType, ParamGraph

__all__ = ["build_graph", "draw_graph", "ParamGraph", "NodeType", "EdgeKind", "EntryKind",
           "UnsupportedModuleError", "register_module", "unregister_module", "ModuleContext",
           "example_inputs_for"]

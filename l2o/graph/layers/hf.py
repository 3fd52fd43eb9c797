"""Layers of Hugging Face ``transformers`` (and look-alikes), recognised by
class name so the library is never imported:

* ``Conv1D`` (GPT-2, GPT, CTRL, ...): a Linear stored transposed,
  ``weight[in, out]``, computed as ``addmm(bias, x, weight)``: entry
  ``W[i, o]`` is the edge ``x_i -> o`` (LINEAR), bias on ``o``;
* RMSNorm-style layers (``LlamaRMSNorm``, ``T5LayerNorm``, ``MistralRMSNorm``,
  ``Qwen2RMSNorm``, ``GemmaRMSNorm``, ... -- any class whose name ends in
  ``RMSNorm`` or is in :data:`NORM_NAMES`, holding a 1-D ``weight`` and maybe
  a ``bias``): NORM_WEIGHT / NORM_BIAS entries on the normalised neurons.

The eager capture recognises both by what they compute too (``addmm`` with a
``[in, out]`` parameter; a parameter multiplied into a tensor); the class
names matter for the fx fallback.
"""
from __future__ import annotations

from torch import nn

from ..param_graph import EdgeKind, EntryKind, NodeType
from ..values import Val, depth_of, input_columns, resolve
from .moe import own_param

NORM_NAMES = {"T5LayerNorm", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "GemmaRMSNorm",
              "MixtralRMSNorm", "PhiRMSNorm", "Phi3RMSNorm", "OlmoLayerNorm", "MT5LayerNorm",
              "LongT5LayerNorm", "UMT5LayerNorm"}


def conv1d_core(state, weight, bias, x) -> Val:
    in_f, out_f = weight.shape
    src_cols, col_pos = input_columns(state, x, in_f)
    depth = depth_of(x) + 1
    out = state.new_nodes(out_f, NodeType.HIDDEN, depth)
    pos = col_pos.view(in_f, 1, 2) if col_pos is not None else None
    state.add_edges(weight, (in_f, out_f), src_cols.view(in_f, 1), out.view(1, out_f), EdgeKind.LINEAR, pos)
    if bias is not None:
        state.add_entries(bias, out, EntryKind.BIAS)
    return Val(own_nodes=out, depth=depth, fdim="last")


def is_conv1d(m: nn.Module) -> bool:
    w = own_param(m, "weight")
    return type(m).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2


def map_hf_conv1d(state, mod, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    return conv1d_core(state, mod.weight, getattr(mod, "bias", None), x)


def is_rms_norm(m: nn.Module) -> bool:
    name = type(m).__name__
    if not (name.endswith("RMSNorm") or name in NORM_NAMES):
        return False
    w = own_param(m, "weight")
    own = [n for n, _ in m.named_parameters(recurse=False)]
    return isinstance(w, nn.Parameter) and w.dim() == 1 and set(own) <= {"weight", "bias"} \
        and not any(True for _ in m.children())


def map_rms_norm(state, mod, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
    n = mod.weight.shape[0]
    nodes = resolve(state, x, n)
    if int(nodes.shape[0]) != n:
        nodes = state.new_nodes(n, NodeType.HIDDEN, depth_of(x))
    state.add_entries(mod.weight, nodes, EntryKind.NORM_WEIGHT)
    b = getattr(mod, "bias", None)
    if isinstance(b, nn.Parameter) and b.shape == mod.weight.shape:
        state.add_entries(b, nodes, EntryKind.NORM_BIAS)
    if isinstance(x, Val) and x.nodes is nodes:
        return x
    return Val(own_nodes=nodes, depth=depth_of(x), fdim="last")

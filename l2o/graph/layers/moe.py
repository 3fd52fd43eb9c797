"""Mixture-of-experts layers whose experts are stored as 3-D tensors.

Hugging Face (transformers >= 5: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek, ...)
keeps the ``E`` experts of a sparse MoE block in one module, each expert a
gated MLP between the same hidden units:

* ``gate_up_proj`` ``[E, 2I, H]`` (``[E, H, 2I]`` when ``is_transposed``):
  per expert, the gate rows then the up rows (``[g0, u0, g1, u1, ...]`` when
  not ``is_concatenated``); ``up_proj`` instead for experts without a gate;
* ``down_proj`` ``[E, H, I]`` (``[E, I, H]`` transposed);
* biases ``gate_up_proj_bias`` / ``up_proj_bias`` ``[E, 2I]`` and
  ``down_proj_bias`` ``[E, H]`` when ``has_bias``.

The router in front of them is a Linear (``F.linear(x, weight)``), which the
capture maps as one: edges from the hidden units to one unit per expert.

Mapping: expert ``e`` has ``I`` new units (gate row ``j`` and up row ``j``
meet in ``act(g_j) * u_j``, so both are edges into unit ``(e, j)``, like a
SwiGLU's two projections); ``gate_up_proj[e, r, h]`` is the edge
``x_h -> (e, j(r))``, ``down_proj[e, o, j]`` the edge ``(e, j) -> out_o``,
with ``out`` ``H`` new units shared by every expert (their outputs are
summed). Up-projection biases are held by the expert's units, down-projection
biases by ``out_o`` (``E`` entries each). Permuting experts (with the
router's rows) or the units inside one expert permutes this graph the same
way. The layout flags come from the attributes HF's
``use_experts_implementation`` sets; without them the shapes must fit the
untransposed, concatenated layout.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..param_graph import EdgeKind, EntryKind, NodeType
from ..values import Val, depth_of, resolve

_OWN = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}


def own_param(m: nn.Module, name: str) -> nn.Parameter | None:
    """``m``'s own parameter ``name``, or None (not getattr: while fx traces, a
    module's attributes are proxies, and the tracer asks whether a module is a
    leaf while it traces)."""
    return dict(m.named_parameters(recurse=False)).get(name)


def expert_layout(m: nn.Module) -> tuple[int, int, int] | None:
    """(E, I, H) of an experts module this mapper understands, else None."""
    if getattr(m, "has_post_expert_norm", False) or any(
            next(c.parameters(), None) is not None for c in m.children()):
        return None
    own = {n for n, _ in m.named_parameters(recurse=False)}
    up = own_param(m, "gate_up_proj") if own_param(m, "gate_up_proj") is not None else own_param(m, "up_proj")
    down = own_param(m, "down_proj")
    if not own or not own <= _OWN or up is None or down is None or up.dim() != 3 or down.dim() != 3:
        return None
    gated = own_param(m, "gate_up_proj") is not None
    transposed = bool(getattr(m, "is_transposed", False))
    E = int(up.shape[0])
    if transposed:
        H, rows = int(up.shape[1]), int(up.shape[2])
        down_shape = lambda i: (E, i, H)   # noqa: E731
    else:
        rows, H = int(up.shape[1]), int(up.shape[2])
        down_shape = lambda i: (E, H, i)   # noqa: E731
    if gated and rows % 2:
        return None
    I = rows // 2 if gated else rows
    if tuple(down.shape) != down_shape(I):
        return None
    for name, shape in (("gate_up_proj_bias", (E, rows)), ("up_proj_bias", (E, rows)),
                        ("down_proj_bias", (E, H))):
        b = own_param(m, name)
        if b is not None and tuple(b.shape) != shape:
            return None
    return E, I, H


def is_moe_experts(m: nn.Module) -> bool:
    return expert_layout(m) is not None


def _row_units(units: Tensor, gated: bool, concatenated: bool) -> tuple[tuple[int, ...], Tensor]:
    """The up-projection's rows per expert as (sub-shape, unit of each row)
    with the row dim split so that ``units`` ([E, I]) broadcast onto it."""
    E, I = units.shape
    if not gated:
        return (I,), units.view(E, I)
    if concatenated:                       # [g_0..g_{I-1}, u_0..u_{I-1}]
        return (2, I), units.view(E, 1, I)
    return (I, 2), units.view(E, I, 1)     # [g_0, u_0, g_1, u_1, ...]


def map_moe_experts(state, mod: nn.Module, qualname: str, args, kwargs):
    E, I, H = expert_layout(mod)
    x = args[0] if args else kwargs.get("hidden_states")
    gated = own_param(mod, "gate_up_proj") is not None
    up = own_param(mod, "gate_up_proj" if gated else "up_proj")
    transposed = bool(getattr(mod, "is_transposed", False))
    concatenated = bool(getattr(mod, "is_concatenated", True))
    src = resolve(state, x, H)
    if int(src.shape[0]) != H:
        src = state.new_nodes(H, NodeType.HIDDEN, depth_of(x))
    depth = depth_of(x) + 1
    units = state.new_nodes(E * I, NodeType.HIDDEN, depth).view(E, I)
    out = state.new_nodes(H, NodeType.HIDDEN, depth + 1)

    rows, dst = _row_units(units, gated, concatenated)
    k = len(rows)
    if transposed:      # [E, H, *rows]: x_h -> unit
        state.add_edges(up, (E, H, *rows), src.view(1, H, *([1] * k)), dst.unsqueeze(1), EdgeKind.LINEAR)
        state.add_edges(own_param(mod, "down_proj"), (E, I, H), units.view(E, I, 1), out.view(1, 1, H), EdgeKind.LINEAR)
    else:               # [E, *rows, H]
        state.add_edges(up, (E, *rows, H), src.view(1, *([1] * k), H), dst.unsqueeze(-1), EdgeKind.LINEAR)
        state.add_edges(own_param(mod, "down_proj"), (E, H, I), units.view(E, 1, I), out.view(1, H, 1), EdgeKind.LINEAR)
    up_bias = own_param(mod, "gate_up_proj_bias" if gated else "up_proj_bias")
    if up_bias is not None:
        state.add_entries(up_bias, dst.expand(E, *rows).reshape(-1), EntryKind.BIAS)
    down_bias = own_param(mod, "down_proj_bias")
    if down_bias is not None:
        state.add_entries(down_bias, out.repeat(E), EntryKind.BIAS)
    return Val(own_nodes=out, depth=depth + 1, fdim="last")

"""nn.RNN / nn.LSTM / nn.GRU: input and recurrent weights between units.

Per layer and direction with hidden size ``H`` and ``G`` gates (LSTM 4,
GRU 3, RNN 1): one node per hidden unit ``j``. The gate pre-activations of
unit ``j`` (rows ``g*H + j``) act on unit ``j`` only, so a permutation of
hidden units moves all ``G`` of them with it: they are the same node, and
the ``G`` parallel edges into it are told apart by their ``edge_pos``
``(gate offset in [-1, 1], 0)`` -- the way a conv's taps are. Then

* ``weight_ih[g*H + j, i]``: edge ``x_i -> h_j`` (LINEAR, pos of gate g);
* ``weight_hh[g*H + j, i]``: recurrent edge ``h_i -> h_j`` (LINEAR, same pos);
* ``bias_ih`` / ``bias_hh``: BIAS entries on ``h_j``;
* LSTM ``proj_size``: ``weight_hr[p, j]`` is ``h_j -> p`` onto new nodes,
  which are then the recurrent state and the layer output.

A bidirectional layer's output is the concatenation of both directions'
units; the next layer reads it.

``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` (one time step, called in
the user's loop): the same edges per call, laid out ``[G*H, in]`` so that
each later call's units are merged with the first call's (a weight used
again, :meth:`GraphState.add_edges`), and so is a hidden state passed in
that is already a set of ``H`` units (the previous step's output, an
encoder's final state): one set of units for every step.
"""
from __future__ import annotations

import torch
from torch import nn

from ..param_graph import EdgeKind, EntryKind, NodeType
from ..values import TupleVal, Val, depth_of, input_columns


def _gates(m: nn.RNNBase) -> int:
    return {"LSTM": 4, "GRU": 3}.get(m.mode, 1)


def _gate_pos(G: int) -> torch.Tensor:
    """``(gate offset in [-1, 1], 0)`` of each of ``G`` gates."""
    pos = torch.zeros(G, 2)
    if G > 1:
        pos[:, 0] = torch.linspace(-1.0, 1.0, G)
    return pos


def map_rnn(state, mod: nn.RNNBase, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    G, H = _gates(mod), mod.hidden_size
    proj = getattr(mod, "proj_size", 0) or 0
    gate_pos = _gate_pos(G)
    dirs = 2 if mod.bidirectional else 1
    depth = depth_of(x)
    inp = x
    for layer in range(mod.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(mod, "weight_ih" + sfx), getattr(mod, "weight_hh" + sfx)
            in_f = w_ih.shape[1]
            cols, _ = input_columns(state, inp, in_f)
            h = state.new_nodes(H, NodeType.HIDDEN, depth + 1)
            state_nodes = h
            if proj:
                state_nodes = state.new_nodes(proj, NodeType.HIDDEN, depth + 2)
            pos = gate_pos.view(G, 1, 1, 2)
            state.add_edges(w_ih, (G, H, in_f), cols.view(1, 1, in_f), h.view(1, H, 1), EdgeKind.LINEAR, pos)
            rec = w_hh.shape[1]
            state.add_edges(w_hh, (G, H, rec), state_nodes.view(1, 1, rec), h.view(1, H, 1),
                            EdgeKind.LINEAR, pos)
            for b in ("bias_ih", "bias_hh"):
                p = getattr(mod, b + sfx, None)
                if p is not None:
                    state.add_entries(p, h.repeat(G), EntryKind.BIAS)
            if proj:
                w_hr = getattr(mod, "weight_hr" + sfx)
                state.add_edges(w_hr, (proj, H), h.view(1, H), state_nodes.view(proj, 1), EdgeKind.LINEAR)
            outs.append(state_nodes)
        depth += 2 if proj else 1
        inp = Val(own_nodes=torch.cat(outs), depth=depth, fdim="last")
    return TupleVal([inp, None])


def map_rnn_cell(state, mod: nn.RNNCellBase, qualname: str, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    G = mod.weight_ih.shape[0] // mod.hidden_size
    H, in_f = mod.hidden_size, mod.input_size
    depth = depth_of(x) + 1
    h = state.new_nodes(H, NodeType.HIDDEN, depth)
    rows = h.repeat(G).view(G * H, 1)                      # row g*H + j: unit j, gate g
    pos = _gate_pos(G).repeat_interleave(H, dim=0).view(G * H, 1, 2)
    cols, _ = input_columns(state, x, in_f)
    state.add_edges(mod.weight_ih, (G * H, in_f), cols.view(1, in_f), rows, EdgeKind.LINEAR, pos)
    state.add_edges(mod.weight_hh, (G * H, H), h.view(1, H), rows, EdgeKind.LINEAR, pos)
    for b in (mod.bias_ih, mod.bias_hh):
        if b is not None:
            state.add_entries(b, h.repeat(G), EntryKind.BIAS)
    for given in (hx if isinstance(hx, (tuple, list)) else [hx]):   # LSTMCell: (h, c)
        if isinstance(given, Val) and given.own_nodes is not None and given.own_nodes.shape[0] == H:
            state.merge(given.own_nodes, h)
    out = Val(own_nodes=h, depth=depth, fdim="last")
    return TupleVal([out, out]) if isinstance(mod, nn.LSTMCell) else out

"""A structure-free ParamGraph: every tensor on its own TENSOR node.

Used by the graph-free baseline (which only needs the flat layout and the
per-tensor ids) so both optimizers share one flat-vector code path.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .graph.param_graph import EntryKind, NodeType, ParamGraph


def tensor_layout(shapes: Sequence[torch.Size], names: Sequence[str] | None = None,
                  device: torch.device | str = "cpu") -> ParamGraph:
    shapes = [torch.Size(s) for s in shapes]
    names = list(names) if names is not None else [f"param{i}" for i in range(len(shapes))]
    numels = torch.tensor([s.numel() for s in shapes], dtype=torch.long)
    tensor_id = torch.repeat_interleave(torch.arange(len(shapes)), numels)
    n = len(shapes)
    return ParamGraph(
        num_nodes=n,
        node_type=torch.full((n,), int(NodeType.TENSOR), dtype=torch.long),
        node_io_index=torch.full((n,), -1, dtype=torch.long),
        node_depth=torch.zeros(n),
        edge_index=torch.zeros(2, 0, dtype=torch.long),
        edge_kind=torch.zeros(0, dtype=torch.long),
        edge_pos=torch.zeros(0, 2),
        entry_node=tensor_id.clone(),
        entry_kind=torch.full_like(tensor_id, int(EntryKind.FALLBACK)),
        tensor_id=tensor_id,
        param_names=names,
        param_shapes=shapes,
        flat_order=list(range(n)),
        num_edge_params=0,
    ).to(device)

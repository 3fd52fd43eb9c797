"""Picture of a small parameter graph: nodes by depth (x), coloured by type.

Parallel edges (conv taps, flatten columns) are drawn once; width says how
many there are. Meant for toy models; large graphs raise instead of
producing an unreadable hairball.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from .param_graph import NodeType, ParamGraph

_COLOURS = {NodeType.INPUT: "#4c72b0", NodeType.HIDDEN: "#8c8c8c",
            NodeType.OUTPUT: "#dd8452", NodeType.TENSOR: "#c44e52"}


def draw_graph(graph: ParamGraph, path: str, max_nodes: int = 300) -> str:
    if graph.num_nodes > max_nodes:
        raise ValueError(
            f"graph has {graph.num_nodes} nodes, more than max_nodes={max_nodes}; "
            "draw a smaller model or raise max_nodes")
    # A bare Figure, not pyplot: the caller's matplotlib backend is left alone.
    from matplotlib.figure import Figure

    types = graph.node_type.tolist()
    depth = graph.node_depth.tolist()
    columns: dict[float, list[int]] = defaultdict(list)
    for n in range(graph.num_nodes):
        # tensor (fallback) nodes get their own column to the right
        columns[1.15 if types[n] == NodeType.TENSOR else depth[n]].append(n)
    xy = {}
    for x, members in columns.items():
        for k, n in enumerate(members):
            xy[n] = (x, (k - (len(members) - 1) / 2) / max(len(members), 1))
    pairs = Counter(map(tuple, graph.edge_index.t().tolist()))

    fig = Figure(figsize=(10, 6))
    ax = fig.subplots()
    for (s, d), c in pairs.items():
        ax.plot([xy[s][0], xy[d][0]], [xy[s][1], xy[d][1]], color="#bbbbbb",
                lw=0.3 + 0.3 * min(c, 9), zorder=1)
    for t, colour in _COLOURS.items():
        ns = [n for n in range(graph.num_nodes) if types[n] == t]
        if ns:
            ax.scatter([xy[n][0] for n in ns], [xy[n][1] for n in ns], s=30, c=colour,
                       label=t.name.lower(), zorder=2, edgecolors="k", linewidths=0.3)
    ax.set_xlabel("depth")
    ax.set_yticks([])
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.07), ncol=4, fontsize=8, frameon=False)
    ax.set_title(f"{graph.num_nodes} nodes, {graph.num_edges} edges, "
                 f"{graph.num_entries} node-held entries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path

"""Accumulates nodes, edges and node-held entries, then assembles a ParamGraph.

Everything per *entry* is a tensor chunk built with vectorised ops by the
layer mappers; Python loops here only run per *node* (neurons / channels,
a few thousand even for a ResNet), never per parameter entry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .eval_mode import eval_mode
from .factored import EdgeChunk, EdgeFactors, FactoredGraph, compact
from .param_graph import EntryKind, NodeType, ParamGraph


@dataclass
class _EdgeChunk:
    """Edges of one weight, in factored form.

    ``src``/``dst``/``kind`` broadcast to ``shape`` (the weight's shape, or a
    reshape of it with the same row-major order), ``pos`` to ``shape + (2,)``.
    The graph keeps them in this form (:mod:`.factored`): the per-edge
    tensors are written only if something reads them.
    """
    param: int
    shape: tuple[int, ...]
    src: Tensor            # raw node ids
    dst: Tensor
    kind: Tensor | int     # EdgeKind, broadcastable, or one for all
    pos: Tensor | None     # None means (0, 0)


@dataclass
class _EntryChunk:
    param: int
    nodes: Tensor        # [numel] raw node ids, row-major over the tensor
    kind: int


# The prefix of the build's notes on what a capture could not follow (ops,
# mappers that raised); GraphState.errors_noted and the unstructured report read it.
NOT_FOLLOWED = "op not followed: "


def mapper_failure(qualname: str, module: nn.Module, error: Exception) -> str:
    """How either capture notes a mapper's exception (after ``NOT_FOLLOWED``;
    :mod:`.report` reads the error back for the module's warning)."""
    return f"{qualname} ({type(module).__name__}): {type(error).__name__}: {error}"


def _alias_parametrized(model: nn.Module, param_index: dict[int, int]) -> list[Tensor]:
    """``torch.nn.utils.parametrize``: a parametrized module's ``weight`` is
    computed from its ``original`` parameter(s) (weight_norm, spectral_norm,
    orthogonal, ...). Where exactly one original has the computed tensor's
    shape, the computed tensor's entries are that original's, one to one, so
    mappers that place ``module.weight`` place the original. Only holds while
    ``parametrize.cached()`` keeps handing out the same computed tensor (the
    builder builds under it); returns those tensors, kept alive so their ids
    stay theirs. Computed in eval mode without autograd, as the recorded run
    is (spectral_norm's power iteration does not step)."""
    derived = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, chain in module.parametrizations.items():
            try:
                with eval_mode(chain):
                    value = getattr(module, name)
            except Exception:  # one that cannot run here is left to the captures (fx traces through it)
                continue
            same = [p for p in chain.parameters(recurse=False) if id(p) in param_index and p.shape == value.shape]
            if len(same) == 1:
                param_index[id(value)] = param_index[id(same[0])]
                derived.append(value)
    return derived


class GraphState:
    def __init__(self, model: nn.Module):
        self.param_names: list[str] = []
        self.param_shapes: list[torch.Size] = []
        self.param_index: dict[int, int] = {}   # id(Parameter) -> index in param_names
        self.params: list[nn.Parameter] = []
        # named_parameters() drops duplicates, so a tied Parameter has one name
        # and is claimed by whichever layer reaches it first.
        for name, p in model.named_parameters():
            self.param_index[id(p)] = len(self.param_names)
            self.param_names.append(name)
            self.param_shapes.append(p.shape)
            self.params.append(p)
        self._derived = _alias_parametrized(model, self.param_index)
        self.claimed: dict[int, str] = {}
        self.reused: list[str] = []   # tied / shared weights whose later uses were merged
        self.edge_chunks: list[_EdgeChunk] = []
        self.entry_chunks: list[_EntryChunk] = []
        # per-node bookkeeping (lists: nodes are few, entries are many)
        self._type: list[int] = []
        self._depth: list[int] = []
        self._parent: list[int] = []
        self._input_key: list[tuple[int, int] | None] = []
        self._output_pos: dict[int, int] = {}
        self._token_groups = 0
        # modules we could not structure: qualified name -> reason
        self.opaque: dict[str, str] = {}
        self.capture = "fx"
        self.notes: list[str] = []

    # ------------------------------------------------------------- nodes
    @property
    def num_raw_nodes(self) -> int:
        return len(self._type)

    def new_nodes(self, n: int, kind: NodeType, depth: int, input_group: int | None = None) -> Tensor:
        start = len(self._type)
        self._type.extend([int(kind)] * n)
        self._depth.extend([int(depth)] * n)
        self._parent.extend(range(start, start + n))
        if kind == NodeType.INPUT:
            if input_group is None:
                # token sets not fed by a network input (e.g. position ids from
                # arange) are ordered after all real inputs
                input_group = 1_000_000 + self._token_groups
                self._token_groups += 1
            self._input_key.extend((input_group, i) for i in range(n))
        else:
            self._input_key.extend([None] * n)
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        parent = self._parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    def node_type_of(self, i: int) -> int:
        return self._type[self.find(i)]

    def merge(self, a: Tensor, b: Tensor) -> None:
        """Identify neurons pairwise (residual add, elementwise product, ...)."""
        if a.shape != b.shape:
            raise ValueError(f"cannot merge node lists of sizes {a.shape[0]} and {b.shape[0]}")
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            root, child = (rx, ry) if rx < ry else (ry, rx)
            self._parent[child] = root
            # INPUT/OUTPUT identities survive a merge; HIDDEN is the weakest
            tr, tc = self._type[root], self._type[child]
            if tr == NodeType.HIDDEN and tc != NodeType.HIDDEN:
                self._type[root] = tc
                self._input_key[root] = self._input_key[child]
            self._depth[root] = max(self._depth[root], self._depth[child])

    def mark_outputs(self, nodes: list[int]) -> None:
        """The network's output units, in output order. A unit that is an
        input too -- the token nodes of a tied LM head, whose logit ``t`` *is*
        token ``t`` -- becomes OUTPUT: being read by the loss is the role the
        metanetwork is told about, and its edges say it is also an input."""
        for pos, n in enumerate(nodes):
            r = self.find(n)
            if self._type[r] in (NodeType.HIDDEN, NodeType.INPUT):
                self._type[r] = int(NodeType.OUTPUT)
            if self._type[r] == NodeType.OUTPUT:
                self._output_pos.setdefault(r, pos)

    # ----------------------------------------------------------- entries
    def param_id(self, p) -> int | None:
        return self.param_index.get(id(p)) if p is not None else None

    def _take(self, p, where: str) -> int | None:
        idx = self.param_id(p)
        if idx is None or idx in self.claimed:
            return None  # absent, not a model parameter, or tied and already placed
        self.claimed[idx] = where
        return idx

    def add_edges(self, p, shape: tuple[int, ...], src: Tensor, dst: Tensor, kind,
                  pos: Tensor | None = None) -> bool:
        """Edges of weight ``p``: entry at (row-major) index ``j`` of ``shape``
        goes ``src[j] -> dst[j]``, with src/dst/kind/pos broadcast to ``shape``."""
        idx = self.param_id(p)
        if idx is not None and self.claimed.get(idx) == "edge":
            self._reuse(idx, tuple(int(d) for d in shape), src, dst)
            return False
        idx = self._take(p, "edge")
        if idx is None:
            return False
        shape = tuple(int(d) for d in shape)
        n = self.param_shapes[idx].numel()
        assert math.prod(shape) == n, (self.param_names[idx], shape, n)
        torch.broadcast_shapes(src.shape, dst.shape, shape)  # fails early on a mapper bug
        self.edge_chunks.append(_EdgeChunk(idx, shape, src, dst, kind, pos))
        return True

    @staticmethod
    def _factors(shape, src: Tensor, dst: Tensor):
        """(row nodes [R], col nodes [C]) of a 2-D weight whose endpoints are
        one fixed by the row and one by the column; None otherwise."""
        if len(shape) != 2:
            return None
        R, C = shape
        rows = cols = None
        for ends in (src, dst):
            e = ends.reshape((1,) * (2 - ends.dim()) + tuple(ends.shape)) if ends.dim() <= 2 else None
            if e is None:
                return None
            # a 1 x 1 weight: both ends are (1, 1); the first is the rows, the second the columns
            if (tuple(e.shape) == (R, 1) and R != 1) or (R == 1 and tuple(e.shape) == (1, 1) and rows is None):
                rows = e.reshape(R)
            elif tuple(e.shape) == (1, C):
                cols = e.reshape(C)
        return (rows, cols) if rows is not None and cols is not None else None

    def _reuse(self, idx: int, shape, src: Tensor, dst: Tensor) -> None:
        """A weight used again (tied embeddings, a module called twice): its
        entries stay on the edges of the first use; the endpoints of this use
        are merged with the first use's (a permutation must act on both the
        same way, or the shared entries could not be permuted consistently)."""
        first = next((c for c in self.edge_chunks if c.param == idx), None)
        if first is None or first.shape != shape:
            return
        a, b = self._factors(first.shape, first.src, first.dst), self._factors(shape, src, dst)
        if a is None or b is None:
            return
        self.merge(a[0], b[0])
        self.merge(a[1], b[1])
        self.reused.append(self.param_names[idx])

    def add_entries(self, p, nodes: Tensor, kind: EntryKind) -> bool:
        idx = self._take(p, "node")
        if idx is None:
            return False
        n = self.param_shapes[idx].numel()
        assert nodes.shape[0] == n, (self.param_names[idx], nodes.shape, n)
        self.entry_chunks.append(_EntryChunk(idx, nodes, int(kind)))
        return True

    def errors_noted(self) -> bool:
        return any(n.startswith(NOT_FOLLOWED) for n in self.notes)

    def unclaimed(self) -> list[int]:
        return [i for i in range(len(self.param_names)) if i not in self.claimed]

    # ---------------------------------------------------------- assemble
    def finish(self, fallback: list[int], unstructured: list[str]) -> ParamGraph:
        n_raw = len(self._type)
        roots = [self.find(i) for i in range(n_raw)]
        root_t = torch.tensor(roots, dtype=torch.long)
        is_root = root_t == torch.arange(n_raw)
        new_id = torch.cumsum(is_root.long(), 0) - 1
        remap = new_id[root_t] if n_raw else torch.zeros(0, dtype=torch.long)
        keep = is_root.nonzero().flatten().tolist()

        node_type = [self._type[r] for r in keep]
        depth = [float(self._depth[r]) for r in keep]
        io = [-1] * len(keep)
        inputs = sorted((self._input_key[r], j) for j, r in enumerate(keep)
                        if node_type[j] == NodeType.INPUT)
        for rank, (_, j) in enumerate(inputs):
            io[j] = rank
        for j, r in enumerate(keep):
            if node_type[j] == NodeType.OUTPUT:
                io[j] = self._output_pos.get(r, -1)
        max_depth = max(depth, default=0.0)
        # one TENSOR node per fallback tensor, depth 0: it has no place in the layer order
        num_nodes = len(keep) + len(fallback)
        node_type += [int(NodeType.TENSOR)] * len(fallback)
        depth = [d / max_depth if max_depth > 0 else 0.0 for d in depth] + [0.0] * len(fallback)
        io += [-1] * len(fallback)

        # edges: kept factored (node ids final); the per-edge tensors are
        # written only when read (factored.py): a 124M-edge build writes none
        chunks, flat_order, a = [], [], 0
        for c in self.edge_chunks:
            for ends in (c.src, c.dst):
                assert ends.numel() == 0 or (0 <= int(ends.min()) and int(ends.max()) < n_raw), \
                    f"edge endpoints of {self.param_names[c.param]} out of range"
            b = a + math.prod(c.shape)
            kind = compact(c.kind) if isinstance(c.kind, Tensor) else int(c.kind)
            pos = compact(c.pos) if c.pos is not None else None
            chunks.append(EdgeChunk(a, b, c.shape, remap[compact(c.src)], remap[compact(c.dst)], kind, pos))
            flat_order.append(c.param)
            a = b
        kinds = {c.kind for c in chunks if not isinstance(c.kind, Tensor)}
        one_kind = kinds.pop() if len(kinds) == 1 and all(not isinstance(c.kind, Tensor) for c in chunks) else None
        factors = EdgeFactors(chunks, a, one_kind, any(c.pos is not None for c in chunks),
                              torch.get_default_dtype())

        entry_nodes, entry_kinds = [], []
        for c in self.entry_chunks:
            assert c.nodes.numel() == 0 or (0 <= int(c.nodes.min()) and int(c.nodes.max()) < n_raw), \
                f"entries of {self.param_names[c.param]} on nonexistent nodes"
            entry_nodes.append(remap[c.nodes])
            entry_kinds.append(torch.full((c.nodes.shape[0],), c.kind, dtype=torch.long))
            flat_order.append(c.param)
        for k, idx in enumerate(fallback):
            n = self.param_shapes[idx].numel()
            entry_nodes.append(torch.full((n,), len(keep) + k, dtype=torch.long))
            entry_kinds.append(torch.full((n,), int(EntryKind.FALLBACK), dtype=torch.long))
            flat_order.append(idx)
        empty = torch.zeros(0, dtype=torch.long)
        return FactoredGraph.assemble(
            factors,
            has_edge_pos=any(c.pos is not None and c.stop > c.start and bool(c.pos.any()) for c in chunks),
            num_nodes=num_nodes,
            node_type=torch.tensor(node_type, dtype=torch.long),
            node_io_index=torch.tensor(io, dtype=torch.long),
            node_depth=torch.tensor(depth, dtype=torch.float32),
            entry_node=torch.cat(entry_nodes) if entry_nodes else empty,
            entry_kind=torch.cat(entry_kinds) if entry_kinds else empty,
            param_names=list(self.param_names),
            param_shapes=list(self.param_shapes),
            flat_order=flat_order,
            num_edge_params=len(self.edge_chunks),
            unstructured=unstructured,
            capture="",
            notes=[],
        )

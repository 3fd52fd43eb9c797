"""FSDP2 (``fully_shard``) models for :class:`l2o.optim.ShardedGMNOptimizer`.

After ``fully_shard`` each parameter is a ``DTensor`` holding, on each rank,
the rank's rows along dim 0 (``torch.chunk`` pieces). The graph is built from
the whole model (its parameters gathered for that one recorded run), and the
step then owns, of every tensor, exactly the rows the rank holds: it reads
their local values and gradients and writes their update in place, so no
parameter crosses ranks."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def dtensor_class():
    """``torch.distributed.tensor.DTensor``, or None where torch lacks it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # a torch built without distributed
        return None
    return DTensor


def has_dtensors(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor (FSDP2, tensor parallel)."""
    cls = dtensor_class()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Every FSDP2 module of ``model`` gathers its parameters for the block
    (plain tensors, the whole model on every rank) and shards them again
    after; a model without FSDP2 modules is left as it is. A collective:
    every rank enters it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()   # noqa: N806 - torch without FSDP2
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def check_row_sharded(names: list[str], params: list[Tensor], world: int) -> None:
    """Every parameter a DTensor sharded along dim 0 over a 1-D mesh of the
    optimizer's ``world`` ranks (what ``fully_shard`` makes), else a
    ``ValueError`` naming the first that is not."""
    cls = dtensor_class()
    for name, p in zip(names, params):
        if not isinstance(p, cls):
            raise ValueError(f"ShardedGMNOptimizer: {name!r} is a plain tensor while other parameters are "
                             "DTensors; apply fully_shard to every module that holds parameters")
        placements = tuple(p.placements)
        if (p.device_mesh.ndim != 1 or p.device_mesh.size() != world or len(placements) != 1
                or not placements[0].is_shard(0) or p.dim() == 0):
            raise ValueError(f"ShardedGMNOptimizer: {name!r} is a DTensor placed {placements} on a mesh of "
                             f"shape {tuple(p.device_mesh.shape)}; it takes FSDP2's layout: Shard(0) over a "
                             f"1-D mesh of the process group's {world} ranks")


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: writing it writes the parameter)."""
    return t.to_local() if isinstance(t, dtensor_class()) else t


def state_like(p: Tensor, m: Tensor, v: Tensor) -> dict[str, Tensor]:
    """A row-sharded parameter's statistics as DTensors sharded as ``p`` is:
    ``v`` of ``p``'s shape, ``m`` ``[num_momenta, *p.shape]`` (rows on dim 1),
    their local parts views of the rank's flat ``m`` ``[num_momenta, L]`` and
    ``v`` ``[L]`` over ``p``'s local entries."""
    from torch.distributed.tensor import DTensor, Shard
    shape = tuple(local(p).shape)
    v_local, m_local = v.view(shape), m.reshape(m.shape[0], *shape)   # views: rows of the flat buffers
    m_whole = torch.empty(m.shape[0], *p.shape, device="meta")          # the global shape and strides, no memory
    return {"m": DTensor.from_local(m_local, p.device_mesh, [Shard(1)], run_check=False,
                                    shape=m_whole.shape, stride=m_whole.stride()),
            "v": DTensor.from_local(v_local, p.device_mesh, [Shard(0)], run_check=False,
                                    shape=m_whole.shape[1:], stride=m_whole.stride()[1:])}

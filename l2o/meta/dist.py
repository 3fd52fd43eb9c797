"""torchrun / DDP helpers: the same script on 1 CPU, 1 GPU, or K processes.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank owns the meta-batch slots
``rank, rank + W, ...``, computes the meta-gradient of its runs (already
divided by the global meta-batch), and a sum all-reduce gives every rank the
mean gradient; identical updates keep the replicas identical without
broadcasting weights each step. Rank 0 alone writes checkpoints and logs.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device_check import device_problem
from .config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def check_device(name: str) -> None:
    """Refuse, before anything is built, a device this process cannot use (a ConfigError
    naming it) rather than torch's RuntimeError or AssertionError from deep inside."""
    problem = device_problem(name)
    if problem:
        raise ConfigError(problem)


def setup(device: str) -> DistInfo:
    if not launched_with_ranks():
        return DistInfo(device=torch.device(device))
    world, rank, local = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device(device), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, dev)


def my_slots(info: DistInfo, meta_batch: int) -> list[int]:
    if meta_batch < info.world_size:
        raise ValueError(f"meta_batch ({meta_batch}) must be >= the number of processes ({info.world_size})")
    return list(range(info.rank, meta_batch, info.world_size))


def restore_rng(info: DistInfo, saved: dict[int, torch.Tensor], saved_world_size: int) -> None:
    """This rank's checkpointed random stream. Resumed on another number of
    processes, slots draw from other streams: the run goes on, not bit-exactly."""
    if info.rank in saved:
        torch.set_rng_state(saved[info.rank])
    if saved_world_size != info.world_size and info.is_main:
        warnings.warn(f"resuming a checkpoint written by {saved_world_size} process(es) on "
                      f"{info.world_size}: the runs continue, but not bit-exactly as they would have")


def all_reduce_grads(info: DistInfo, params: list[torch.nn.Parameter], extras: list[float]) -> list[float]:
    """Sum ``.grad`` of ``params`` and the scalars ``extras`` over ranks, in one
    flat buffer (one collective per outer step). Missing grads count as zero."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [torch.tensor(extras, dtype=params[0].dtype, device=params[0].device)])
    if info.enabled:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return flat[offset:].tolist()


def broadcast_module(info: DistInfo, module: torch.nn.Module) -> None:
    if info.enabled:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def gather(info: DistInfo, obj):
    """List of every rank's ``obj`` on rank 0 (None elsewhere); ``[obj]`` without DDP."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group once every rank is done with it (a rank tearing
    gloo down while another still talks to it can abort)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launched_with_ranks() -> bool:
    """Whether this process is one of several ranks (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_finished_rank() -> None:
    """Exit 0 without the interpreter's teardown, once the run is complete and
    its files written and closed: there gloo's worker threads have aborted a
    rank (SIGABRT, "terminate called without an active exception") after a
    finished run, which torchrun then reports as a failed one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

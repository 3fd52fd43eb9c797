"""Per-rank memory of ShardedGMNOptimizer as the number of ranks grows (gloo, CPU).

    .venv/bin/python bench/sharded_memory.py [--width 4096] [--worlds 1 2 4] [--layouts ddp fsdp]
    .venv/bin/python bench/sharded_memory.py --gpt2 --worlds 1 2    # Hugging Face GPT-2 small (124M)

For each layout and world size, ``world`` processes (``torch.multiprocessing``,
gloo, one thread each) train the same model -- an MLP (``--layers`` Linear
layers of ``--width``) or, with ``--gpt2``, GPT-2 small at random init on 2 x
128 random tokens per rank -- for ``--steps`` steps with ``ShardedGMNOptimizer``:

* ``ddp``: every rank holds the whole model and the same gradients (as after
  DDP's all-reduce); the optimizer shards its statistics and work by flat range;
* ``fsdp``: every Linear (GPT-2: every block) and the root under
  ``fully_shard`` (FSDP2): parameters, gradients and statistics are all row shards.

Per rank it prints the optimizer's statistics in bytes per model parameter
(``m``, ``v``: 20 B/param unsharded), the resident set held after the steps
above that of the model alone (optimizer, gradients, the step's buffers) and
the process's peak (which, with FSDP2, includes building the graph from the
gathered model once). Several ranks on a 2-core machine share its cores:
this measures memory, not speed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rank(rank: int, world: int, layout: str, args: argparse.Namespace, init: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from l2o.meta.dist import exit_finished_rank
    from l2o.optim import ShardedGMNOptimizer

    torch.manual_seed(0)
    if args.gpt2:
        import transformers
        transformers.logging.set_verbosity_error()
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        shard_units = list(model.transformer.h)
    else:
        layers: list[nn.Module] = [nn.Linear(64, args.width), nn.ReLU()]
        for _ in range(args.layers - 2):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        layers.append(nn.Linear(args.width, 10))
        model = nn.Sequential(*layers)
        shard_units = [layer for layer in model if isinstance(layer, nn.Linear)]
    n = sum(p.numel() for p in model.parameters())
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for unit in shard_units:
            fully_shard(unit)
        fully_shard(model)
    model_rss = _rss_mib()
    opt = ShardedGMNOptimizer(model)
    g = torch.Generator().manual_seed(rank if layout == "fsdp" else 0)   # FSDP: each rank its own batch
    for _ in range(args.steps):
        opt.zero_grad()
        if args.gpt2:
            tokens = torch.randint(0, 50257, (2, 128), generator=g)
            model(tokens, labels=tokens).loss.backward()
        else:
            x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
            nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    state = sum(t.numel() * t.element_size() for t in opt._flat_state.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"{rank}.json").write_text(json.dumps(
        {"params": n, "state_b_per_param": state / n, "peak_mib": peak, "held_mib": _rss_mib() - model_rss}))
    dist.barrier()
    exit_finished_rank()   # no gloo teardown, as meta_train.py under torchrun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layouts", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gpt2", action="store_true", help="Hugging Face GPT-2 small instead of the MLP")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    what = "GPT-2 small" if args.gpt2 else f"MLP of {args.layers} Linear layers, width {args.width}"
    print(f"{what}; ShardedGMNOptimizer, {args.steps} steps; per rank:")
    print(f"{'layout':>6} {'ranks':>5} | {'statistics B/param':>18} | {'held after steps MiB':>20} | {'peak MiB':>8}")
    for layout in args.layouts:
        for world in args.worlds:
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_rank, args=(world, layout, args, str(Path(tmp, "init")), tmp), nprocs=world, join=True)
                ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
            state = max(r["state_b_per_param"] for r in ranks)
            held = max(r["held_mib"] for r in ranks)
            peak = max(r["peak_mib"] for r in ranks)
            print(f"{layout:>6} {world:>5} | {state:18.1f} | {held:20.0f} | {peak:8.0f}"
                  f"   ({ranks[0]['params'] / 1e6:.1f}M parameters; each column the largest rank's)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

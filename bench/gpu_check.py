"""The GPU check: what only a GPU can show, in one short run (a few minutes).

    python bench/gpu_check.py                      # on a machine with CUDA
    python bench/gpu_check.py --device cpu --quick # the same script end to end on a CPU (smoke test)

1. Correctness on the device: a GMNOptimizer / MLPOptimizer step on CUDA equals
   the CPU step on the same model and gradients (to float tolerance).
2. Train-step cost (forward + backward + optimizer step) and peak memory of
   GMNOptimizer (edge states by size, and ``edge_states="float16"``),
   MLPOptimizer and AdamW on reference models and, when
   ``transformers`` is installed, GPT-2 small (124M) and medium (350M), as
   ratios to AdamW measured in the same run.
3. Meta-training throughput on the device (tiny preset, batched runs).
4. The sharded optimizer on the device: ``ShardedGMNOptimizer`` on an FSDP2
   (``fully_shard``) model in a one-rank process group (NCCL on CUDA, gloo on
   CPU) equals ``GMNOptimizer`` on the same model (the DTensor path on the
   device's tensors).

Prints one table per part and, with ``--json PATH``, writes every number.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import l2o  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_models(quick: bool) -> dict:
    width = 256 if quick else 2048
    models = {
        f"mlp_{width}": (lambda: nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                               nn.Linear(width, 10)),
                         lambda dev: (torch.randn(64, 784, device=dev),)),
        "transformer_4x256": (lambda: nn.TransformerEncoder(
            nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, norm_first=True), 2 if quick else 4),
                              lambda dev: (torch.randn(16, 64, 256, device=dev),)),
    }
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        sizes = {"gpt2_tiny": dict(n_layer=2, n_embd=128, n_head=4)} if quick else {
            "gpt2_small_124M": {}, "gpt2_medium_350M": dict(n_layer=24, n_embd=1024, n_head=16)}
        for name, kw in sizes.items():
            models[name] = (lambda kw=kw: transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)),
                            lambda dev: (torch.randint(0, 50257, (4, 128), device=dev),))
    except ImportError:
        pass
    return models


def loss_of(model: nn.Module, inputs) -> torch.Tensor:
    out = model(*inputs)
    out = out.logits if hasattr(out, "logits") else out
    return out.float().pow(2).mean()


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4),
    "mlp": lambda m: l2o.MLPOptimizer(m.parameters()),
    "gmn": lambda m: l2o.GMNOptimizer(m),
    "gmn_f16": lambda m: l2o.GMNOptimizer(m, edge_states="float16"),   # kept half-float edge states
}


def step_costs(device: torch.device, quick: bool, steps: int) -> list[dict]:
    rows = []
    for name, (build, inputs_for) in reference_models(quick).items():
        inputs = inputs_for(device)
        times, peaks = {}, {}
        for opt_name, make in OPTIMIZERS.items():
            torch.manual_seed(0)
            model = build().to(device)
            try:
                t_build = time.perf_counter()
                opt = make(model)
                t_build = time.perf_counter() - t_build
                for _ in range(2):                        # warm-up (kernels, workspaces)
                    opt.zero_grad(set_to_none=True)
                    loss_of(model, inputs).backward()
                    opt.step()
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                per_step = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    loss_of(model, inputs).backward()
                    opt.step()
                    sync(device)
                    per_step.append(time.perf_counter() - t0)
                times[opt_name] = statistics.median(per_step)
                peaks[opt_name] = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                   else float("nan"))
                if opt_name == "gmn":
                    times["gmn_build_s"] = t_build
            except torch.OutOfMemoryError as err:
                times[opt_name], peaks[opt_name] = float("nan"), float("nan")
                print(f"{name} {opt_name}: out of memory ({err})".splitlines()[0])
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        n = sum(p.numel() for p in build().parameters())
        row = {"model": name, "params": n, "step_s": times, "peak_gib": peaks,
               "ratio_to_adamw": {o: times[o] / times["adamw"] for o in OPTIMIZERS}}
        rows.append(row)
        print(f"{name:<20} {n / 1e6:8.1f}M  " + "  ".join(
            f"{o} {times[o] * 1e3:7.1f} ms ({row['ratio_to_adamw'][o]:.2f}x, {peaks[o]:.1f} GiB)" for o in OPTIMIZERS)
            + f"  graph build {times.get('gmn_build_s', float('nan')):.1f} s", flush=True)
    return rows


def device_matches_cpu(device: torch.device) -> dict:
    """One optimizer step on ``device`` equals the CPU step."""
    out = {}
    for kind, make in (("gmn", lambda m, w: l2o.GMNOptimizer(m, weights=w)),
                       ("mlp", lambda m, w: l2o.MLPOptimizer(m.parameters(), weights=w))):
        torch.manual_seed(0)
        lopt = l2o.make_lopt(kind)        # the same metanetwork weights on both devices
        base = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10))
        x = torch.randn(16, 32)
        results = []
        for dev in (torch.device("cpu"), device):
            model = copy.deepcopy(base).to(dev)
            opt = make(model, lopt)
            for _ in range(3):
                opt.zero_grad()
                model(x.to(dev)).pow(2).mean().backward()
                opt.step()
            results.append(torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]))
        diff = float((results[0] - results[1]).abs().max())
        out[kind] = diff
        print(f"{kind}: max |params(cpu) - params({device})| after 3 steps = {diff:.2e}")
    return out


def fsdp_matches_unsharded(device: torch.device) -> dict:
    """ShardedGMNOptimizer on a one-rank FSDP2 model equals GMNOptimizer (same device)."""
    import os
    import tempfile

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from l2o.optim import ShardedGMNOptimizer
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            torch.manual_seed(0)
            base = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 10)).to(device)
            models = [copy.deepcopy(base), copy.deepcopy(base)]
            for layer in models[1]:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
            fully_shard(models[1])
            opts = [l2o.GMNOptimizer(models[0]), ShardedGMNOptimizer(models[1])]
            x = torch.randn(16, 32, device=device)
            for model, opt in zip(models, opts):
                for _ in range(3):
                    opt.zero_grad()
                    model(x).pow(2).mean().backward()
                    opt.step()
            with torch.no_grad():
                diff = max(float((a - b.full_tensor()).abs().max())
                           for a, b in zip(models[0].parameters(), models[1].parameters()))
        finally:
            dist.destroy_process_group()
    print(f"ShardedGMNOptimizer on FSDP2 (1 rank) vs GMNOptimizer on {device}: max |params| difference "
          f"after 3 steps = {diff:.2e}")
    return {"max_abs_diff": diff}


def meta_throughput(device: torch.device, quick: bool) -> dict:
    import subprocess
    cmd = [sys.executable, str(Path(__file__).with_name("meta_train_throughput.py")), "--device", str(device),
           "--estimators", "tbptt,tbptt-batched", "--lopts", "gmn", "--meta-batch", "8",
           "--steps", "3" if quick else "10", "--repeats", "1" if quick else "3"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    print(done.stdout[-1500:] or done.stderr[-1500:])
    return {"stdout": done.stdout[-3000:], "returncode": done.returncode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small models, few steps (a smoke test)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (pass --device cpu for a smoke test)")
    info = {"device": str(device), "torch": torch.__version__,
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    def save() -> None:  # after every part: a run cut short keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=1, default=str))

    print(f"# gpu_check on {info['name']} (torch {info['torch']})\n\n## 1. device step equals the CPU step")
    info["device_matches_cpu"] = device_matches_cpu(device)
    save()
    print("\n## 2. train step (fwd+bwd+step): median time, ratio to AdamW, peak memory")
    info["step_costs"] = step_costs(device, args.quick, args.steps)
    save()
    print("\n## 3. meta-training throughput")
    info["meta_throughput"] = meta_throughput(device, args.quick)
    save()
    print("\n## 4. sharded optimizer (FSDP2) on the device")
    info["fsdp_matches_unsharded"] = fsdp_matches_unsharded(device)
    save()


if __name__ == "__main__":
    main()

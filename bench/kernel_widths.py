"""The fused step kernels built with each vector width this CPU offers
(the flag sets of ``l2o.fast.native._variants`` for either library: 16
lanes on AVX-512 with one or two vectors per tile, ``-march=native``'s 8, a
portable 4), for both learned optimizers, timed interleaved on the same
models in one run; the ratio column is each build's step time over the
``-march=native`` (8-lane) one's.

    python bench/kernel_widths.py [--repeats 5] [--threads 1]

``native.load`` uses the first flag set that compiles for a library's widths;
this shows what that choice is worth here (it is why the GMN's library takes
one vector per tile and the MLP's two). Medians of the no-grad step
(``backend.step_flat``).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import l2o
from l2o import features as F_
from l2o.fast import native
from l2o.fast.backend import ChunkedBackend, fused_kernels
from l2o.layout import tensor_layout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fast_step import time_backends, transformer, wide_cnn  # noqa: E402


def wide_mlp():
    w = 2048
    return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10)), None


# every flag set of either library's (a GMN's widths, an MLP's), each tried on both
FLAG_SETS = [list(f) for f in dict.fromkeys(tuple(f) for sizes in ((F_.NUM_ENTRY_FEATURES, 8, 16, 0),
                                                                  (F_.NUM_ENTRY_FEATURES, 0, 0, 32))
                                             for f in native._variants(sizes))]
MODELS = {"MLP width 2048 (8.4M)": wide_mlp, "wide CNN": wide_cnn, "transformer d256 x3 + vocab 1000": transformer}


def kernels_per_build(lopt, choice: str, options: dict[str, object]) -> dict[str, object]:
    """One kernel library per option (each its own build, into the cache of
    ``$L2O_CACHE``): ``native.<choice>`` (``_variants`` or ``_threading``)
    made to offer that option alone; an option that does not build is
    reported and left out."""
    original, out = getattr(native, choice), {}
    try:
        for name, option in options.items():
            setattr(native, choice, lambda *_, option=option: [option])
            native.forget()
            kernels = fused_kernels(lopt, "cpu")
            if kernels is None:
                print(f"  {name}: {native.status()}")
                continue
            out[name] = kernels
    finally:
        setattr(native, choice, original)
        native.forget()
    return out


def backends_per_flags(lopt, graph) -> dict[str, ChunkedBackend]:
    """One backend per flag set, each on its own library (built into a fresh cache)."""
    kernels = kernels_per_build(lopt, "_variants", {" ".join(flags): flags for flags in FLAG_SETS})
    return {name: ChunkedBackend(lopt, graph, k) for name, k in kernels.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["L2O_CACHE"] = tempfile.mkdtemp(prefix="l2o_widths_")
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} interleaved steps; "
          f"flag sets native.load tries, in order: GMN {[' '.join(f) for f in native._variants((8, 8, 16, 0))]}, "
          f"MLP {[' '.join(f) for f in native._variants((8, 0, 0, 32))]}\n")
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model, example = make()
        graph = l2o.build_graph(model, example)
        layout = tensor_layout([p.shape for p in model.parameters()])
        for lopt, g in ((l2o.GMNLOpt(), graph), (l2o.MLPLOpt(), layout)):
            lopt.requires_grad_(False)
            flat = g.gather([p.detach() for p in model.parameters()])
            grad = torch.randn_like(flat)
            times = time_backends(backends_per_flags(lopt, g), lopt, flat, grad, args.repeats)
            base = times.get("-march=native")
            for k, ms in times.items():
                ratio = f"{ms / base:.2f}x" if base else "-"
                print(f"{name:<34} {graph.num_params:>9} {lopt.kind:>4}  {k:<32} {ms:>9.1f} ms  {ratio}")
        print(flush=True)


if __name__ == "__main__":
    main()

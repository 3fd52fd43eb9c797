"""The shipped learned optimizer with its output head set to zero: what its
nominal Adam term and step-size controller do without the metanetwork.

    python bench/zero_head.py gmn out/snap/gmn_zero_head.safetensors
    python -m l2o.evaluate --suite valid --seeds 2 --steps 400 --optimizers gmn \\
        --gmn-weights out/snap/gmn_zero_head.safetensors --out out/valid400_gmn_zero_head

(docs/experiments.md, "How much of either shipped optimizer is learned?").
"""
import argparse

import torch

import l2o
from l2o.checkpoint import load_pretrained

HEADS = ("edge_head", "entry_head", "out")   # the GMN's and the MLP's output layers

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("kind", choices=["gmn", "mlp"])
p.add_argument("out", help="where to write the zeroed weights (.safetensors)")
args = p.parse_args()
lopt = load_pretrained(args.kind)
with torch.no_grad():
    for name, t in lopt.named_parameters():
        if name.split(".")[0] in HEADS:
            t.zero_()
            print("zeroed", name, tuple(t.shape))
l2o.save_lopt(lopt, args.out)

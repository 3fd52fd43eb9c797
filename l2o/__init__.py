"""l2o: graph-metanetwork learned optimizers for PyTorch."""
from .checkpoint import load_lopt, make_lopt, save_lopt
from .gmn import GMNLOpt
from .graph import ParamGraph, build_graph
from .mlp_lopt import MLPLOpt
from .optim import GMNOptimizer, MLPOptimizer

__all__ = [
    "GMNOptimizer", "MLPOptimizer", "GMNLOpt", "MLPLOpt", "ParamGraph", "build_graph",
    "load_lopt", "make_lopt", "save_lopt",
]
__version__ = "0.1.0"

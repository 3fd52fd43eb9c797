"""l2o: graph-metanetwork learned optimizers for PyTorch."""
from .graph import ParamGraph, build_graph

__all__ = ["ParamGraph", "build_graph"]
__version__ = "0.1.0"

"""The graph-free baseline: a small MLP applied to every parameter entry alone.

This is learned_optimization's small_fc_lopt / LOLv2 design (Metz et al. 2022):
the same per-entry features as the GMN, a 2-hidden-layer MLP, no information
from neighbouring neurons. It reads only ``graph.tensor_id`` (for per-tensor
normalisation), so it runs on any layout, structured or not, and it is the
ablation that measures what the graph buys.

.. math::
    (d, s)_k = W_3\\,\\sigma(W_2\\,\\sigma(W_1 x_k + U t + b_1) + b_2) + b_3
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .features import NUM_ENTRY_FEATURES, NUM_TIME_FEATURES
from .graph.batch import per_run, run_index
from .graph.param_graph import ParamGraph
from .lopt import LearnedOptimizer, small_init_


class MLPLOpt(LearnedOptimizer):
    kind = "mlp"

    def __init__(self, hidden: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.hidden = int(hidden)
        self.inp = nn.Linear(NUM_ENTRY_FEATURES, hidden)
        # time features are the same for every entry: fold them into the bias
        self.time = nn.Linear(NUM_TIME_FEATURES, hidden, bias=False)
        self.mid = nn.Linear(hidden, hidden)
        self.out = small_init_(nn.Linear(hidden, 2))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": self.hidden}

    def predict(self, graph: ParamGraph, x: Tensor, t: Tensor) -> Tensor:
        # in place on fresh intermediates: on large models every new
        # parameter-sized activation costs page faults (see GMNConv.message)
        z = self.inp(x)
        z += per_run(self.time(t), run_index(graph, "flat"))
        z = self.mid(z.relu_())
        return self.out(z.relu_())

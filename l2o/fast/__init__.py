"""The chunked, cache-resident, no-grad step of the learned optimizers.

``GMNOptimizer.step`` and ``MLPOptimizer.step`` need no autograd, so they can
evaluate the metanetwork far more cheaply than the differentiable forward used
in meta-training: run by run over the flat entries (:mod:`.plan`), with
feature-major workspaces reused across steps, the statistics updated in place
(:mod:`.features`), and the per-tensor feature normalisation folded into the
first layers' weights. The result equals ``lopt(graph, params, grad, state)``
up to float rounding (tests/test_fast.py checks it on every layer kind).
"""
from .plan import ChunkPlan, chunk_plan

# Below this many parameters the per-run Python loop costs more than the
# memory traffic it saves (small models are dominated by per-op overhead).
FAST_MIN_PARAMS = 20_000


def use_fast_path(num_params: int, device) -> bool:
    """The chunked path pays off on CPU for large models; on a GPU memory
    bandwidth is plentiful and the one-shot forward launches far fewer kernels."""
    return num_params >= FAST_MIN_PARAMS and str(device).startswith("cpu")


__all__ = ["ChunkPlan", "chunk_plan", "use_fast_path", "FAST_MIN_PARAMS"]

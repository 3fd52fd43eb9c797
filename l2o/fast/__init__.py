"""The chunked, cache-resident, no-grad step of the learned optimizers.

``GMNOptimizer.step`` and ``MLPOptimizer.step`` need no autograd, so they can
evaluate the metanetwork far more cheaply than the differentiable forward used
in meta-training: run by run over the flat entries (:mod:`.plan`), in
run-sized feature-major workspaces reused across steps, each pass recomputing
a run's features from the parameters, gradient and statistics, which are
written back once (:mod:`.features`), and the per-tensor feature normalisation
folded into the first layers' weights. The result equals ``lopt(graph, params, grad, state)``
up to float rounding (tests/test_fast.py checks it on every layer kind).

Each pass exists twice: as torch ops over the runs, and as a fused C kernel
(:mod:`.native`, ``kernels.c``) that keeps an entry's whole chain in
registers and takes a dense run (rows of a weight block) whole. The kernels are built with the
system C compiler on first use and used wherever they build (CPU tensors);
``L2O_NATIVE=0`` turns them off, ``l2o.fast.native.status()`` says which
is in use. Both compute the same function (tests/test_fast.py runs every
equivalence test with and without them).

The optimizers enter through ``LearnedOptimizer.step_entries`` (parameters
and gradients tensor by tensor, each run's update handed to a sink that
applies it at once: nothing model-sized is copied or kept but ``m`` and ``v``;
their graph is a :class:`.lean.LeanGraph`); ``LearnedOptimizer.step_no_grad``
is the flat form. :func:`use_fast_path` picks this path;
``bench/fast_step.py`` times the paths, ``bench/memory.py`` measures memory.
"""
from .plan import ChunkPlan, chunk_plan

# The chunked step loops in Python over runs (at least one per tensor), the
# forward runs a fixed number of large ops: below these sizes the loop costs
# more than the memory traffic it saves. With torch ops per pass
# (bench/fast_step.py: a 22k-parameter CNN with 28 tensors is 1.5x slower
# chunked, a 56k one with 8 tensors 2x faster):
FAST_MIN_PARAMS = 20_000
FAST_MIN_PARAMS_PER_TENSOR = 2_000
# With the fused kernels (bench/fast_step.py and the task suite: ties from ~8k
# parameters and ~500 per tensor, 2-2.5x faster on 24k-51k models of 14-32
# tensors; a 5k-parameter ResNet of 20 tensors is 1.3x slower chunked):
FUSED_MIN_PARAMS = 8_000
FUSED_MIN_PARAMS_PER_TENSOR = 500


def use_fast_path(num_params: int, device, num_tensors: int = 1, fused: bool = False) -> bool:
    """Whether the learned optimizers' ``step_no_grad`` takes the chunked
    path (``fused``: with the C kernels of :mod:`.native`). It pays off on CPU
    for models with enough entries per tensor; on a GPU memory bandwidth is
    plentiful and the one-shot forward launches far fewer kernels."""
    min_params, per_tensor = ((FUSED_MIN_PARAMS, FUSED_MIN_PARAMS_PER_TENSOR) if fused
                              else (FAST_MIN_PARAMS, FAST_MIN_PARAMS_PER_TENSOR))
    return (num_params >= min_params and num_params >= per_tensor * num_tensors
            and str(device).startswith("cpu"))


__all__ = ["ChunkPlan", "chunk_plan", "use_fast_path", "FAST_MIN_PARAMS", "FAST_MIN_PARAMS_PER_TENSOR",
           "FUSED_MIN_PARAMS", "FUSED_MIN_PARAMS_PER_TENSOR"]

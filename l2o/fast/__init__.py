"""The backends of the learned optimizers' no-grad step.

The metanetworks (:mod:`l2o.lopt`, :mod:`l2o.gmn`, :mod:`l2o.mlp_lopt`)
define their math once, as a differentiable forward, and import nothing from
here; this package sits above them and implements that math for
``GMNOptimizer.step`` / ``MLPOptimizer.step``, which need no autograd:

* :mod:`.backend` -- the backends (``"forward"``, ``"chunked"``, ``"fused"``),
  :func:`select_impl` (what ``impl="auto"`` means for a graph on a device)
  and :func:`make_backend`;
* :mod:`.plan` -- how a chunked step walks the flat entries (runs within a
  tensor, dense-block rows) and its run-sized workspaces;
* :mod:`.features` -- the chunked step's statistics and feature pass;
* :mod:`.gmn` (with :mod:`.gmn_terms`) and :mod:`.mlp` -- the chunked passes
  of each metanetwork;
* :mod:`.kernel_calls` -- the checked boundary to the fused C kernels
  (``kernels.c``), which :mod:`.native` builds and loads;
* :mod:`.lean` -- a graph without per-entry index tensors, for a chunked step;
* :mod:`.shard` -- the split of a sharded step over ranks.

The step math shared by every backend (the feature layout, the statistics,
the Adam direction, the update formula) lives in :mod:`l2o.features` and
:mod:`l2o.update_rule`. ``tests/test_backends.py`` runs every backend over
the same trajectories; ``bench/fast_step.py`` times them.
"""
from .backend import IMPLS, ChunkedBackend, ForwardBackend, make_backend, select_impl

__all__ = ["IMPLS", "ChunkedBackend", "ForwardBackend", "make_backend", "select_impl"]

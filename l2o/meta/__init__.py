"""Reusable pieces of meta-training (``meta_train.py`` is the entry point).

One job per module:

* :mod:`config`    -- :class:`~.config.MetaConfig` (every key, its one default, its check),
  presets, YAML/JSON loading, resuming an older checkpoint's config
* :mod:`tasks_pool` -- which task an inner run trains, graphs built once and cached
* :mod:`inner`     -- one inner training run and its K-step functional unroll
* :mod:`estimator` -- the gradient-estimator protocol (what TBPTT, ES and PES are)
* :mod:`tbptt`     -- meta-gradient by truncated backprop through the unroll
* :mod:`es`        -- meta-gradient by antithetic evolution strategies (truncated)
* :mod:`pes`       -- meta-gradient by persistent evolution strategies (unbiased across truncations)
* :mod:`antithetic` -- noise, perturbation and gradient write-back shared by es and pes
* :mod:`outer`     -- the estimators by name, and one outer step (estimate, all-reduce, clip, update)
* :mod:`schedule`  -- outer learning-rate schedule (warmup + cosine)
* :mod:`metanet`   -- the metanetwork a run trains (lopt_config checked, warm start, freeze), its outer optimizer
* :mod:`state`     -- checkpoint / resume of the whole outer training state
* :mod:`guard`     -- checks of a run's inputs before anything is built; what a resumed, stopped
  or interrupted run tells its user
* :mod:`summary`   -- the run's summary.json
* :mod:`dist`      -- torchrun / DDP helpers (gloo on CPU, nccl on CUDA)
* :mod:`quick_eval` -- held-out quick evaluation (learned optimizer vs Adam)
* :mod:`faults`    -- fault injection for tests (not configuration)
"""

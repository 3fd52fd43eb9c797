"""Reusable pieces of meta-training (``meta_train.py`` is the entry point).

One job per module:

* :mod:`config`    -- the config schema, presets, YAML/JSON loading, validation
* :mod:`tasks_pool` -- which task an inner run trains, graphs built once and cached
* :mod:`inner`     -- one inner training run and its K-step functional unroll
* :mod:`tbptt`     -- meta-gradient by truncated backprop through the unroll
* :mod:`es`        -- meta-gradient by antithetic evolution strategies (truncated)
* :mod:`pes`       -- meta-gradient by persistent evolution strategies (unbiased across truncations)
* :mod:`antithetic` -- noise, perturbation and gradient write-back shared by es and pes
* :mod:`schedule`  -- outer learning-rate schedule (warmup + cosine)
* :mod:`state`     -- checkpoint / resume of the whole outer training state
* :mod:`dist`      -- torchrun / DDP helpers (gloo on CPU, nccl on CUDA)
* :mod:`quick_eval` -- held-out quick evaluation (learned optimizer vs Adam)
"""

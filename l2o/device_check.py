"""Whether a device named on a command line can be used by this process.

``meta_train.py`` and ``python -m l2o.evaluate`` both take ``--device``; a
misspelt or absent device would otherwise surface as torch's RuntimeError or
AssertionError from deep inside the first run. Each caller raises the
problem as its own one-line user error.
"""
from __future__ import annotations

import torch


def device_problem(name) -> str | None:
    """Why ``name`` is not a device usable here (not a torch device, CUDA or
    MPS absent, a CUDA index beyond the GPUs), or None."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return f"device {str(name)!r} is not a torch device (expected cpu, cuda, cuda:N or mps)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"device {str(name)!r}: {build} (torch {torch.__version__}); use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"device {str(name)!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return f"device {str(name)!r}: MPS is not available here; use --device cpu"
    return None

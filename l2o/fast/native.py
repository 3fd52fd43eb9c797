"""Builds and loads the fused C kernels of the chunked step (``kernels.c``).

The kernels are plain C called through :mod:`ctypes` on tensors' data
pointers: no torch headers, so a build takes about a second with the system C
compiler (``$CC``, else ``cc``), once per metanetwork size, cached under
``$L2O_CACHE`` (default ``~/.cache/l2o``). Without a compiler, on a failed
build, or with ``L2O_NATIVE=0`` the step uses the torch implementation of the
same passes; :func:`status` says which and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("kernels.c")
Sizes = tuple[int, int, int, int]  # (features, GMN edge width, GMN read-out width, MLP width); 0: not built in
_loaded: dict[Sizes, ctypes.CDLL | None] = {}
_why_not: dict[Sizes, str] = {}

_f, _l, _i = ctypes.c_float, ctypes.c_long, ctypes.c_int
_p = ctypes.c_void_p
_SIGNATURES = {
    "l2o_stats": [_l, _p, _p, _p, _l, _p, _p, _l, _p, _f, _f, _f, _f, _i, _p, _i],
    "l2o_gmn_round": [_p, _p, _p, _l, _l, _p, _p, _p, _p, _l, _p, _p, _l, _l, _l, _i],
    "l2o_gmn_readout": [_p, _p, _l, _p, _p, _p, _p, _f, _f, _f, _f, _p, _l, _l, _l, _i],
    "l2o_mlp_step": [_l, _p, _l, _p, _p, _p, _p, _p, _f, _f, _f, _f, _p, _i],
}


def address(t, *index: int) -> int:
    """Address of ``t[index]`` (the kernels index from it with the strides
    they are given)."""
    return t.data_ptr() + t.element_size() * sum(i * s for i, s in zip(index, t.stride()))


def check(status: int) -> None:
    """The kernels return nonzero only when their scratch allocation failed."""
    if status != 0:
        raise MemoryError("l2o fused kernel: out of memory for its scratch buffers")


def enabled() -> bool:
    return os.environ.get("L2O_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    return Path(os.environ.get("L2O_CACHE") or Path.home() / ".cache" / "l2o") / "native"


def _cpu_key() -> str:
    """What the -march=native code depends on (a shared home directory may
    serve several kinds of machine)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{platform.system()}|{flags}"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compile(out: Path, sizes: Sizes) -> str | None:
    """Builds the library at ``out``; returns an error message or None."""
    cc = compiler()
    if not cc:
        return "no C compiler found (set CC)"
    defines = [f"-D{name}={value}" for name, value in zip(("NF", "DE", "HID", "MH"), sizes) if value]
    # no -ffast-math: it would let the compiler reassociate the unrolled
    # products (slower here) and, linked, set flush-to-zero for the process
    base = ["-O3", "-fPIC", "-fno-math-errno", *defines]
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        for arch in (["-march=native"], []):
            cmd = [cc, "-c", *base, *arch, str(_SOURCE), "-o", str(obj)]
            link = [cc, "-shared", str(obj), "-o", str(lib), "-pthread", "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if done.returncode == 0:
                    done = subprocess.run(link, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                continue
            if done.returncode == 0:
                os.replace(lib, out)  # atomic: a concurrent process never loads half a file
                return None
            lines = done.stderr.strip().splitlines()
            errors.append(next((line for line in lines if "error" in line), lines[-1] if lines else "no output"))
    return f"building {_SOURCE.name} with {cc} failed: {errors[-1]}"


def load(num_features: int, edge_dim: int = 0, hidden: int = 0, mlp_hidden: int = 0) -> ctypes.CDLL | None:
    """The kernel library for these widths (``edge_dim``/``hidden`` for the
    GMN's passes, ``mlp_hidden`` for the per-parameter MLP's, the statistics
    pass always), building it on first use; None when disabled or unavailable
    (see :func:`status`)."""
    sizes: Sizes = (int(num_features), int(edge_dim), int(hidden) if edge_dim else 0, int(mlp_hidden))
    if not enabled():
        return None
    if sizes in _loaded:
        return _loaded[sizes]
    lib = None
    try:
        key = hashlib.sha256(_SOURCE.read_bytes() + repr((sizes, _cpu_key(), sys.platform)).encode()).hexdigest()[:16]
        path = _cache_dir() / f"l2o_kernels_{'_'.join(map(str, sizes))}_{key}.so"
        error = None
        if not path.exists():
            _log.info("building the fused step kernels for widths %s into %s (once; a few seconds)", sizes, path)
            error = _compile(path, sizes)
        if error is None:
            lib = ctypes.CDLL(str(path))
            built = (ctypes.c_long * 4)()
            lib.l2o_sizes(built)
            if tuple(built) != sizes:
                lib, error = None, f"{path} was built for widths {tuple(built)}, not {sizes}"
            else:
                for name, argtypes in _SIGNATURES.items():
                    if hasattr(lib, name):
                        getattr(lib, name).argtypes = argtypes
                        getattr(lib, name).restype = ctypes.c_int
        if error is not None:
            _why_not[sizes] = error
    except OSError as exc:
        lib, _why_not[sizes] = None, f"loading the kernel library failed: {exc}"
    _loaded[sizes] = lib
    return lib


def forget() -> None:
    """Drop the loaded libraries and remembered failures (the next
    :func:`load` looks again, e.g. after ``$CC`` or ``$L2O_CACHE`` changed)."""
    _loaded.clear()
    _why_not.clear()


def status(num_features: int = 8, edge_dim: int = 8, hidden: int = 16, mlp_hidden: int = 0) -> str:
    """One line: whether the fused kernels for these widths are in use, and
    why not when they are not."""
    if not enabled():
        return "fused C kernels disabled (L2O_NATIVE=0): the chunked step uses torch ops"
    if load(num_features, edge_dim, hidden, mlp_hidden) is not None:
        return "fused C kernels in use"
    sizes = (num_features, edge_dim, hidden if edge_dim else 0, mlp_hidden)
    return f"fused C kernels unavailable ({_why_not.get(sizes)}): torch ops instead"

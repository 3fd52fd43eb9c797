"""Builds and loads the fused C kernels of the chunked step (``gmn_kernel.c``).

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
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_SOURCE = Path(__file__).with_name("gmn_kernel.c")
_loaded: dict[tuple[int, int, int], ctypes.CDLL | None] = {}
_why_not: dict[tuple[int, int, int], str] = {}

_f, _l, _i = ctypes.c_float, ctypes.c_long, ctypes.c_int
_p = ctypes.c_void_p
_SIGNATURES = {
    "l2o_gmn_round": [_p, _p, _p, _l, _l, _p, _p, _p, _p, _l, _p, _p, _l, _l, _l, _i],
    "l2o_gmn_readout": [_p, _p, _l, _p, _p, _p, _p, _f, _f, _f, _f, _l, _p, _l, _l, _l, _i],
}


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


def _compile(out: Path, sizes: tuple[int, int, int]) -> str | None:
    """Builds the library at ``out``; returns an error message or None."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return "no C compiler found (set CC)"
    de, nf, hid = sizes
    defines = [f"-DDE={de}", f"-DNF={nf}", f"-DHID={hid}"]
    # -ffast-math lets the compiler vectorise expf (libmvec); it is passed to
    # the compile step only, because linking with it would install a
    # flush-to-zero start-up hook into the whole process.
    base = ["-O3", "-fPIC", *defines]
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
            errors.append(done.stderr.strip()[-500:])
    return f"building {_SOURCE.name} with {cc} failed: {errors[-1]}"


def load(edge_dim: int, num_features: int, hidden: int) -> ctypes.CDLL | None:
    """The kernel library for these widths, building it on first use; None
    when disabled or unavailable (see :func:`status`)."""
    sizes = (int(edge_dim), int(num_features), int(hidden))
    if not enabled():
        return None
    if sizes in _loaded:
        return _loaded[sizes]
    lib = None
    try:
        key = hashlib.sha256(_SOURCE.read_bytes() + repr((sizes, _cpu_key(), sys.platform)).encode()).hexdigest()[:16]
        path = _cache_dir() / f"gmn_{sizes[0]}_{sizes[1]}_{sizes[2]}_{key}.so"
        error = None if path.exists() else _compile(path, sizes)
        if error is None:
            lib = ctypes.CDLL(str(path))
            for name, argtypes in _SIGNATURES.items():
                getattr(lib, name).argtypes = argtypes
                getattr(lib, name).restype = ctypes.c_int
            built = (ctypes.c_long * 3)()
            lib.l2o_gmn_sizes(built)
            if tuple(built) != sizes:
                lib, error = None, f"{path} was built for sizes {tuple(built)}, not {sizes}"
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


def status(edge_dim: int = 8, num_features: int = 8, hidden: int = 16) -> str:
    """One line: whether the fused kernels for these widths are in use, and
    why not when they are not."""
    if not enabled():
        return "fused C kernels disabled (L2O_NATIVE=0): the chunked step uses torch ops"
    if load(edge_dim, num_features, hidden) is not None:
        return "fused C kernels in use"
    return f"fused C kernels unavailable ({_why_not.get((edge_dim, num_features, hidden))}): torch ops instead"

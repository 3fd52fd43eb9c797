"""Builds and loads the fused C kernels of the chunked step (``kernels.c``).

The kernels are plain C called through :mod:`ctypes` on tensors' data
pointers (only through the checked wrappers of :mod:`.kernel_calls`): no
torch headers, so a build takes a few seconds with the system C compiler
(``$CC``, else ``cc``), once per metanetwork size, cached under
``$L2O_CACHE`` (default ``~/.cache/l2o``). The feature layout is passed to
the compiler from :mod:`l2o.features` (:func:`layout_defines`) and checked
again when a library is loaded. Without a compiler, on a failed build, or
with ``L2O_NATIVE=0`` (the documented override: the ``"auto"`` backend then
never picks ``"fused"``) the step uses the torch implementation of the same
passes; :func:`status` says which and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .. import features as F_

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("kernels.c")
Sizes = tuple[int, int, int, int]  # (features, GMN edge width, GMN read-out width, MLP width); 0: not built in
_loaded: dict[Sizes, ctypes.CDLL | None] = {}
_why_not: dict[Sizes, str] = {}

_f, _l, _i = ctypes.c_float, ctypes.c_long, ctypes.c_int
_p = ctypes.c_void_p
_SIGNATURES = {
    "l2o_stats": [_l, _p, _p, _p, _l, _p, _p, _f, _f, _f, _f, _f, _i, _i, _p, _l, _p, _i, _p, _i],
    "l2o_gmn_pass": [_l, _l, _l, _p, _p, _p, _l, _p, _p, _f, _f, _f, _f, _f, _i, _i, _p, _p, _l, _l, _i, _i, _p, _p, _p,
                     _p, _i, _p, _p, _p, _p, _p, _p, _f, _f, _f, _f, _p, _p, _f, _f, _p, _i],
    "l2o_mlp_step": [_l, _p, _l, _p, _p, _p, _p, _p, _f, _f, _f, _f, _p, _p, _f, _f, _p, _i],
    "l2o_finish": [_l, _p, _p, _p, _f, _f, _p],
    "l2o_half_states": [],
}
_LAYOUT_NAMES = ("NF", "NM", "ROW_P", "ROW_G", "ROW_M0", "ROW_ADAM", "ROW_SQRT_V")


def layout_defines() -> dict[str, int]:
    """The feature layout of :mod:`l2o.features`, as the kernels' -D defines."""
    return {"NF": F_.NUM_ENTRY_FEATURES, "NM": len(F_.MOMENTUM_BETAS), "ROW_P": F_.ROW_P, "ROW_G": F_.ROW_G,
            "ROW_M0": F_.ROW_M0, "ROW_ADAM": F_.ROW_ADAM, "ROW_SQRT_V": F_.ROW_SQRT_V}


def compiler() -> str | None:
    """The C compiler command (``$CC`` may carry a wrapper, e.g. ``ccache gcc``)."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def enabled() -> bool:
    return os.environ.get("L2O_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _private_temp_dir() -> Path:
    """``$TMPDIR/l2o-<uid>``, refused unless it is this user's and writable by
    no one else: a library found there gets loaded into the process."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = Path(tempfile.gettempdir()) / f"l2o-{uid if uid is not None else 'user'}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or (uid is not None and st.st_uid != uid) or st.st_mode & 0o022:
        raise RuntimeError(f"{path} is not a private directory of this user; set L2O_CACHE")
    return path


def _cache_dir() -> Path:
    """``$L2O_CACHE/native``, else ``~/.cache/l2o/native``, else (no home
    directory, or a read-only one) a private temporary directory."""
    if os.environ.get("L2O_CACHE"):
        path = Path(os.environ["L2O_CACHE"]) / "native"
        path.mkdir(parents=True, exist_ok=True)
        return path
    try:
        path = Path.home() / ".cache" / "l2o" / "native"
        path.mkdir(parents=True, exist_ok=True)
        return path
    except (RuntimeError, OSError):  # containers under an arbitrary uid, read-only homes
        path = _private_temp_dir() / "native"
        path.mkdir(exist_ok=True)
        return path


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _machine_key(cc: str) -> str:
    """What a build depends on besides the source and the widths: the
    compiler and the CPU that -march=native targets (a home directory may be
    shared by several kinds of machine)."""
    parts = [cc, platform.machine(), platform.system(), platform.processor()]
    try:
        parts.append(_run([*shlex.split(cc), "--version"], 30).stdout.splitlines()[0])
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    flags = _cpu_flags()
    if flags:
        parts.append(flags)
    elif sys.platform == "darwin":
        try:
            parts.append(_run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features"], 30).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    return "|".join(parts)


def _cpu_flags() -> str:
    """The CPU's feature line from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _variants(sizes: Sizes) -> list[list[str]]:
    """Flag sets to try for a library of these widths, best first. On AVX-512
    CPUs the kernels take 16-lane vectors: one per tile for the GMN's passes,
    two for the per-parameter MLP's (its step 0.6-0.75x the 8-lane build's
    time on this project's Xeon; one vector per tile is slower for the MLP
    and two slower for the GMN: bench/kernel_widths.py). The portable
    fallback uses 4-lane vectors: 8-lane ones split into SSE pairs make the
    unrolled code (and its build time) several times larger."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return [["-mcpu=native"], ["-DVB=4"]]
    tile = "-DT=1" if sizes[1] > 0 else "-DT=2"
    wide = [["-march=native", "-DVB=16", tile]] if "avx512f" in _cpu_flags().split() else []
    return [*wide, ["-march=native"], ["-DVB=4"]]


class _DlInfo(ctypes.Structure):   # dladdr's answer (<dlfcn.h>)
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def torch_openmp_runtime() -> Path | None:
    """The OpenMP runtime torch's intra-op threads run on (GNU ``libgomp``,
    Intel ``libiomp5`` or LLVM ``libomp``; each implements the ``GOMP_*``
    calls gcc emits): the file that ``omp_get_max_threads`` resolves to when
    looked up from torch's own ``libtorch_cpu``, so it is the runtime torch
    uses even where another library loaded a second one. None where there is
    none (torch built without OpenMP) or off Linux (not looked up there). The
    kernels link this very file, so their parallel loops reuse torch's pool
    instead of starting threads beside it."""
    if not sys.platform.startswith("linux"):
        return None
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        entry = ctypes.CDLL(str(torch_cpu)).omp_get_max_threads   # dlsym searches torch's own dependencies
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return None
    dladdr.argtypes, info = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)], _DlInfo()
    if not dladdr(ctypes.cast(entry, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    runtime = Path(os.fsdecode(info.dli_fname))
    return runtime if runtime.name.startswith(("libgomp", "libiomp5", "libomp")) else None


def _threading() -> list[tuple[list[str], list[str]]]:
    """(compile flags, link arguments) to try, best first: torch's OpenMP
    pool (:func:`torch_openmp_runtime`), then threads of the kernels' own."""
    own = ([], ["-pthread"])
    runtime = torch_openmp_runtime()
    if runtime is None:
        return [own]
    # -z defs: a runtime that lacks a call gcc emits fails the link (then: own threads), not the first step
    return [(["-fopenmp", "-DL2O_OPENMP"], [str(runtime), f"-Wl,-rpath,{runtime.parent}", "-Wl,-z,defs"]), own]


def _compile(cc: str, out: Path, sizes: Sizes) -> tuple[str, bool] | None:
    """Builds the library at ``out``; on failure returns the error message and
    whether the compiler itself rejected the source (worth remembering, unlike
    a timeout or a missing executable)."""
    widths = {name: value for name, value in zip(("NF", "DE", "HID", "MH"), sizes) if value}
    defines = [f"-D{name}={value}" for name, value in {**layout_defines(), **widths}.items()]
    # no -ffast-math: it would let the compiler reassociate the unrolled
    # products (slower here) and, linked, set flush-to-zero for the process
    base = ["-O3", "-fPIC", "-fno-math-errno", *defines]
    errors, rejected = [], True
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        for flags, (thread_flags, thread_libs) in itertools.product(_variants(sizes), _threading()):
            try:
                done = _run([*shlex.split(cc), "-c", *base, *flags, *thread_flags, str(_SOURCE), "-o", str(obj)])
                if done.returncode == 0:
                    done = _run([*shlex.split(cc), "-shared", str(obj), "-o", str(lib), *thread_libs, "-lm"])
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                rejected = False
                continue
            if done.returncode == 0:
                os.replace(lib, out)  # atomic: a concurrent process never loads half a file
                return None
            lines = done.stderr.strip().splitlines()
            diagnostic = next((line for line in lines if "error" in line), None)
            rejected = rejected and diagnostic is not None  # not e.g. a full disk or a killed compiler
            errors.append(diagnostic or (lines[-1] if lines else f"exit status {done.returncode}"))
    return f"building {_SOURCE.name} with {cc} failed: {errors[-1]}", rejected


def _open(path: Path, sizes: Sizes) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    built = (ctypes.c_long * 4)()
    lib.l2o_sizes(built)
    if tuple(built) != sizes:
        raise OSError(f"{path} was built for widths {tuple(built)}, not {sizes}")
    layout = (ctypes.c_long * len(_LAYOUT_NAMES))()
    lib.l2o_layout(layout)
    if dict(zip(_LAYOUT_NAMES, layout)) != layout_defines():
        raise OSError(f"{path} was built for the feature layout {dict(zip(_LAYOUT_NAMES, layout))}, "
                      f"not l2o.features' {layout_defines()}")
    for name, argtypes in _SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int
    lib.l2o_apply.argtypes = [_l, _p, _p, _f, _f]
    lib.l2o_apply.restype = ctypes.c_long
    return lib


def _build_and_open(sizes: Sizes) -> ctypes.CDLL:
    """Raises RuntimeError with the reason when the kernels cannot be had."""
    cc = compiler()
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    machine = _machine_key(cc)
    built_from = repr((sizes, layout_defines(), machine, _variants(sizes), _threading())).encode()
    key = hashlib.sha256(_SOURCE.read_bytes() + built_from).hexdigest()[:16]
    path = _cache_dir() / f"l2o_kernels_{'_'.join(map(str, sizes))}_{key}.so"
    failed = path.with_suffix(".failed")
    if failed.exists():  # this compiler could not build this source: do not retry in every process
        raise RuntimeError(failed.read_text().strip() + f" (remembered in {failed}; delete it to retry)")
    if path.exists():
        try:
            return _open(path, sizes)
        except (OSError, AttributeError) as exc:  # a damaged or foreign cache entry: build it again once
            _log.warning("l2o: cached kernel library %s is unusable (%s); rebuilding it", path, exc)
            path.unlink(missing_ok=True)
    _log.info("building the fused step kernels for widths %s into %s (once; a few seconds)", sizes, path)
    failure = _compile(cc, path, sizes)
    if failure is not None:
        error, rejected = failure
        if rejected:
            try:
                failed.write_text(error + "\n")
            except OSError:
                pass
        raise RuntimeError(error)
    try:
        return _open(path, sizes)
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"loading the kernel library {path} failed: {exc}") from exc


def load(num_features: int, edge_dim: int = 0, hidden: int = 0, mlp_hidden: int = 0) -> ctypes.CDLL | None:
    """The kernel library for these widths (``edge_dim``/``hidden`` for the
    GMN's passes, ``mlp_hidden`` for the per-parameter MLP's, the statistics
    pass always), building it on first use; None when disabled or unavailable
    (see :func:`status`). Never raises: the step falls back to torch ops."""
    sizes: Sizes = (int(num_features), int(edge_dim), int(hidden) if edge_dim else 0, int(mlp_hidden))
    if not enabled():
        return None
    if sizes[0] != F_.NUM_ENTRY_FEATURES:
        _loaded[sizes], _why_not[sizes] = None, f"{num_features} features, l2o.features has {F_.NUM_ENTRY_FEATURES}"
    if sizes not in _loaded:
        try:
            _loaded[sizes] = _build_and_open(sizes)
        except Exception as exc:  # noqa: BLE001 -- any failure here means "use torch ops"
            _loaded[sizes], _why_not[sizes] = None, str(exc) if isinstance(exc, RuntimeError) else repr(exc)
    return _loaded[sizes]


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

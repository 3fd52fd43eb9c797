"""The checked boundary to the fused C kernels (``kernels.c``, built by :mod:`.native`).

ctypes passes raw pointers: a tensor of the wrong dtype, length or stride
would be read out of bounds, silently. So the chunked step never calls the
library itself; it calls the methods of :class:`FusedKernels`, which check
every tensor's dtype, device, shape and strides against the library's
widths before the call, and raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import ctypes
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .. import features as F_
from . import native

_F32 = torch.float32
MAX_ROUNDS = 16   # kernels.c's MAX_LAYERS: a GMN with more rounds takes the torch ops


def _require(ok: bool, kernel: str, what: str) -> None:
    if not ok:
        raise ValueError(f"l2o fused kernel {kernel}: {what}")


def _rows(kernel: str, name: str, t: Tensor, rows: int, min_len: int, dtype: torch.dtype = _F32) -> None:
    """``t`` is a CPU ``[rows, >= min_len]`` table of ``dtype`` with unit stride along its rows."""
    if (t.dtype is not dtype or not t.is_cpu or t.dim() != 2 or t.shape[0] != rows or t.shape[1] < min_len
            or (t.stride(1) != 1 and t.shape[1] > 1)):   # the message is built only on failure: checks are per call
        raise ValueError(f"l2o fused kernel {kernel}: {name} must be a CPU {dtype} [{rows}, >= {min_len}] table "
                         f"with unit column stride, got {t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


def _dense(kernel: str, name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype = _F32) -> None:
    """``t`` is a contiguous CPU tensor of exactly ``shape``."""
    if t.dtype is not dtype or not t.is_cpu or t.shape != shape or not t.is_contiguous():
        raise ValueError(f"l2o fused kernel {kernel}: {name} must be a contiguous CPU {dtype} tensor of shape "
                         f"{shape}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _done(status: int) -> None:
    """The kernels return -1 when their scratch allocation failed (-2: arguments the checks here let through)."""
    if status == -1:
        raise MemoryError("l2o fused kernel: out of memory for its scratch buffers")
    if status != 0:
        raise RuntimeError(f"l2o fused kernel: refused its arguments (status {status})")


def _update_target(k: str, update: Tensor, apply: tuple[Tensor, float, float] | None, n: int,
                   nonfinite: ctypes.c_long) -> tuple:
    """A read-out kernel's ``update, apply_p, lr, decay, nonfinite``
    arguments: its update written to ``update``, or, given ``apply = (p, lr,
    decay)``, applied to ``p`` (the count of dropped entries into ``nonfinite``)."""
    if apply is None:
        return update.data_ptr(), None, 0.0, 0.0, None
    p, lr, decay = apply
    _dense(k, "apply p", p, (n,))
    return None, p.data_ptr(), float(lr), float(decay), ctypes.addressof(nonfinite)


class RunState(NamedTuple):
    """The statistics of a run of ``n`` entries before the step: ``p``,
    ``g`` (None: zero) ``[n]``, momenta ``m`` ``[NM, n]``, ``v`` ``[n]``,
    the momentum ``betas`` and the step's bias corrections; ``write_back``:
    the kernel stores the advanced ``m``, ``v``."""
    p: Tensor
    g: Tensor | None
    m: Tensor
    v: Tensor
    betas: Tensor
    adam_scale: float
    adam_eps: float
    write_back: bool


class FusedKernels:
    """The kernels of one library (widths ``nf``, GMN ``de``/``hid``, MLP ``mh``; 0: not built in)."""

    def __init__(self, lib: ctypes.CDLL, sizes: tuple[int, int, int, int]):
        self.lib = lib
        self.nf, self.de, self.hid, self.mh = sizes
        self.nm = len(F_.MOMENTUM_BETAS)
        self.half_states = bool(lib.l2o_half_states())   # gmn_pass can keep float16 edge states

    def __reduce__(self):  # pickles / deep-copies as a reference to the (cached) library of these widths
        return (_reload, ((self.nf, self.de, self.hid, self.mh),))

    def _state_args(self, k: str, st: RunState) -> tuple:
        """The checked statistics arguments of a kernel over ``n = p.numel()``
        entries: ``m`` ``[NM, n]`` and ``v`` ``[n]`` read (and advanced in
        place with ``write_back``); ``g`` None reads as a zero gradient."""
        p, g, m, v, n = st.p, st.g, st.m, st.v, st.p.numel()
        _dense(k, "p", p, (n,))
        if g is not None:
            _dense(k, "g", g, (n,))
        _rows(k, "m", m, self.nm, n)
        if m.shape[1] != n:
            _require(False, k, f"m covers {m.shape[1]} entries, p {n}")
        _dense(k, "v", v, (n,))
        _dense(k, "betas", st.betas, (self.nm,))
        return (p.data_ptr(), None if g is None else g.data_ptr(), m.data_ptr(), m.stride(0), v.data_ptr(),
                st.betas.data_ptr(), F_.SECOND_MOMENT_BETA, 1.0 - F_.SECOND_MOMENT_BETA, F_.SQRT_EPS, st.adam_scale,
                st.adam_eps, F_.ADAM_BETA1_INDEX, int(st.write_back))

    def stats(self, p: Tensor, g: Tensor | None, m: Tensor, v: Tensor, x: Tensor | None, betas: Tensor,
              adam_scale: float, adam_eps: float, write_back: bool, sums: Tensor,
              controller: tuple[int, Tensor] | None = None) -> None:
        """The statistics pass over ``n`` entries (:meth:`_state_args`): the
        features into ``x`` ``[NF, >= n]`` (None: not stored), each row's sum
        of squares into ``sums`` (float64 ``[NF]``); ``controller = (a,
        out)``: the step-size controller's ``<g, m_a>``, ``<m_a, m_a>`` and
        ``sum(v)`` over the state before the step into ``out`` (float64 ``[3]``)."""
        k, n = "l2o_stats", p.numel()
        args = self._state_args(k, RunState(p, g, m, v, betas, adam_scale, adam_eps, write_back))
        if x is not None:
            _rows(k, "x", x, self.nf, n)
        _dense(k, "sums", sums, (self.nf,), torch.float64)
        ctl_m, ctl = (-1, None) if controller is None else controller
        if ctl is not None:
            _require(0 <= ctl_m < self.nm, k, f"controller momentum {ctl_m} of {self.nm}")
            _dense(k, "controller sums", ctl, (3,), torch.float64)
        _done(self.lib.l2o_stats(n, *args, None if x is None else x.data_ptr(), 0 if x is None else x.stride(0),
                                 sums.data_ptr(), ctl_m, None if ctl is None else ctl.data_ptr(),
                                 torch.get_num_threads()))

    def gmn_pass(self, st: RunState, rows: int, cols: int, per_group: int, encode: tuple[Tensor, Tensor, int, int],
                 layers: list[tuple[Tensor, Tensor, Tensor] | None], first: int, kept: Tensor | None,
                 sums: tuple[Tensor, Tensor] | None = None, readout: tuple | None = None,
                 apply: tuple[Tensor, float, float] | None = None) -> int:
        """One pass of the GMN's step over a dense block of ``rows x cols``
        edges whose statistics are ``st`` (``kernels.c``: ``l2o_gmn_pass``):
        ``layers`` the ``(w_msg [DE, DE], row table, column table)`` of the
        rounds to run (None before ``first``), from ``first`` (the states
        after ``first`` rounds read from ``kept``: ``DE * n`` contiguous
        entries in the kernels' own order (``kernels.c``:
        ``load_kept_em``, ``kept_at``), float32, or float16 where :attr:`half_states`, written
        saturated to +-65504; 0:
        ``encode`` = ``(w_enc [DE, NF],
        static table, its feature stride, its row stride)``). Then either
        ``sums`` = ``(row_sum, col_sum)``: the last round's messages added
        onto them (and the states written to ``kept``), or ``readout`` =
        ``(w_z [HID, DE + NF], row table, column table, head_w [2, HID],
        head_b, nominal, max_log_step, update [n])``: the update written to
        ``update``, or, given ``apply = (p [n], lr, decay)``, applied there at
        once (``p <- p decay + lr u``, an entry whose ``lr u`` is not finite
        left at ``p decay``; ``update`` is then not written, and may be None). Returns how many
        entries' ``lr u`` was not finite (0 unless ``apply``)."""
        k, de, n, stop = "l2o_gmn_pass", self.de, rows * cols, len(layers)
        if not (de > 0 and rows > 0 and cols > 0 and per_group > 0 and rows % per_group == 0):
            _require(False, k, f"bad sizes rows={rows} cols={cols} per_group={per_group} (edge width {de})")
        _require((sums is None) != (readout is None), k, "exactly one of sums and readout")
        _require(apply is None or readout is not None, k, "apply without a read-out")
        _require(0 <= first <= stop <= MAX_ROUNDS and (first == 0 or kept is not None) and (readout is not None or stop > first),
                 k, f"bad rounds [{first}, {stop}) (kept states: {kept is not None})")
        if st.p.numel() != n:
            _require(False, k, f"p has {st.p.numel()} entries, the block {n}")
        args = self._state_args(k, st)
        n_cols = (rows // per_group) * cols
        for l, tables in enumerate(layers):
            if l < first:   # read from kept states: None
                continue
            for name, t, shape in zip(("w_msg", "row_t", "col_t"), tables, ((de, de), (de, rows), (de, n_cols))):
                _dense(k, f"{name}[{l}]", t, shape)
        if kept is not None:
            if kept.dtype is not _F32 and not (kept.dtype is torch.float16 and self.half_states):
                _require(False, k, f"kept states must be float32 or, where the build has half floats "
                                   f"(this one: {self.half_states}), float16, got {kept.dtype}")
            _dense(k, "kept", kept, (de * n,), kept.dtype)   # flat: the kernels' own order
        w_enc, table, stat_ld, stat_rs = encode
        _dense(k, "w_enc", w_enc, (de, self.nf))
        _require(table.dtype == _F32 and table.is_contiguous() and
                 table.numel() >= (de - 1) * stat_ld + (rows - 1) * stat_rs + cols, k, "static table too small")
        ptrs = [(ctypes.c_void_p * max(stop, 1))(*(None if tables is None else tables[i].data_ptr()
                                                   for tables in layers)) for i in range(3)]
        acc = (None, None)
        out: tuple = (None, None, None, None, 0.0, 0.0, 0.0, 0.0, None, None, 0.0, 0.0, None)
        nonfinite = ctypes.c_long(0)
        if sums is not None:
            for name, t, shape in (("row_sum", sums[0], (de, rows)), ("col_sum", sums[1], (de, n_cols))):
                _dense(k, name, t, shape)
            acc = (sums[0].data_ptr(), sums[1].data_ptr())
        else:
            w_z, z_row, z_col, head_w, head_b, nominal, max_log_step, update = readout
            for name, t, shape in (("w_z", w_z, (self.hid, de + self.nf)), ("z_row", z_row, (self.hid, rows)),
                                   ("z_col", z_col, (self.hid, n_cols)), ("head_w", head_w, (2, self.hid)),
                                   ("update", update, (n,))):
                if name != "update" or apply is None:
                    _dense(k, name, t, shape)
            out = (w_z.data_ptr(), z_row.data_ptr(), z_col.data_ptr(), head_w.data_ptr(), float(head_b[0, 0]),
                   float(head_b[1, 0]), float(nominal), float(max_log_step),
                   *_update_target(k, update, apply, n, nonfinite))
        _done(self.lib.l2o_gmn_pass(rows, cols, per_group, *args, w_enc.data_ptr(), table.data_ptr(), stat_ld, stat_rs,
                                    first, stop, *ptrs, None if kept is None else kept.data_ptr(),
                                    int(kept is not None and kept.dtype is torch.float16), *acc, *out,
                                    torch.get_num_threads()))
        return nonfinite.value

    def mlp_network(self, w_in: Tensor, b_in: Tensor, w_mid: Tensor, b_mid: Tensor, head_w: Tensor,
                    head_b: Tensor, nominal: float, max_log_step: float) -> Callable[..., int]:
        """The per-parameter MLP and update formula with these weights
        (``w_in`` ``[T, MH, NF]``: one first layer per tensor), checked once:
        returns ``run(x, k, update, apply=None)`` for ``n`` entries of tensor
        ``k`` with features ``x`` ``[NF, >= n]`` (checked per call), which
        writes ``update`` or, given ``apply = (p [n], lr, decay)``, applies it
        there as :meth:`gmn_pass` does, and returns how many entries' ``lr u``
        was not finite (0 unless ``apply``)."""
        k, mh = "l2o_mlp_step", self.mh
        _require(mh > 0, k, "library built without the MLP kernel")
        _dense(k, "w_in", w_in, (w_in.shape[0], mh, self.nf))
        for name, t, shape in (("b_in", b_in, (mh,)), ("w_mid", w_mid, (mh, mh)), ("b_mid", b_mid, (mh,)),
                               ("head_w", head_w, (2, mh))):
            _dense(k, name, t, shape)
        lib, nf, tensors = self.lib, self.nf, w_in.shape[0]
        w0, w_step = w_in.data_ptr(), w_in.stride(0) * w_in.element_size()
        fixed = (b_in.data_ptr(), w_mid.data_ptr(), b_mid.data_ptr(), head_w.data_ptr(), float(head_b[0, 0]),
                 float(head_b[1, 0]), nominal, max_log_step)
        keep = (w_in, b_in, w_mid, b_mid, head_w)   # alive while run is

        def run(x: Tensor, tensor: int, update: Tensor, apply: tuple[Tensor, float, float] | None = None) -> int:
            n = update.numel()
            _rows(k, "x", x, nf, n)
            _dense(k, "update", update, (n,))
            if not 0 <= tensor < tensors:
                _require(False, k, f"tensor {tensor} out of range [0, {tensors})")
            nonfinite = ctypes.c_long(0)
            _done(lib.l2o_mlp_step(n, x.data_ptr(), x.stride(0), w0 + tensor * w_step, *fixed,
                                   *_update_target(k, update, apply, n, nonfinite), torch.get_num_threads()))
            return nonfinite.value
        run.weights = keep
        return run

    def apply(self, p: Tensor, u: Tensor, lr: float, decay: float) -> int:
        """``p = p * decay + lr * u`` in place, non-finite ``u`` set to 0; returns how many there were."""
        n = p.numel()
        _dense("l2o_apply", "p", p, (n,))
        _dense("l2o_apply", "u", u, (n,))
        return self.lib.l2o_apply(n, p.data_ptr(), u.data_ptr(), lr, decay)

    def finish(self, direction: Tensor, log_step: Tensor, adam: Tensor, nominal: float, max_log_step: float,
               out: Tensor) -> Tensor:
        """The C update formula alone (for tests: :func:`l2o.update_rule.finish_folded_`)."""
        n = out.numel()
        for name, t in (("direction", direction), ("log_step", log_step), ("adam", adam), ("out", out)):
            _dense("l2o_finish", name, t, (n,))
        _done(self.lib.l2o_finish(n, direction.data_ptr(), log_step.data_ptr(), adam.data_ptr(), nominal,
                                  max_log_step, out.data_ptr()))
        return out


def load(nf: int, de: int = 0, hid: int = 0, mh: int = 0) -> FusedKernels | None:
    """The checked kernels of these widths (:func:`l2o.fast.native.load`), or None where they are unavailable."""
    lib = native.load(nf, de, hid, mh)
    return FusedKernels(lib, (nf, de, hid if de else 0, mh)) if lib is not None else None


def _reload(sizes: tuple[int, int, int, int]) -> FusedKernels | None:
    return load(*sizes)

"""The checked boundary to the fused C kernels (``kernels.c``, built by :mod:`.native`).

ctypes passes raw pointers: a tensor of the wrong dtype, length or stride
would be read out of bounds, silently. So the chunked step never calls the
library itself; it calls the methods of :class:`FusedKernels`, which check
every tensor's dtype, device, shape and strides against the library's
widths before the call, and raise ``ValueError`` naming the argument.
"""
from __future__ import annotations

import ctypes
from typing import Callable

import torch
from torch import Tensor

from .. import features as F_
from . import native

_F32 = torch.float32


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
    """The kernels return nonzero only when their scratch allocation failed."""
    if status != 0:
        raise MemoryError("l2o fused kernel: out of memory for its scratch buffers")


class FusedKernels:
    """The kernels of one library (widths ``nf``, GMN ``de``/``hid``, MLP ``mh``; 0: not built in)."""

    def __init__(self, lib: ctypes.CDLL, sizes: tuple[int, int, int, int]):
        self.lib = lib
        self.nf, self.de, self.hid, self.mh = sizes
        self.nm = len(F_.MOMENTUM_BETAS)

    def __reduce__(self):  # pickles / deep-copies as a reference to the (cached) library of these widths
        return (_reload, ((self.nf, self.de, self.hid, self.mh),))

    def stats(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, x: Tensor, betas: Tensor, adam_scale: float,
              adam_eps: float, write_back: bool, sums: Tensor) -> None:
        """The statistics pass over ``n`` entries: ``m`` ``[NM, n]`` and ``v``
        ``[n]`` read (and advanced in place with ``write_back``), the features
        into ``x`` ``[NF, >= n]``, each row's sum of squares into ``sums``
        (float64 ``[NF]``)."""
        k, n = "l2o_stats", p.numel()
        _dense(k, "p", p, (n,))
        _dense(k, "g", g, (n,))
        _rows(k, "m", m, self.nm, n)
        if m.shape[1] != n:
            _require(False, k, f"m covers {m.shape[1]} entries, p {n}")
        _dense(k, "v", v, (n,))
        _rows(k, "x", x, self.nf, n)
        _dense(k, "betas", betas, (self.nm,))
        _dense(k, "sums", sums, (self.nf,), torch.float64)
        _done(self.lib.l2o_stats(n, p.data_ptr(), g.data_ptr(), m.data_ptr(), m.stride(0), v.data_ptr(),
                                 x.data_ptr(), x.stride(0), betas.data_ptr(), F_.SECOND_MOMENT_BETA,
                                 1.0 - F_.SECOND_MOMENT_BETA, F_.SQRT_EPS, adam_scale, adam_eps,
                                 F_.ADAM_BETA1_INDEX, int(write_back), sums.data_ptr(), torch.get_num_threads()))

    def gmn_round(self, frame: Tensor, encode: tuple[Tensor, Tensor, int, int] | None, w_msg: Tensor,
                  row_t: Tensor, col_t: Tensor, row_sum: Tensor, col_sum: Tensor, rows: int, cols: int,
                  per_group: int) -> None:
        """One message-passing round over a dense run of ``rows x cols``
        edges whose ``[e; x]`` block is ``frame`` ``[DE + NF, rows * cols]``;
        ``encode``: ``(w_enc [DE, NF], static table, its feature stride, its
        row stride)`` in the first round, else None."""
        k, de, length = "l2o_gmn_round", self.de, rows * cols
        if not (de > 0 and rows > 0 and cols > 0 and per_group > 0 and rows % per_group == 0):
            _require(False, k, f"bad sizes rows={rows} cols={cols} per_group={per_group} (edge width {de})")
        _rows(k, "frame", frame, de + self.nf, length)
        groups_cols = (rows // per_group) * cols
        for name, t, shape in (("w_msg", w_msg, (de, de)), ("row_t", row_t, (de, rows)),
                               ("col_t", col_t, (de, groups_cols)), ("row_sum", row_sum, (de, rows)),
                               ("col_sum", col_sum, (de, groups_cols))):
            _dense(k, name, t, shape)
        x = w = stat = None
        stat_ld = stat_rs = 0
        if encode is not None:
            w_enc, table, stat_ld, stat_rs = encode
            _dense(k, "w_enc", w_enc, (de, self.nf))
            _require(table.dtype == _F32 and table.is_contiguous() and
                     table.numel() >= (de - 1) * stat_ld + (rows - 1) * stat_rs + cols, k, "static table too small")
            x, w, stat = frame[de:].data_ptr(), w_enc.data_ptr(), table.data_ptr()
        _done(self.lib.l2o_gmn_round(x, w, stat, stat_ld, stat_rs, w_msg.data_ptr(), row_t.data_ptr(),
                                     col_t.data_ptr(), frame.data_ptr(), frame.stride(0), row_sum.data_ptr(),
                                     col_sum.data_ptr(), rows, cols, per_group, torch.get_num_threads()))

    def gmn_readout(self, frame: Tensor, w_z: Tensor, row_t: Tensor, col_t: Tensor, head_w: Tensor,
                    head_b: Tensor, nominal: float, max_log_step: float, update: Tensor, rows: int, cols: int,
                    per_group: int) -> None:
        """The read-out and update formula over a dense run (folded head, :mod:`l2o.update_rule`)."""
        k, hid, length = "l2o_gmn_readout", self.hid, rows * cols
        _require(hid > 0 and rows > 0 and cols > 0 and per_group > 0 and rows % per_group == 0, k, "bad sizes")
        _rows(k, "frame", frame, self.de + self.nf, length)
        for name, t, shape in (("w_z", w_z, (hid, self.de + self.nf)), ("row_t", row_t, (hid, rows)),
                               ("col_t", col_t, (hid, (rows // per_group) * cols)), ("head_w", head_w, (2, hid)),
                               ("update", update, (length,))):
            _dense(k, name, t, shape)
        _done(self.lib.l2o_gmn_readout(frame.data_ptr(), frame.stride(0), w_z.data_ptr(), row_t.data_ptr(),
                                       col_t.data_ptr(), head_w.data_ptr(), float(head_b[0, 0]),
                                       float(head_b[1, 0]), nominal, max_log_step, update.data_ptr(), rows, cols,
                                       per_group, torch.get_num_threads()))

    def mlp_network(self, w_in: Tensor, b_in: Tensor, w_mid: Tensor, b_mid: Tensor, head_w: Tensor,
                    head_b: Tensor, nominal: float, max_log_step: float) -> Callable[[Tensor, int, Tensor], None]:
        """The per-parameter MLP and update formula with these weights
        (``w_in`` ``[T, MH, NF]``: one first layer per tensor), checked once:
        returns ``run(x, k, update)`` for ``n`` entries of tensor ``k`` with
        features ``x`` ``[NF, >= n]`` (checked per call)."""
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

        def run(x: Tensor, tensor: int, update: Tensor) -> None:
            n = update.numel()
            _rows(k, "x", x, nf, n)
            _dense(k, "update", update, (n,))
            if not 0 <= tensor < tensors:
                _require(False, k, f"tensor {tensor} out of range [0, {tensors})")
            _done(lib.l2o_mlp_step(n, x.data_ptr(), x.stride(0), w0 + tensor * w_step, *fixed, update.data_ptr(),
                                   torch.get_num_threads()))
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

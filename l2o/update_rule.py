"""The learned optimizers' update formula, defined once, in its two forms.

A metanetwork emits, per entry, a direction ``d`` and a log-magnitude ``s``;
with ``a`` the bias-corrected Adam direction (:func:`l2o.features.adam_direction`)
the update is

.. math::
    \\Delta = -\\exp(\\hat s)\\,\\big(w_{nom}\\,a + \\alpha\\,d\\big), \\qquad
    \\hat s = c\\tanh(s / c)

(:func:`learned_update`, the differentiable form used in meta-training). The
no-grad step evaluates the same function in a *folded* form: the constants are
folded into the metanetwork's last layer (:func:`fold_head`: the direction row
times ``-alpha``, the log-magnitude row times ``2 / c``), so its outputs are
``d' = -alpha d`` and ``s' = 2 s / c``, and since
``c tanh(s / c) = 2c sigmoid(2s / c) - c`` (sigmoid is several times cheaper
than tanh on CPU)

.. math::
    \\Delta = \\big(d' - w_{nom}\\,a\\big)\\,\\exp\\big(2c\\,\\sigma(s') - c\\big)

(:func:`finish_folded_`). The C kernels (``l2o/fast/kernels.c``, ``finish``)
compute this folded form; ``tests/test_step_math.py`` checks the three against
each other on random inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def learned_update(direction: Tensor, log_step: Tensor, adam: Tensor, out_scale: float,
                   nominal_weight: Tensor | float | None, max_log_step: float) -> Tensor:
    """``-exp(c tanh(s / c)) (w_nom a + alpha d)`` (``nominal_weight`` None: no nominal term)."""
    log_step = max_log_step * (log_step / max_log_step).tanh()
    step = out_scale * direction
    if nominal_weight is not None:
        step = step + nominal_weight * adam
    return -(step * log_step.exp())


def fold_head(weight: Tensor, bias: Tensor, out_scale: float, max_log_step: float) -> tuple[Tensor, Tensor]:
    """A two-output head's ``(weight [2, H], bias [2, 1])`` with the formula's
    constants folded in: the direction row times ``-alpha``, the log-magnitude
    row times ``2 / c``."""
    scale = weight.new_tensor([-out_scale, 2.0 / max_log_step]).unsqueeze(1)
    return weight * scale, bias.unsqueeze(1) * scale


def finish_folded_(out: Tensor, direction: Tensor, log_step: Tensor, adam: Tensor, nominal_weight: float,
                   max_log_step: float) -> Tensor:
    """The update into ``out`` from the folded head's outputs ``d'``, ``s'``
    (``log_step`` is overwritten); ``nominal_weight`` 0 for no nominal term."""
    c = max_log_step
    magnitude = log_step.sigmoid_().mul_(2.0 * c).sub_(c).exp_()
    if nominal_weight != 0.0:
        torch.add(direction, adam, alpha=-nominal_weight, out=out)
    else:
        out.copy_(direction)
    return out.mul_(magnitude)

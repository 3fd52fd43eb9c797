"""Eager capture: run the model once on example inputs and record what it does.

The primary tracer. Every torch function / tensor method the model's Python
code calls is seen through a :class:`~torch.overrides.TorchFunctionMode`
(the same Python-level run non-strict ``torch.export`` makes), so Python
control flow, ``len(x)``, iteration over tensors and Hugging Face's input
checks all just run. Modules with a mapper (:mod:`l2o.graph.layers`, and
anything given to :func:`l2o.graph.register_module`) are kept whole with
forward hooks: the ops inside them are not recorded, their mapper is called
with the values of their inputs.

**Shadows.** Every recorded tensor has a *shadow*: a long tensor of the same
shape whose entry is the graph node of the feature that element belongs to
(``-1``: none). Shape ops (view, reshape, transpose, permute, indexing,
cat, split, expand, repeat, pad, ...) are applied to the shadow itself, so
the node layout follows any head split / merge, rotary half-rotation,
grouped-query ``repeat_kv`` or cls-token concatenation exactly. Then:

* elementwise ops between tracked tensors merge the nodes that meet
  (residual adds, gated units ``act(g(x)) * u(x)``, rotary ``q*cos +
  rot(q)*sin``), position by position;
* ``a @ b`` merges the nodes of ``a``'s last dim with those of ``b``'s
  second-to-last dim, per batch/head slice (``q @ k^T`` pairs q unit
  ``(h, j)`` with k unit ``(h, j)``), and the result carries ``b``'s column
  nodes (``attn @ v``); ``scaled_dot_product_attention`` does the same for
  q/k and returns v's nodes (grouped-query heads broadcast);
* a parameter consumed by an op becomes edges or node-held entries:
  ``linear``/``addmm``/``mm`` (HF ``Conv1D`` is ``addmm(b, x, W)`` with
  ``W[in, out]``), ``embedding``, ``layer_norm``/``rms_norm``/``group_norm``/
  ``batch_norm``, and a parameter (or a view of one: ``cls.expand(...)``,
  ``pos[:, :T]``) multiplied into or added to / concatenated with a tracked
  tensor gives node-held entries on the nodes it meets (NORM_WEIGHT for a
  product -- RMSNorm-style scales, recognised by what they compute -- BIAS
  for a sum or concat: learned positions, cls tokens);
* reductions keep the nodes of the dims they do not reduce.

Modules: :mod:`l2o.graph.recorder` (the recorder and its dispatch),
:mod:`l2o.graph.shadows`, :mod:`l2o.graph.tensor_ops`,
:mod:`l2o.graph.param_uses`, :mod:`l2o.graph.attention_ops`; this one runs
the model under the recorder and marks the outputs.

A weight used a second time (tied embeddings, a module called twice) keeps
its entries on the edges of its first use; the later use's endpoints are
merged with the first use's (the LM head's logit ``t`` *is* token node
``t``), which is exactly the constraint tying puts on permutations.
"""
from __future__ import annotations

from torch import Tensor, nn

from .attention_ops import place_score_scales
from .eval_mode import eval_mode
from .param_graph import NodeType
from .recorder import Recorder, RecordingMode
from .shadows import TensorInfo, tensors_in
from .values import LazyNodes


def record(state, model: nn.Module, example_inputs, mapper_for, feature_dim_for, keep_whole) -> list[str]:
    """Run ``model`` on ``example_inputs`` under the recorder, mark the nodes
    of its outputs; returns the problems noted (ops or mappers that failed)."""
    rec = Recorder(state, model, mapper_for, feature_dim_for, keep_whole)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    for pos, t in enumerate(tensors_in((args, kwargs))):
        rec.set(t, TensorInfo(lazy=LazyNodes(NodeType.INPUT, group=pos)))
    rec.install()
    try:
        with eval_mode(model), RecordingMode(rec):
            out = model(*args, **kwargs)
    finally:
        rec.remove()
    try:
        place_score_scales(rec)
    except Exception as e:  # never fail the build over it: the scales fall back
        rec.errors.append(f"score scales: {type(e).__name__}: {e}")
    state.mark_outputs(output_nodes(rec, out))
    return rec.errors


def output_nodes(rec: Recorder, out) -> list[int]:
    """The nodes of the model's floating outputs, in order: each output's
    feature dim (the last; dim 1 for a channels-first map)."""
    nodes: list[int] = []
    for t in tensors_in(_plain(out)):
        i = rec.get(t)
        if i is None or i.sh is None or not t.is_floating_point() or t.dim() == 0:
            continue
        fd = -1
        if t.dim() > 2:
            col1 = rec.columns(i.sh, 1)
            last = i.sh.movedim(-1, 0).reshape(t.shape[-1], -1)
            if not bool((last == last[:, :1]).all()) and bool(
                    (i.sh.movedim(1, 0).reshape(t.shape[1], -1) == col1.view(-1, 1)).all()):
                fd = 1
        nodes.extend(rec.columns(i.sh, fd).tolist())
    return nodes


def _plain(out):
    """Model outputs as plain containers (HF ModelOutput is a dict; caches are skipped)."""
    if isinstance(out, dict):
        return [v for k, v in out.items() if k not in ("past_key_values",)]
    return out

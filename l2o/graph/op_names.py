"""Names of the torch functions / tensor methods the eager capture tells apart.

:func:`op_name` is the short name of any callable ``__torch_function__``
receives (``torch.Tensor.view`` -> ``"view"``, ``torch.nn.functional.linear``
-> ``"linear"``); the sets below group them by what the capture does with
them (:mod:`l2o.graph.recorder`).
"""
from __future__ import annotations

from typing import Any

from torch.overrides import resolve_name

# shape ops: applied to the shadows themselves
VIEW_LIKE = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as",
    "transpose", "swapaxes", "swapdims", "permute", "contiguous", "__getitem__", "narrow",
    "select", "repeat", "repeat_interleave", "movedim", "moveaxis", "t", "mT", "T", "mH", "H",
    "roll", "flip", "tile", "index_select", "view_as", "reshape_as", "unfold", "clone", "detach",
    "to", "type", "type_as", "float", "half", "bfloat16", "double", "cat", "concat", "concatenate",
    "stack", "hstack", "vstack", "split", "chunk", "unbind", "split_with_sizes", "tensor_split",
    "pad", "broadcast_to", "diagonal", "take_along_dim", "gather", "atleast_2d", "atleast_3d",
    "ravel", "unsqueeze_", "squeeze_", "cpu", "cuda",
}
# ... of which these take a list of tensors
LIST_ARG = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
# dtype / device casts: the shadow passes through unchanged
CASTS = {"to", "type", "type_as", "float", "half", "bfloat16", "double", "cpu", "cuda"}
REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "norm", "std", "var", "logsumexp",
          "prod", "nansum", "nanmean", "median", "vector_norm"}
MATMUL = {"matmul", "bmm", "__matmul__", "__rmatmul__"}
MUL = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "div", "__truediv__", "div_",
       "__itruediv__", "multiply", "addcmul"}
ADD = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_",
       "__isub__", "subtract"}
# metadata queries: nothing to record
SKIP = {"size", "dim", "numel", "__len__", "__bool__", "item", "tolist", "__format__",
        "__repr__", "is_floating_point", "is_complex", "__index__", "__int__", "__float__",
        "data_ptr", "element_size", "stride", "storage_offset", "is_contiguous", "__get__"}

_SHORT_NAMES: dict[Any, str] = {}


def op_name(func) -> str:
    """The last part of ``func``'s qualified name (memoised per callable)."""
    n = _SHORT_NAMES.get(func)
    if n is None:
        try:
            full = resolve_name(func) or getattr(func, "__name__", str(func))
        except Exception:
            full = getattr(func, "__name__", str(func))
        parts = [p for p in str(full).split(".") if p not in ("__get__", "__set__")]
        n = parts[-1] if parts else str(full)
        _SHORT_NAMES[func] = n
    return n

"""What the build could not structure: the error ``strict=True`` raises, and
the one warning (per model and outcome) it gives otherwise."""
from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict

from torch import nn

from .errors import UnsupportedModuleError
from .state import NOT_FOLLOWED, GraphState

# models already warned about, with what they were warned about
_WARNED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def report_unstructured(model: nn.Module, state: GraphState, left: list[int], strict: bool) -> list[str]:
    """Raise (``strict``) or warn once about the parameters ``left``
    unstructured and the modules whose wiring is unknown; returns the names
    of those parameters."""
    names = [state.param_names[i] for i in left]
    by_module: "OrderedDict[tuple[str, str], list[str]]" = OrderedDict()
    for n in names:
        by_module.setdefault(_owner(model, n), []).append(n)
    if strict:
        raise UnsupportedModuleError(
            "build_graph(strict=True): these modules have parameters the parameter graph "
            "cannot structure, or cannot be traced:\n" + "\n".join(_reasons(model, state, names, by_module)))
    key = (tuple(names), tuple(state.opaque))
    seen = _WARNED.setdefault(model, set()) if _weakrefable(model) else set()
    if key in seen:
        return names
    seen.add(key)
    warnings.warn(_warning(state, left, names, by_module), stacklevel=4)
    return names


def _reasons(model: nn.Module, state: GraphState, names: list[str], by_module) -> list[str]:
    """One line per module: its unstructured parameters and why."""
    lines = [f"  {mod or '<root>'} ({cls}): {', '.join(ps)} -- {_reason_for(state, mod)}"
             for (mod, cls), ps in by_module.items()]
    # untraceable modules whose parameters were all structured piecewise still
    # lose the wiring between their children: say so
    for qn, why in state.opaque.items():
        mod = "" if qn == "<root>" else qn
        if not any(_owner(model, n)[0] == mod for n in names):
            cls = type(model.get_submodule(mod)).__name__
            lines.append(f"  {qn} ({cls}): children structured separately, wiring between "
                         f"them unknown -- {why}")
    return lines


def _warning(state: GraphState, left: list[int], names: list[str], by_module) -> str:
    """The warning: the share unstructured, the modules, how to fix it."""
    total = sum(s.numel() for s in state.param_shapes) or 1
    frac = 100.0 * sum(state.param_shapes[i].numel() for i in left) / total
    mods = [f"{mod or '<root>'} ({cls}: {_short(ps, mod)}"
            + (f"; its mapper raised {failed}" if (failed := _mapper_failure(state, mod)) else "") + ")"
            for (mod, cls), ps in by_module.items()]
    untraced = list(state.opaque)
    if names:
        msg = (f"build_graph: {frac:.1f}% of the parameters ({len(names)} tensor(s)) have no graph "
               f"structure (capture: {state.capture}); they are still optimised, on per-tensor nodes.")
        if mods:
            msg += f" Modules: {_few(mods)}."
    else:
        msg = f"build_graph: every parameter is structured (capture: {state.capture}), but"
    if untraced:
        msg += (f"{' The' if names else ' the'} wiring between the children of {_few(untraced)} is unknown "
                "(could not be traced).")
    return msg + (" To fix: pass example_inputs=... so the forward can be run and recorded, or describe the "
                  "module with l2o.graph.register_module(cls, mapper); build_graph(..., strict=True) lists "
                  "every reason.")


def _short(ps: list[str], mod: str) -> str:
    ps = [p[len(mod) + 1:] if mod else p for p in ps]
    return ", ".join(ps[:3]) + (", ..." if len(ps) > 3 else "")


def _few(xs: list[str]) -> str:
    return ", ".join(xs[:6]) + (f", and {len(xs) - 6} more" if len(xs) > 6 else "")


def _owner(model: nn.Module, param_name: str) -> tuple[str, str]:
    mod_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    try:
        cls = type(model.get_submodule(mod_name)).__name__
    except AttributeError:
        cls = "?"
    return mod_name, cls


def _mapper_failure(state: GraphState, mod_name: str) -> str | None:
    """The error the mapper of module ``mod_name`` raised, if it did (a note of either capture)."""
    head = f"{NOT_FOLLOWED}{mod_name or '<root>'} ("
    for note in state.notes:
        if note.startswith(head):
            return note[len(head):].split("): ", 1)[-1]
    return None


def _reason_for(state: GraphState, mod_name: str) -> str:
    failed = _mapper_failure(state, mod_name)
    if failed:
        return f"its mapper raised {failed}"
    probe = mod_name
    while True:
        key = probe or "<root>"
        if key in state.opaque:
            where = "" if probe == mod_name else f" (inside untraceable '{key}')"
            return state.opaque[key] + where
        if not probe:
            break
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""
    return "no graph mapping for this module or a parameter used directly"


def _weakrefable(m) -> bool:
    try:
        weakref.ref(m)
        return True
    except TypeError:
        return False

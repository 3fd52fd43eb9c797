"""Put each bug class of issue 17 back into a copy of the repository, one at a
time, and check that the tests named for it fail.

    python tools/seeded_bugs.py [--only NAME ...] [--keep DIR]

Each bug is a one-line (or few-line) change of the source, written as exact
text to replace, so a refactor that moves the code makes the script say so
(``not applicable``) rather than pass silently. A scratch copy of the committed
tree (``git archive HEAD``) is checked to pass the named tests unchanged,
then patched, the named tests run there (``pytest -x -q -m "not slow or
slow"``), and the copy restored. Prints one
row per bug: caught (the tests failed), MISSED (they passed) or not
applicable; exits 1 if any is missed or not applicable. Takes some minutes
(``make seeded-bugs``); not part of ``make test``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Bug:
    name: str
    path: str
    edits: list[tuple[str, str]]   # (exact text, replacement), each found exactly once
    tests: list[str]


BUGS = [
    Bug("the outer optimizer never steps (meta-training learns nothing)", "l2o/meta/outer.py",
        [("    if not skipped:\n        opt.step()\n", "    if not skipped:\n        pass\n")],
        ["tests/test_meta_pinned.py::test_meta_training_beats_its_own_initialisation"]),
    Bug("inner parameters not carried across truncations", "l2o/meta/inner.py",
        [('run.params, run.grad, run.buffers, run.lopt_state = st["params"], st["grad"], st["buffers"], '
          'st["lopt_state"]', 'run.grad, run.buffers, run.lopt_state = st["grad"], st["buffers"], st["lopt_state"]')],
        ["tests/test_meta_pinned.py"]),
    Bug("learned-optimizer state not carried across truncations", "l2o/meta/inner.py",
        [('run.params, run.grad, run.buffers, run.lopt_state = st["params"], st["grad"], st["buffers"], '
          'st["lopt_state"]', 'run.params, run.grad, run.buffers = st["params"], st["grad"], st["buffers"]')],
        ["tests/test_meta_pinned.py"]),
    Bug("PES perturbations not accumulated", "l2o/meta/pes.py",
        [('xi = {n: pair["xi"][n] + eps[n] for n in weights}', 'xi = {n: eps[n] for n in weights}')],
        ["tests/test_meta_pinned.py::test_pes_accumulates_its_perturbations"]),
    Bug("--second-order silently ignored", "l2o/meta/inner.py",
        [("create_graph=second_order)", "create_graph=False)"),
         ("return loss, (grad if second_order else grad.detach())", "return loss, grad.detach()")],
        ["tests/test_meta_pinned.py::test_second_order_and_log_objective_change_the_meta_gradient"]),
    Bug("the log meta-objective silently ignored", "l2o/meta/inner.py",
        [('    if objective == "norm":\n', '    if objective in ("norm", "log"):\n')],   # log runs as the default
        ["tests/test_meta_pinned.py::test_second_order_and_log_objective_change_the_meta_gradient"]),
    Bug("a config file overrides the flags", "l2o/meta/config.py",
        [('(("config file", file_values or {}), ("flags", overrides or {}))',
          '(("flags", overrides or {}), ("config file", file_values or {}))')],
        ["tests/test_meta_pinned.py::test_flags_override_the_config_file"]),
    Bug("checkpoint writes not atomic", "l2o/checkpoint.py",
        [("        os.replace(tmp, path)\n", "        path.write_bytes(data)\n        os.unlink(tmp)\n")],
        ["tests/test_meta_pinned.py::test_weights_write_interrupted_before_the_rename_keeps_the_old_file",
         "tests/test_checkpoint.py"]),
    Bug("state_dict() returns live views, not a snapshot", "l2o/optim_state.py",
        [('sd["state"] = {k: {name: t.clone() for name, t in v.items()} for k, v in sd["state"].items()}',
          'sd["state"] = {k: dict(v) for k, v in sd["state"].items()}')],
        ["tests/test_optim_pinned.py::test_state_dict_is_a_snapshot"]),
    Bug("a DDP / DataParallel wrapper not unwrapped", "l2o/optim.py",
        [("nn.DataParallel)):\n            model = model.module\n", "nn.DataParallel)):\n            return model\n")],
        ["tests/test_optim_pinned.py::test_wrappers_are_unwrapped"]),
    Bug("a torch.compile wrapper not unwrapped", "l2o/optim.py",
        [("            model = model._orig_mod\n", "            return model\n")],
        ["tests/test_optim_pinned.py::test_wrappers_are_unwrapped"]),
    Bug("the optimizer does not follow its model to a new device", "l2o/optim_base.py",
        [("        if device == self.graph.device:\n            return\n", "        return\n")],
        ["tests/test_optim_pinned.py::test_optimizer_follows_its_model_to_another_device"]),
    Bug("a momentum beta changed", "l2o/features.py",
        [("MOMENTUM_BETAS = (0.5, 0.9, 0.99, 0.999)", "MOMENTUM_BETAS = (0.5, 0.9, 0.95, 0.999)")],
        ["tests/test_optim_pinned.py::test_momenta_and_second_moment_follow_their_betas"]),
    Bug("Adam's beta1 changed", "l2o/features.py",
        [("MOMENTUM_BETAS = (0.5, 0.9, 0.99, 0.999)", "MOMENTUM_BETAS = (0.5, 0.85, 0.99, 0.999)")],
        ["tests/test_optim_pinned.py::test_untrained_optimizer_is_adam_up_to_a_small_perturbation"]),
    Bug("the q / k edge kinds of attention swapped", "l2o/graph/layers/attention.py",
        [("kind = torch.tensor([int(EdgeKind.ATTN_Q), int(EdgeKind.ATTN_K),",
          "kind = torch.tensor([int(EdgeKind.ATTN_K), int(EdgeKind.ATTN_Q),")],
        ["tests/test_graph_structure.py", "tests/test_graph_factored.py"]),
    Bug("ConvTranspose ignores groups", "l2o/graph/layers/conv.py",
        [("dst2 = out[(r0 // per_group_a) * b + r1]", "dst2 = out[r1].expand(a, b)")],
        ["tests/test_graph.py", "tests/test_graph_layers_contract.py"]),
]


def pytest(copy: Path, tests: list[str]) -> int:
    """pytest's exit code for ``tests`` in ``copy`` (0: all passed, 1: some failed)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                           "-m", "not slow or slow", *tests], cwd=copy, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def run(bug: Bug, copy: Path) -> tuple[str, float]:
    """``caught`` / ``MISSED`` / ``not applicable: ...`` for one bug, and the seconds its tests took."""
    target = copy / bug.path
    original = target.read_text()
    text = original
    for old, new in bug.edits:
        if text.count(old) != 1:
            return f"not applicable: {old.strip()[:50]!r} found {text.count(old)} times in {bug.path}", 0.0
        text = text.replace(old, new)
    target.write_text(text)
    t0 = time.perf_counter()
    try:
        rc = pytest(copy, bug.tests)
    finally:
        target.write_text(original)
    return ("caught" if rc == 1 else "MISSED" if rc == 0 else f"not applicable: pytest exit {rc}"), \
        time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="substrings of the bug names to run")
    ap.add_argument("--keep", help="use (and keep) this directory for the copy")
    args = ap.parse_args()
    bugs = [b for b in BUGS if not args.only or any(s in b.name for s in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(args.keep or tmp)
        copy.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
        named = sorted({t for b in bugs for t in b.tests})
        if pytest(copy, named) != 0:   # a failure with no bug in would make every "caught" meaningless
            sys.exit(f"the named tests fail on the unchanged copy: run pytest {' '.join(named)}")
        bad = 0
        for i, bug in enumerate(bugs, 1):
            verdict, secs = run(bug, copy)
            bad += verdict != "caught"
            print(f"{i:2d}. {bug.name}: {verdict} ({secs:.0f} s; {', '.join(t.split('::')[-1] for t in bug.tests)})",
                  flush=True)
    print(f"{len(bugs) - bad} of {len(bugs)} bug classes caught")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

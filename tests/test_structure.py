"""The code's shape, where it is a promise: no import cycles in l2o, `import l2o`
and `import l2o.graph` light, and the evaluation and meta-training code in
small modules and short functions with no private names crossing modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "l2o"
# Issue 15: no module of l2o/ over ~400 lines, no function over ~80, no private name
# crossing modules -- every module of the package, and the meta-training script.
SMALL = sorted(PACKAGE.rglob("*.py")) + [ROOT / "meta_train.py"]
# The metanetworks define the math once; the backends (l2o.fast) sit above them.
METANETWORKS = ["l2o.lopt", "l2o.gmn", "l2o.gmn_conv", "l2o.mlp_lopt", "l2o.features", "l2o.update_rule"]


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def import_graph() -> dict[str, set[str]]:
    """module -> l2o modules it imports (at module level or inside functions)."""
    modules = {module_name(p)[0]: p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        _, is_package = module_name(path)
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module] if node.module else
                                here[:len(here) - node.level + 1]) if node.level else node.module
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        edges = set()
        for t in targets:
            while t not in modules and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in modules and t != name:
                edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "l2o.eval.metrics" in graph["l2o.plots"]            # function-level imports count too
    assert "l2o.eval.runner" in graph["l2o.eval.results"]


def test_no_import_cycles_in_l2o():
    assert find_cycle(import_graph()) is None


def test_no_metanetwork_imports_a_backend():
    graph = import_graph()
    for start in METANETWORKS:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                assert not dep.startswith("l2o.fast"), f"{start} imports the backend module {dep} (via {sorted(seen)})"
                seen.add(dep)
                todo.append(dep)


def loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(' '.join(sorted(m for m in sys.modules if m.startswith(('l2o', 'torch_geometric')))))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_import_graph_loads_no_learning_code():
    mods = loaded_after("import l2o.graph")
    assert all(m == "l2o" or m.startswith("l2o.graph") for m in mods), mods


def test_import_l2o_is_lazy_and_its_names_resolve():
    assert loaded_after("import l2o") == ["l2o"]
    mods = loaded_after("import l2o\nassert l2o.GMNOptimizer.__module__ == 'l2o.optim'\n"
                        "assert l2o.optim.MLPOptimizer is l2o.MLPOptimizer\n"
                        "from l2o import build_graph, make_lopt, GMNLOpt")
    assert {"l2o.optim", "l2o.checkpoint", "l2o.gmn"} <= set(mods)
    import l2o
    with pytest.raises(AttributeError, match="no_such_name"):
        l2o.no_such_name   # noqa: B018
    assert set(l2o.__all__) <= set(dir(l2o))


def test_eval_metrics_imports_no_torch():
    assert loaded_after("import l2o.eval.metrics\nimport sys\nassert 'torch' not in sys.modules") == \
        ["l2o", "l2o.eval", "l2o.eval.metrics"]


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", SMALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_sizes(path):
    lines = path.read_text().splitlines()
    assert len(lines) <= 400, f"{path.name}: {len(lines)} lines"
    for fn in functions(ast.parse(path.read_text())):
        length = fn.end_lineno - fn.lineno + 1
        assert length <= 80, f"{path.name}:{fn.lineno} {fn.name}: {length} lines"


@pytest.mark.parametrize("path", SMALL, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_cross_modules(path):
    tree = ast.parse(path.read_text())
    modules = set()     # names bound to imported modules of this project
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            own = node.level > 0 or (node.module or "").split(".")[0] in ("l2o", "tasks", "meta_train")
            for a in node.names:
                assert not (own and a.name.startswith("_") and not a.name.startswith("__")), \
                    f"{path.name}:{node.lineno} imports private {a.name}"
                if own:
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names
                           if a.name.split(".")[0] in ("l2o", "tasks", "meta_train"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            pytest.fail(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")

"""Memory of the chunked step: lean graphs equal the graphs they replace, the
optimizers keep no model-sized buffers beside their statistics, and their
step allocates no model-sized temporaries."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o
from l2o.fast.lean import LeanGraph, entry_slice, lean_graph, materialized
from l2o.graph.param_graph import ParamGraph
from l2o.layout import tensor_layout

FIELDS = ("edge_index", "edge_kind", "edge_pos", "tensor_id", "entry_node", "entry_kind")


def _models():
    yield nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5)), None
    yield (nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3)), (torch.randn(2, 3, 6, 6),))
    yield (nn.Sequential(nn.Embedding(11, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)),
           (torch.randint(0, 11, (2, 5)),))


@pytest.mark.parametrize("index", range(3))
def test_lean_graph_rebuilds_every_index_tensor(index):
    model, example = list(_models())[index]
    graph = l2o.build_graph(model, example, use_cache=False)
    lean = lean_graph(graph)
    assert isinstance(lean, LeanGraph) and lean.num_edges == graph.num_edges and lean.device == graph.device
    for name in FIELDS:
        torch.testing.assert_close(getattr(lean, name), getattr(graph, name), rtol=0, atol=0)
        n = getattr(graph, name).shape[-1 if name == "edge_index" else 0]
        for s, e in ((0, n), (1, max(1, n // 3)), (n // 2, n)):
            want = graph.edge_index[:, s:e] if name == "edge_index" else getattr(graph, name)[s:e]
            torch.testing.assert_close(entry_slice(lean, name, s, e), want, rtol=0, atol=0)
    full = lean.to("cpu")
    assert type(full) is ParamGraph and torch.equal(full.edge_index, graph.edge_index)
    assert torch.equal(materialized(lean).tensor_id, graph.tensor_id)


def _kept_bytes(opt) -> int:
    """Bytes of the distinct tensor storages the optimizer (graph, plan, state) holds."""
    seen, total = set(), 0

    def visit(obj, depth=0):
        nonlocal total
        if depth > 6:
            return
        if isinstance(obj, torch.Tensor):
            key = obj.untyped_storage().data_ptr()
            if key not in seen and not isinstance(obj, nn.Parameter):
                seen.add(key)
                total += obj.untyped_storage().nbytes()
            return
        if isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
            visit(vars(obj), depth + 1)

    visit({k: v for k, v in vars(opt).items() if k not in ("_params", "_flat_params", "param_groups")})
    return total


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_optimizer_state_grows_by_the_statistics_alone(cls, use_step_path, monkeypatch):
    """Between steps an optimizer holds m (4 momenta) and v in float32, 20
    bytes per parameter, plus what does not grow with the model (plan,
    run-sized workspaces, node tables): measured as the slope over two sizes."""
    import l2o.fast.gmn as fast_gmn
    import l2o.fast.plan as fast_plan
    use_step_path("chunked")
    monkeypatch.setattr(fast_gmn, "STORE_EDGE_STATES_MAX_PARAMS", 0)   # as on large models
    monkeypatch.setattr(fast_plan, "DEFAULT_CHUNK", 2048)   # and runs shorter than the tensors, as there
    torch.manual_seed(0)
    sizes, kept = [], []
    for width in (300, 600):
        model = nn.Sequential(nn.Linear(300, width), nn.ReLU(), nn.Linear(width, 300), nn.ReLU(), nn.Linear(300, 10))
        opt = cls(model, weights=None)
        x, y = torch.randn(16, 300), torch.randint(0, 10, (16,))
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        assert isinstance(opt.graph, LeanGraph)
        sizes.append(sum(p.numel() for p in model.parameters()))
        kept.append(_kept_bytes(opt))
    slope = (kept[1] - kept[0]) / (sizes[1] - sizes[0])
    assert 20 <= slope < 21, slope


def test_lean_optimizer_equals_the_forward_path(use_step_path):
    """Same updates with the lean graph (chunked) as with the forward path."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(60, 80), nn.ReLU(), nn.Linear(80, 30), nn.ReLU(), nn.Linear(30, 4))  # noqa: E731
    models = [make() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(16, 60), torch.randint(0, 4, (16,))
    results, lopt = [], l2o.GMNLOpt()
    for path, model in zip(("reference", "chunked"), models):
        use_step_path(path)
        opt = l2o.GMNOptimizer(model, weights=lopt, weight_decay=1e-3)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        results.append(([p.detach().clone() for p in model.parameters()], isinstance(opt.graph, LeanGraph)))
    assert results[1][1] and not results[0][1]
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mlp_layout_compacts_to_a_few_runs():
    layout = tensor_layout([torch.Size([500, 400]), torch.Size([400]), torch.Size([10, 400])])
    lean = lean_graph(layout)
    assert set(lean._lean) >= {"tensor_id", "entry_node", "entry_kind"}
    assert all(rl.values.numel() <= 3 for rl in lean._lean.values())
    assert torch.equal(lean.tensor_id, layout.tensor_id)

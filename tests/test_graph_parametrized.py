"""Parametrized weights (``torch.nn.utils.parametrize``: orthogonal,
spectral_norm, weight_norm): the original with the weight's shape sits on the
edges the plain weight would, in both captures; the build changes nothing in
the model."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from graph_helpers import kinds, part
from l2o.graph import build_graph

X = torch.randn(2, 3, 6, 6)
PLAIN = ["0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(),
                         nn.Linear(5, 2))


def _build(model, capture, strict=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_graph(model, X, strict=strict, use_cache=False, capture=capture)


def _layout(g, names):
    """Per tensor (in the order of ``names``): its entries' nodes relabelled by first appearance, and kinds."""
    ids: dict[int, int] = {}

    def label(t):
        return [ids.setdefault(int(v), len(ids)) for v in t.reshape(-1).tolist()]
    out = []
    for name in names:
        where = part(g, name)
        nodes = tuple(label(t) for t in where) if isinstance(where, tuple) else label(where)
        out.append((nodes, kinds(g, name).tolist()))
    return out


def _renamed(names, parametrized, original):
    return [n.replace("weight", f"parametrizations.weight.{original}") if n.split(".")[0] in parametrized else n
            for n in names]


@pytest.mark.parametrize("capture", ["eager", "fx"])
@pytest.mark.parametrize("how", ["orthogonal", "spectral_norm"])
def test_a_parametrized_weight_sits_on_the_plain_weights_edges(how, capture):
    model = _model()
    for i in (0, 3):
        getattr(P, how)(model[i])
    g = _build(model, capture)          # strict: every tensor structured
    assert _layout(g, _renamed(PLAIN, {"0", "3"}, "original")) == _layout(_build(_model(), capture), PLAIN)


@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_weight_norms_direction_sits_on_the_weights_edges_and_its_gain_on_a_fallback_node(capture):
    model = _model()
    P.weight_norm(model[3])
    g = _build(model, capture, strict=False)
    assert _layout(g, _renamed(PLAIN, {"3"}, "original1")) == _layout(_build(_model(), capture), PLAIN)
    assert g.unstructured == ["3.parametrizations.weight.original0"]
    assert g.fractions()["fallback"] == pytest.approx(5 / g.num_params)


def test_two_originals_of_the_weights_shape_are_ambiguous_and_fall_back():
    class Sum(nn.Module):
        def forward(self, a, b):
            return a + b

        def right_inverse(self, w):
            return w, torch.zeros_like(w)

    model = _model()
    parametrize.register_parametrization(model[5], "weight", Sum())
    g = _build(model, "eager", strict=False)
    assert sorted(g.unstructured) == ["5.parametrizations.weight.original0", "5.parametrizations.weight.original1"]


def test_building_a_spectral_norm_model_in_training_changes_none_of_its_state():
    """spectral_norm's power iteration steps its buffers on every weight read
    in training mode; the build reads the weight as the recorded run does
    (eval, no autograd), and leaves the model as it found it."""
    model = _model()
    P.spectral_norm(model[3])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for capture in ("eager", "fx"):
        _build(model, capture)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    w = model[3].weight
    with torch.no_grad():
        model[3].parametrizations.weight.original.mul_(2)
    assert not torch.equal(model[3].weight, w)      # no cache left behind: the weight follows its original



def test_a_parametrization_that_cannot_run_outside_training_is_not_aliased():
    """The build reads each parametrized weight in eval mode; one that raises
    there is skipped (its original left to the captures, which may still
    place it: fx traces through the parametrization) instead of failing the
    build, and the parametrization keeps its training mode."""
    from l2o.graph.state import _alias_parametrized

    class TrainOnly(nn.Module):
        def forward(self, w):
            if not self.training:
                raise RuntimeError("train mode only")
            return w

    model = _model()
    parametrize.register_parametrization(model[5], "weight", TrainOnly())
    index = {id(p): i for i, p in enumerate(model.parameters())}
    before = dict(index)
    assert _alias_parametrized(model, index) == [] and index == before
    assert model[5].parametrizations.weight[0].training
    g = _build(model, "fx", strict=False)          # and the build goes through
    assert "5.parametrizations.weight.original" in g.param_names

"""Parameters used through functional calls (``F.linear``, ``x @ W.T + b``,
``torch.addmm``, ``F.layer_norm``, ...), as Hugging Face and hand-written models
use them, give the graph their ``nn`` modules give: same nodes, edges and entry
kinds, entry by entry (issue 17: the eager capture's parameter-use handlers)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import l2o
from graph_helpers import canonical, part

NORMS = {
    "layer": lambda: nn.LayerNorm(6), "rms": lambda: nn.RMSNorm(6), "group": lambda: nn.GroupNorm(2, 6),
    "batch": lambda: nn.BatchNorm1d(6), "instance": lambda: nn.InstanceNorm1d(6, affine=True),
    "prelu": lambda: nn.PReLU(6), "none": lambda: nn.Identity(),
}


class Modules(nn.Module):
    """Linear -> norm -> relu -> Linear, as modules."""
    def __init__(self, norm):
        super().__init__()
        self.fc, self.norm, self.out = nn.Linear(3, 6), NORMS[norm](), nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc(x)
        if isinstance(self.norm, nn.InstanceNorm1d):    # over two positions: [B, C, 2]
            h = self.norm(h.unsqueeze(-1).repeat(1, 1, 2)).mean(-1)
        else:
            h = self.norm(h)
        return self.out(torch.relu(h))


def _params_of(module: nn.Module) -> nn.Module:
    """A bare module holding ``module``'s parameters and buffers under the same names."""
    bare = nn.Module()
    for n, p in module.named_parameters(recurse=False):
        setattr(bare, n, nn.Parameter(p.detach().clone()))
    for n, b in module.named_buffers(recurse=False):
        bare.register_buffer(n, b.clone())
    return bare


def _linear(form, x, w, b):
    if form == "F.linear":
        return F.linear(x, w, b)
    if form == "F.linear_kwargs":
        return F.linear(input=x, weight=w, bias=b)
    if form == "matmul_t":
        return x @ w.T + b
    if form == "addmm_t":   # as HF's Conv1D: flattened to 2-D around the addmm
        return torch.addmm(b, x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], -1)
    raise ValueError(form)


def _norm(kind, h, n, call):
    """The norm through ``F`` (positional arguments), or through the ``torch.*``
    builtin with positional arguments or every argument by keyword (``F`` passes
    weight and bias on by keyword: only the builtins reach the capture otherwise)."""
    w, b = getattr(n, "weight", None), getattr(n, "bias", None)
    if kind == "layer":
        return {"F": lambda: F.layer_norm(h, (6,), w, b), "torch": lambda: torch.layer_norm(h, (6,), w, b),
                "keywords": lambda: torch.layer_norm(input=h, normalized_shape=(6,), weight=w, bias=b)}[call]()
    if kind == "rms":
        return {"F": lambda: F.rms_norm(h, (6,), w), "torch": lambda: torch.rms_norm(h, (6,), w),
                "keywords": lambda: torch.rms_norm(input=h, normalized_shape=(6,), weight=w)}[call]()
    if kind == "group":
        return {"F": lambda: F.group_norm(h, 2, w, b), "torch": lambda: torch.group_norm(h, 2, w, b),
                "keywords": lambda: torch.group_norm(input=h, num_groups=2, weight=w, bias=b)}[call]()
    if kind == "batch":
        rm, rv = n.running_mean, n.running_var
        return {"F": lambda: F.batch_norm(h, rm, rv, w, b, True),
                "torch": lambda: torch.batch_norm(h, w, b, rm, rv, True, 0.1, 1e-5, False),
                "keywords": lambda: torch.batch_norm(input=h, weight=w, bias=b, running_mean=rm, running_var=rv,
                                                     training=True, momentum=0.1, eps=1e-5,
                                                     cudnn_enabled=False)}[call]()
    if kind == "instance":
        h = h.unsqueeze(-1).repeat(1, 1, 2)
        return {"F": lambda: F.instance_norm(h, None, None, w, b),
                "torch": lambda: torch.instance_norm(h, w, b, None, None, True, 0.1, 1e-5, False),
                "keywords": lambda: torch.instance_norm(input=h, weight=w, bias=b, running_mean=None,
                                                        running_var=None, use_input_stats=True, momentum=0.1,
                                                        eps=1e-5, cudnn_enabled=False)}[call]().mean(-1)
    if kind == "prelu":
        return {"F": lambda: F.prelu(h, w), "torch": lambda: torch.prelu(h, w),
                "keywords": lambda: torch.prelu(input=h, weight=w)}[call]()
    return h


class Functional(nn.Module):
    """The same parameters (names, shapes, values) used through functional calls."""
    def __init__(self, norm, linear, call):
        super().__init__()
        ref = Modules(norm)
        self.kind, self.form, self.call = norm, linear, call
        self.fc, self.norm, self.out = _params_of(ref.fc), _params_of(ref.norm), _params_of(ref.out)

    def forward(self, x):
        h = _norm(self.kind, _linear(self.form, x, self.fc.weight, self.fc.bias), self.norm, self.call)
        return _linear(self.form, torch.relu(h), self.out.weight, self.out.bias)


@pytest.mark.parametrize("call", ["F", "torch", "keywords"])
@pytest.mark.parametrize("linear", ["F.linear", "F.linear_kwargs", "matmul_t", "addmm_t"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_functional_calls_map_like_their_modules(norm, linear, call):
    # [batch, sequence, features] where the norm is over the last dim (a norm read
    # along dim 1 would be wrong there), [batch, channels] for the channel norms
    x = torch.randn(4, 5, 3) if norm in ("layer", "rms", "none") else torch.randn(4, 3)
    torch.manual_seed(0)
    modules = Modules(norm)
    torch.manual_seed(0)
    functional = Functional(norm, linear, call)
    assert [n for n, _ in modules.named_parameters()] == [n for n, _ in functional.named_parameters()]
    want = l2o.build_graph(modules, (x,), strict=True, use_cache=False)
    got = l2o.build_graph(functional, (x,), strict=True, use_cache=False)
    assert got.num_nodes == want.num_nodes
    assert canonical(got) == canonical(want)


@pytest.mark.parametrize("call", ["addmm", "matmul"])
def test_a_parameter_used_through_matmul_without_transpose_is_an_hf_conv1d(call):
    # HF's Conv1D keeps W as [in, out] and computes addmm(b, x, W): entry W[i, o]
    # is the edge input i -> unit o, the transpose of a Linear's layout.
    class InOutLinear(nn.Module):   # not named Conv1D: that name has a module mapper (layers/hf.py)
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.randn(3, 6)), nn.Parameter(torch.zeros(6))

        def forward(self, x):
            return torch.addmm(self.bias, x, self.weight) if call == "addmm" else x @ self.weight + self.bias

    model = nn.Sequential(nn.Linear(3, 3), InOutLinear(), nn.ReLU(), nn.Linear(6, 2))
    g = l2o.build_graph(model, (torch.randn(4, 3),), strict=True, use_cache=False)
    first = part(g, "0.weight")[1][:, 0]
    src, dst = part(g, "1.weight")
    assert torch.equal(src, first.view(3, 1).expand(3, 6)), "row i reads the previous layer's unit i"
    assert (dst == dst[:1]).all() and dst[0].unique().numel() == 6
    assert torch.equal(part(g, "3.weight")[0][0], dst[0])


@pytest.mark.parametrize("linear", ["F.linear", "F.linear_kwargs"])
def test_the_fx_capture_maps_f_linear_like_nn_linear(linear):
    # The fx capture (the fallback when a forward cannot be run) knows F.linear on
    # parameters fetched by get_attr, not the norms or matrix products.
    x = torch.randn(4, 5, 3)
    torch.manual_seed(0)
    want = l2o.build_graph(Modules("none"), (x,), strict=True, capture="fx", use_cache=False)
    torch.manual_seed(0)
    got = l2o.build_graph(Functional("none", linear, "F"), (x,), strict=True, capture="fx", use_cache=False)
    assert canonical(got) == canonical(want)


@pytest.mark.parametrize("first", ["layer", "rms", "prelu", "batch"])
def test_a_norm_as_the_first_layer_sits_on_the_input_nodes(first):
    # The model's input has no units until a layer reads it: the norm's scale and
    # shift go on the input nodes, which the next Linear then reads.
    from l2o.graph.param_graph import NodeType
    norm = {"layer": lambda: nn.LayerNorm(3), "rms": lambda: nn.RMSNorm(3), "prelu": lambda: nn.PReLU(3),
            "batch": lambda: nn.BatchNorm1d(3)}[first]()
    g = l2o.build_graph(nn.Sequential(norm, nn.Linear(3, 2)), (torch.randn(4, 3),), strict=True, use_cache=False)
    on, reads = part(g, "0.weight"), part(g, "1.weight")[0][0]
    assert torch.equal(on, reads) and (g.node_type[on] == NodeType.INPUT).all()

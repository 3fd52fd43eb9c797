"""The network input met with conv features on the channel dim: concatenated
(``cat([relu(conv(x)), x], 1)``: a U-Net input skip, a DenseNet-style first
block) or added (``x + conv(x)``). The input's channels are its units there
too -- the same INPUT nodes a conv reading ``x`` takes its columns from -- not
fresh nodes along its last (spatial) dim, which collapsed the input's
channels onto one node and made the node count follow the image width.
Each test was checked to fail with the eager capture's lazy input put back
on the last dim (tensor_ops.view / tensor_ops.elementwise)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graph_helpers import part
from l2o.graph import build_graph
from l2o.graph.param_graph import NodeType
from l2o.graph.shadows import along, unit_dim


class InputSkip(nn.Module):
    """``o(cat([relu(d(x)), x]))`` (or ``[x, relu(d(x))]``) on ``dim``."""

    def __init__(self, conv, input_first: bool, dim: int):
        super().__init__()
        self.input_first, self.dim = input_first, dim
        self.d = conv(3, 8, 3, padding=1)
        self.o = conv(11, 4, 1)

    def forward(self, x):
        h = F.relu(self.d(x))
        return self.o(torch.cat([x, h] if self.input_first else [h, x], dim=self.dim))


def _build(model, x, capture):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_graph(model, x, use_cache=False, capture=capture)


def _sources(g, name):
    """The source node of each input column of conv ``name`` (one kernel tap)."""
    src, _ = part(g, name)
    return src[0].flatten(1)[:, 0]


def _check_input_skip(g, input_first: bool):
    inputs = _sources(g, "d.weight")                       # the 3 input-channel nodes
    assert torch.equal(g.node_type[inputs], torch.full((3,), int(NodeType.INPUT)))
    assert inputs.unique().numel() == 3
    _, d_out = part(g, "d.weight")
    feats = d_out.flatten(1)[:, 0]                          # d's 8 output units
    cols = _sources(g, "o.weight")
    x_cols, h_cols = (cols[:3], cols[3:]) if input_first else (cols[8:], cols[:8])
    assert torch.equal(x_cols, inputs)                      # channel c of x is input node c
    assert torch.equal(h_cols, feats)
    assert cols.unique().numel() == 11
    assert int((g.node_type == int(NodeType.INPUT)).sum()) == 3
    assert int((g.node_type == int(NodeType.HIDDEN)).sum()) == 8


CASES = [(nn.Conv2d, [(8, 8), (32, 32), (5, 7), (3, 3)], (1, -3)),
         (nn.Conv1d, [(9,), (16,), (3,)], (1, -2))]


@pytest.mark.parametrize("capture", ["eager", "auto", "fx"])
@pytest.mark.parametrize("input_first", [False, True])
@pytest.mark.parametrize("conv,sizes,dims", CASES, ids=["conv2d", "conv1d"])
def test_cat_of_the_input_with_conv_features_keeps_the_input_channels(conv, sizes, dims, input_first, capture):
    # with example inputs; the node count does not depend on the spatial size
    # (a width equal to the channel count, 3, must not reuse the input nodes either)
    for dim in dims:
        torch.manual_seed(0)
        m = InputSkip(conv, input_first, dim)
        counts = set()
        for size in sizes:
            g = _build(m, torch.randn(2, 3, *size), capture)
            _check_input_skip(g, input_first)
            counts.add(g.num_nodes)
        assert counts == {3 + 8 + 4}


@pytest.mark.parametrize("capture", ["auto", "fx"])
@pytest.mark.parametrize("input_first", [False, True])
@pytest.mark.parametrize("conv", [nn.Conv2d, nn.Conv1d], ids=["conv2d", "conv1d"])
def test_cat_of_the_input_without_example_inputs(conv, input_first, capture):
    # auto: an eager run on guessed inputs; fx: no shapes, the cat on dim 1 of a
    # channels-first map is a channel concat
    g = _build(InputSkip(conv, input_first, 1), None, capture)
    _check_input_skip(g, input_first)


def test_eager_cat_of_the_input_on_the_batch_dim_shares_the_channels():
    # cat along the batch: the input's channels are the features' channels, one
    # to one (o reads 8 columns), not nodes along its width
    class BatchCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = nn.Conv2d(3, 3, 3, padding=1)
            self.o = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.o(torch.cat([F.relu(self.d(x)), x], 0))

    g = _build(BatchCat(), torch.randn(2, 3, 6, 5), "eager")
    inputs = _sources(g, "d.weight")
    _, d_out = part(g, "d.weight")
    assert torch.equal(d_out.flatten(1)[:, 0], inputs)
    assert torch.equal(_sources(g, "o.weight"), inputs)
    assert g.num_nodes == 3 + 2


@pytest.mark.parametrize("input_first", [False, True])
@pytest.mark.parametrize("conv,size", [(nn.Conv2d, (8, 5)), (nn.Conv1d, (7,))], ids=["conv2d", "conv1d"])
def test_eager_residual_of_the_input_merges_channel_by_channel(conv, size, input_first):
    # x + relu(d(x)): d's output unit c is input channel c (as fx has it), not
    # all of d's units one node with the input's width
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = conv(3, 3, 3, padding=1)
            self.o = conv(3, 4, 1)

        def forward(self, x):
            h = F.relu(self.d(x))
            return self.o(x + h if input_first else h + x)

    m = Residual()
    graphs = [_build(m, torch.randn(2, 3, *size), cap) for cap in ("eager", "fx")]
    for g in graphs:
        inputs = _sources(g, "d.weight")
        assert inputs.unique().numel() == 3
        _, d_out = part(g, "d.weight")
        assert torch.equal(d_out.flatten(1)[:, 0], inputs)
        assert torch.equal(_sources(g, "o.weight"), inputs)
        assert g.num_nodes == 3 + 4


def test_unit_dim_is_the_dim_the_units_vary_along():
    nodes = torch.arange(4)
    chan = along(nodes, (2, 4, 5, 6), 1)                      # a conv map's channels
    assert unit_dim([chan]) == -3
    assert unit_dim([chan], 1) == -3 and unit_dim([chan], -3) == -3
    assert unit_dim([chan], 0) == -3                          # a batch cat: still the channels
    tokens = along(nodes, (2, 7, 4), 2)
    assert unit_dim([tokens], 1) == -1                        # a sequence cat: the features
    # the cat dim first when the units vary along it (a feature concat)
    both = torch.arange(6).view(1, 2, 3).expand(2, 2, 3)
    assert unit_dim([both], 1) == -2 and unit_dim([both], 2) == -1
    # no shadow, a scalar, one unit, or several dims without the cat dim: the last dim
    assert unit_dim([]) == -1 and unit_dim([torch.tensor(3)]) == -1
    assert unit_dim([torch.full((2, 3), 5)]) == -1
    assert unit_dim([both]) == -1 and unit_dim([both], 0) == -1


# ------------------------------------------- the note when fx replaces a guessed run
class _GatedUntraceable(nn.Module):
    """fc2(gate(fc1(x))), the gate's ``inner`` never run on guessed inputs (fc1
    outputs -1), and a data-dependent branch in the root, so fx fails there."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.inner = nn.Linear(5, 5)
        self.fc2 = nn.Linear(5, 2)
        with torch.no_grad():
            self.fc1.weight.zero_()
            self.fc1.bias.fill_(-1.0)

    def forward(self, x):
        if x.sum() > 1e9:
            x = -x
        h = self.fc1(x)
        if h.mean() > 0:
            h = self.inner(h)
        return self.fc2(h)


def test_the_note_names_the_per_module_capture_that_replaced_the_guessed_run():
    g = _build(_GatedUntraceable(), None, "auto")
    assert g.capture == "per-module (fx failed on the root)"
    assert g.notes[-1] == ("eager run on guessed inputs (2, 3) structured less; "
                           "per-module (fx failed on the root) used")
    assert not any(n.endswith("; fx used") for n in g.notes)

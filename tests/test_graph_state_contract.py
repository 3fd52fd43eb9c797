"""The graph builder's plumbing: the node/edge/entry bookkeeping
(:mod:`l2o.graph.state`), the fx values (:mod:`l2o.graph.values`), made-up
example inputs (:mod:`l2o.graph.example_inputs`), fx tracing
(:mod:`l2o.graph.trace`, :mod:`l2o.graph.fx_walk`) and the eager capture's
outputs (:mod:`l2o.graph.capture`). Written against the survivors of a
mutation run over these modules (docs/mutation.md): each test pins a
behaviour against a plain reference."""
from __future__ import annotations

from types import SimpleNamespace

import warnings

import pytest
import torch
from torch import fx, nn

from graph_helpers import part
from l2o.graph import build_graph, register_module, unregister_module
from l2o.graph.errors import UnsupportedModuleError
from l2o.graph.example_inputs import example_inputs_for
from l2o.graph.fx_walk import collect_nodes, join_name
from l2o.graph.param_graph import NodeType
from l2o.graph.trace import propagate_shapes, trace
from l2o.graph.state import GraphState
from l2o.graph.values import (LazyNodes, TupleVal, Val, channel_nodes, depth_of, input_columns, resolve,
                              spatial_positions)


# ------------------------------------------------------------------ trace
class _Boom(nn.Module):
    """A module whose forward always raises ``ValueError(message)``."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def forward(self, x):
        raise ValueError(self.message)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x).relu()


def _call_targets(graph):
    return [str(n.target) for n in graph.nodes if n.op == "call_module"]


def test_tracing_goes_inside_containers_and_custom_blocks_down_to_the_layers():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), _Block(), nn.Linear(3, 2))
    graph, opaque, failure = trace(model)
    assert failure is None and opaque == {}
    assert _call_targets(graph) == ["0.0", "0.1", "1.fc", "2"]


_LONG = "  first line " + "x" * 400 + "\nsecond line"


@pytest.mark.parametrize("message", [_LONG, "", "short"], ids=["long", "empty", "short"])
def test_a_submodule_that_fails_to_trace_is_made_opaque_with_the_first_line_of_its_error(message):
    model = nn.Sequential(nn.Linear(3, 3), _Boom(message), nn.Linear(3, 2))
    graph, opaque, failure = trace(model)
    first = message.strip().splitlines()[0] if message.strip() else ""
    assert failure is None
    assert opaque == {"1": f"fx could not trace it (ValueError: {first[:160]})"}
    assert _call_targets(graph) == ["0", "1", "2"]


def _shape_prop_error(model, graph, *inputs) -> BaseException:
    from torch.fx.passes.shape_prop import ShapeProp
    try:
        ShapeProp(fx.GraphModule(model, graph)).propagate(*inputs)
    except Exception as e:
        return e
    raise AssertionError("shape propagation did not fail")


def test_a_failed_shape_propagation_is_told_by_its_error_type_and_first_line_cut_at_300():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(3, 3))
    model.add_module("b" * 400, _Boom("no"))      # the failing node's name makes a long first line
    graph, opaque, _ = trace(model)
    assert list(opaque) == ["b" * 400]
    x = torch.randn(2, 3)
    e = _shape_prop_error(model, graph, x)
    first = str(e).strip().splitlines()[0]
    assert len(first) > 300
    assert propagate_shapes(model, graph, x) == f"{type(e).__name__}: {first[:300]}"


class _NoInputs:
    def __iter__(self):
        raise ValueError()


def test_a_failed_shape_propagation_with_an_empty_message_gives_the_error_type_alone():
    model = nn.Sequential(nn.Linear(3, 2))
    graph, _, _ = trace(model)
    assert propagate_shapes(model, graph, _NoInputs()) == "ValueError: "


def test_a_root_that_fails_to_trace_gives_no_graph_and_the_reason():
    boom = _Boom("no")
    graph, opaque, failure = trace(boom)
    assert graph is None and opaque == {} and failure == "fx could not trace it (ValueError: no)"


def test_shape_propagation_annotates_the_nodes_and_restores_each_modules_own_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    model[1].eval()
    graph, _, _ = trace(model)
    stats = model[1].running_mean.clone()
    assert propagate_shapes(model, graph, torch.randn(5, 3)) is None
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert torch.equal(model[1].running_mean, stats)
    shapes = {str(n.target): tuple(n.meta["tensor_meta"].shape) for n in graph.nodes if n.op == "call_module"}
    assert shapes == {"0": (5, 4), "1": (5, 4), "2": (5, 2)}


# --------------------------------------------------------- example inputs
class _HF(nn.Module):
    """The two attributes a Hugging Face model is recognised by."""

    def __init__(self, name, **config):
        super().__init__()
        self.config = SimpleNamespace(**config)
        self.main_input_name = name
        self.fc = nn.Linear(3, 3)


def _seed0():
    return torch.Generator().manual_seed(0)


def _same(a, b):
    return type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else (
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) if isinstance(a, dict)
        else len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))))


@pytest.mark.parametrize("config, want", [
    (dict(vocab_size=50), lambda: {"input_ids": torch.randint(0, 50, (1, 8), generator=_seed0())}),
    (dict(vocab_size=None), lambda: {"input_ids": torch.randint(0, 100, (1, 8), generator=_seed0())}),
    (dict(), lambda: {"input_ids": torch.randint(0, 100, (1, 8), generator=_seed0())}),
    (dict(vocab_size=7, is_encoder_decoder=True),
     lambda: {"input_ids": torch.randint(0, 7, (1, 8), generator=_seed0()),
              "decoder_input_ids": torch.zeros(1, 4, dtype=torch.long)}),
], ids=["vocab", "vocab_none", "no_vocab", "encoder_decoder"])
def test_a_hugging_face_text_model_gets_one_row_of_8_token_ids_from_its_vocabulary(config, want):
    assert _same(example_inputs_for(_HF("input_ids", **config)), want())


@pytest.mark.parametrize("config, want", [
    (dict(image_size=16, num_channels=1), lambda: torch.randn(1, 1, 16, 16, generator=_seed0())),
    (dict(image_size=(12, 20)), lambda: torch.randn(1, 3, 12, 12, generator=_seed0())),
    (dict(), lambda: torch.randn(1, 3, 32, 32, generator=_seed0())),
], ids=["int_size", "pair_size", "defaults"])
def test_a_hugging_face_vision_model_gets_one_square_image_of_its_configured_size(config, want):
    assert _same(example_inputs_for(_HF("pixel_values", **config)), {"pixel_values": want()})


def test_a_hugging_face_vision_encoder_decoder_also_gets_decoder_ids():
    got = example_inputs_for(_HF("pixel_values", image_size=4, is_encoder_decoder=True))
    assert _same(got, {"pixel_values": torch.randn(1, 3, 4, 4, generator=_seed0()),
                       "decoder_input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_a_hugging_face_model_with_another_main_input_gets_none():
    assert example_inputs_for(_HF("input_features", vocab_size=5)) is None
    assert example_inputs_for(_HF("input_features", num_mel_bins=4)) is None   # mel frames, length unknown


def test_a_hugging_face_speech_model_gets_a_waveform_or_whispers_mel_frames():
    assert _same(example_inputs_for(_HF("input_values")), {"input_values": torch.randn(1, 4000, generator=_seed0())})
    got = example_inputs_for(_HF("input_features", num_mel_bins=6, max_source_positions=5, is_encoder_decoder=True))
    assert _same(got, {"input_features": torch.randn(1, 6, 10, generator=_seed0()),
                       "decoder_input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_a_model_with_a_config_but_no_main_input_name_is_read_from_its_first_layer():
    m = nn.Sequential(nn.Linear(3, 2))
    m.config = SimpleNamespace(vocab_size=5)
    assert _same(example_inputs_for(m), (torch.randn(2, 3, generator=_seed0()),))


@pytest.mark.parametrize("model, want", [
    (lambda: nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 2)),
     lambda: (torch.randint(0, 11, (2, 8), generator=_seed0()),)),
    (lambda: nn.Sequential(nn.ReLU(), nn.Linear(5, 2)), lambda: (torch.randn(2, 5, generator=_seed0()),)),
    (lambda: nn.Sequential(nn.Conv2d(4, 2, 3)), lambda: (torch.randn(2, 4, 32, 32, generator=_seed0()),)),
    (lambda: nn.Sequential(nn.Conv1d(6, 2, 3)), lambda: (torch.randn(2, 6, 32, generator=_seed0()),)),
    (lambda: nn.LSTM(3, 4, batch_first=True), lambda: (torch.randn(2, 8, 3, generator=_seed0()),)),
    (lambda: nn.GRU(3, 4), lambda: (torch.randn(8, 2, 3, generator=_seed0()),)),
    (lambda: _Block(), lambda: (torch.randn(2, 3, generator=_seed0()),)),
    (lambda: nn.Sequential(nn.EmbeddingBag(9, 4)), lambda: (torch.randint(0, 9, (2, 8), generator=_seed0()),)),
    (lambda: nn.Sequential(nn.Conv3d(2, 3, 3)), lambda: (torch.randn(2, 2, 8, 16, 16, generator=_seed0()),)),
    (lambda: nn.Sequential(nn.LSTMCell(5, 4)), lambda: (torch.randn(2, 8, 5, generator=_seed0()),)),
], ids=["embedding", "linear_after_relu", "conv2d", "conv1d", "lstm_batch_first", "gru", "nested_linear",
        "embedding_bag", "conv3d", "rnn_cell"])
def test_a_plain_model_gets_a_seeded_batch_of_2_shaped_for_its_first_layer(model, want):
    assert _same(example_inputs_for(model()), want())


@pytest.mark.parametrize("model", [
    lambda: nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 2)),      # a first layer with parameters of no known kind
    lambda: nn.Sequential(nn.ReLU(), nn.Tanh()),                   # no parameters at all
    lambda: nn.Sequential(),
], ids=["unknown_first_layer", "no_parameters", "empty"])
def test_a_model_whose_first_layer_is_not_a_known_kind_gets_none(model):
    assert example_inputs_for(model()) is None


# ---------------------------------------------------------------- fx walk
def test_qualified_names_join_with_a_dot_and_skip_empty_parts():
    assert join_name("a", "b") == "a.b"
    assert join_name("", "b") == "b"
    assert join_name("a", "") == "a"
    assert join_name("", "") == ""


def test_output_nodes_are_collected_from_tuples_lists_and_dicts_in_order():
    def v(*ids):
        return Val(own_nodes=torch.tensor(ids))
    out: list[int] = []
    collect_nodes((v(1, 2), TupleVal([v(3), None]), [v(4)], {"a": v(5), "b": None}, None, Val()), out)
    assert out == [1, 2, 3, 4, 5]


def _roles(g):
    return g.node_type.tolist(), g.node_io_index.tolist()


def test_a_bare_mapped_layer_as_the_model_gets_input_and_output_units_under_fx():
    g = build_graph(nn.Linear(3, 2), capture="fx", use_cache=False, strict=True)
    I, O = int(NodeType.INPUT), int(NodeType.OUTPUT)
    assert _roles(g) == ([I, I, I, O, O], [0, 1, 2, 0, 1])
    src, dst = part(g, "weight")
    assert src.tolist() == [[0, 1, 2]] * 2 and dst.tolist() == [[3] * 3, [4] * 3]


def test_a_bare_multihead_attention_reads_query_key_and_value_as_three_inputs_in_that_order():
    g = build_graph(nn.MultiheadAttention(4, 2), capture="fx", use_cache=False, strict=True)
    src, _ = part(g, "in_proj_weight")
    q, k, v = src.view(3, 4, 4)[:, 0, :]
    inputs = (g.node_type == int(NodeType.INPUT)).nonzero().flatten()
    assert sorted(torch.cat([q, k, v]).tolist()) == inputs.tolist()       # three distinct sets
    assert g.node_io_index[torch.cat([q, k, v])].tolist() == list(range(12))


class _Decoder(nn.Module):
    """A torch.nn layer with no mapper (fx keeps it whole, then walks it on its
    own with the caller's values) fed two different inputs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(5, 8)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x, m):
        return self.head(self.dec(self.a(x), self.b(m)))


def test_a_layer_walked_on_its_own_gets_the_callers_values_in_argument_order():
    g = build_graph(_Decoder(), capture="fx", use_cache=False)
    assert g.unstructured == []
    a_units, b_units = part(g, "a.weight")[1][:, 0], part(g, "b.weight")[1][:, 0]
    self_q, self_k, self_v = part(g, "dec.self_attn.in_proj_weight")[0].view(3, 8, 8)[:, 0, :]
    cross_q, cross_k, cross_v = part(g, "dec.multihead_attn.in_proj_weight")[0].view(3, 8, 8)[:, 0, :]
    for t in (self_q, self_k, self_v, cross_q):        # tgt (and its residual stream)
        assert torch.equal(t, a_units)
    for t in (cross_k, cross_v):                        # memory
        assert torch.equal(t, b_units)
    assert torch.equal(part(g, "head.weight")[0][0], a_units)   # the layer's output: the residual stream


def test_a_layer_called_with_keywords_gets_them_under_fx():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(5, 4)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x, m):
            a, b = self.a(x), self.b(m)
            return self.mha(query=a, key=b, value=b)[0]
    g = build_graph(Cross(), capture="fx", use_cache=False, strict=True)
    a_units, b_units = part(g, "a.weight")[1][:, 0], part(g, "b.weight")[1][:, 0]
    q, k, v = part(g, "mha.in_proj_weight")[0].view(3, 4, 4)[:, 0, :]
    assert torch.equal(q, a_units) and torch.equal(k, b_units) and torch.equal(v, b_units)


def test_the_output_of_a_module_fx_cannot_look_into_is_fresh_units_one_layer_deeper():
    model = nn.Sequential(nn.Linear(3, 4), _Untraceable(nn.Linear(4, 4)), nn.Linear(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = build_graph(model, capture="fx", use_cache=False)
    first = part(g, "0.weight")[1][:, 0]
    inner_in, inner_out = part(g, "1.inner.weight")[0][0], part(g, "1.inner.weight")[1][:, 0]
    head_in, head_out = part(g, "2.weight")[0][0], part(g, "2.weight")[1][:, 0]
    assert len(set(torch.cat([first, inner_in, inner_out, head_in]).tolist())) == 16
    # depths 1 (first layer), 2 (the opaque module's output), 3 (head), normalised by 3
    depth = (g.node_depth * 3).round()
    assert depth[first].tolist() == [1] * 4 and depth[head_in].tolist() == [2] * 4 and depth[head_out].tolist() == [3] * 2


def test_a_functional_linear_with_a_buffer_bias_places_only_the_weight_under_fx():
    class FrozenBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(2, 3))
            self.register_buffer("b", torch.zeros(2))

        def forward(self, x):
            return nn.functional.linear(x, self.weight, self.b)
    g = build_graph(FrozenBias(), capture="fx", use_cache=False, strict=True)
    I, O = int(NodeType.INPUT), int(NodeType.OUTPUT)
    assert g.param_names == ["weight"] and _roles(g) == ([I, I, I, O, O], [0, 1, 2, 0, 1])


class _Untraceable(nn.Module):
    """Data-dependent control flow in its own forward: fx cannot trace it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        x = self.inner(x)
        if x.sum() > 0:
            return x
        return -x


class _Tagged(nn.Module):
    def __init__(self, n_in=3, n_out=3):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.fc(x)


@pytest.fixture
def tagged_mapper():
    """``_Tagged`` registered with a mapper that records the names it is called with."""
    seen: list = []

    def mapper(ctx, module, x, **kwargs):
        seen.append((ctx.qualname, kwargs))
        return ctx.linear(module.fc.weight, x, module.fc.bias)
    register_module(_Tagged, mapper)
    yield seen
    unregister_module(_Tagged)


def test_a_registered_layer_as_the_model_is_mapped_under_fx_with_an_empty_name(tagged_mapper):
    g = build_graph(_Tagged(), capture="fx", use_cache=False, strict=True)
    assert tagged_mapper == [("", {})]
    I, O = int(NodeType.INPUT), int(NodeType.OUTPUT)
    assert _roles(g) == ([I] * 3 + [O] * 3, [0, 1, 2, 0, 1, 2])


def test_layers_inside_walked_modules_are_mapped_under_their_full_names(tagged_mapper):
    model = _Untraceable(nn.Sequential(nn.Linear(3, 3), _Tagged()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_graph(model, capture="fx", use_cache=False)
    assert tagged_mapper == [("inner.1", {})]
    tagged_mapper.clear()
    model = _Decoder()
    model.dec.linear1 = _Tagged(8, 16)
    g = build_graph(model, capture="fx", use_cache=False, strict=True)
    assert tagged_mapper == [("dec.linear1", {})]
    assert torch.equal(part(g, "dec.linear1.fc.weight")[0][0], part(g, "a.weight")[1][:, 0])


def test_children_of_untraceable_modules_are_walked_under_their_full_names(tagged_mapper):
    model = _Untraceable(_Untraceable(_Tagged()))
    with pytest.raises(UnsupportedModuleError) as err:
        build_graph(model, capture="fx", use_cache=False, strict=True)
    assert tagged_mapper == [("inner.inner", {})]
    why = trace(model)[2]
    assert why == trace(model.inner)[2] and why.startswith("fx could not trace it (TraceError: ")
    lines = str(err.value).splitlines()[1:]
    assert sorted(lines) == [
        f"  <root> (_Untraceable): children structured separately, wiring between them unknown -- {why}",
        f"  inner (_Untraceable): children structured separately, wiring between them unknown -- {why}"]


class _CallsBoom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.boom = _Boom("inner")

    def forward(self, x):
        return self.boom(self.fc(x))


def test_a_submodule_made_opaque_inside_a_walked_child_is_named_from_the_root():
    model = _Untraceable(_CallsBoom())
    with pytest.raises(UnsupportedModuleError) as err:
        build_graph(model, capture="fx", use_cache=False, strict=True)
    lines = str(err.value).splitlines()[1:]
    assert sorted(line.split(" -- ")[0] for line in lines) == [
        "  <root> (_Untraceable): children structured separately, wiring between them unknown",
        "  inner.boom (_Boom): children structured separately, wiring between them unknown"]
    assert " -- fx could not trace it (ValueError: inner)" in "\n".join(lines)


def test_a_failed_shape_propagation_warns_once_at_the_callers_line_with_the_failure():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(18, 4))
    x = torch.randn(1, 5, 2, 3)                                     # 5 channels, not 2
    failure = propagate_shapes(model, trace(model)[0], x)
    assert failure.startswith("RuntimeError: ")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_graph(model, x, capture="fx", use_cache=False)
    assert [(w.category, w.filename) for w in seen] == [(UserWarning, __file__)]
    assert str(seen[0].message) == (
        f"build_graph: shape propagation with the given example_inputs failed for the model ({failure}); "
        "spatial positions after a flatten are inferred from layer sizes instead (square maps assumed). "
        "Check that example_inputs is a valid input of the model's forward.")


# ----------------------------------------------------------------- values
def _state():
    return GraphState(nn.Linear(1, 1))


def test_spatial_positions_of_1d_2d_and_3d_maps_are_normalised_y_x_pairs():
    assert spatial_positions((3,)).tolist() == [[0.0, -1.0], [0.0, 0.0], [0.0, 1.0]]
    assert spatial_positions((1,)).tolist() == [[0.0, 0.0]]
    # row-major over (y, x); a one-wide axis sits at 0
    assert spatial_positions((2, 3)).tolist() == [[-1.0, -1.0], [-1.0, 0.0], [-1.0, 1.0],
                                                  [1.0, -1.0], [1.0, 0.0], [1.0, 1.0]]
    assert spatial_positions((2, 1)).tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    assert spatial_positions((1, 2)).tolist() == [[0.0, -1.0], [0.0, 1.0]]
    # 3-D: the two innermost axes, repeated over the outer one
    assert torch.equal(spatial_positions((4, 2, 3)), torch.cat([spatial_positions((2, 3))] * 4))
    assert torch.equal(spatial_positions((2, 3, 1, 2)), torch.cat([spatial_positions((1, 2))] * 6))


def test_channel_nodes_are_the_values_own_or_fresh_hidden_units_at_its_depth():
    state = _state()
    x = Val(own_nodes=state.new_nodes(2, NodeType.INPUT, 0), depth=3)
    assert channel_nodes(state, x, 2).tolist() == [0, 1]
    assert channel_nodes(state, x, 4).tolist() == [2, 3, 4, 5]              # width changed: unknown units
    assert channel_nodes(state, None, 1).tolist() == [6]                    # no value: depth 0
    assert state._type == [int(NodeType.INPUT)] * 2 + [int(NodeType.HIDDEN)] * 5
    assert state._depth == [0, 0, 3, 3, 3, 3, 0]


def test_resolve_materialises_lazy_nodes_once_with_their_kind_group_and_depth():
    state = _state()
    lazy = Val(lazy=LazyNodes(NodeType.INPUT, group=1, depth=2))
    first = resolve(state, lazy, 3)
    assert first.tolist() == [0, 1, 2] and resolve(state, lazy, 5) is first
    assert state._type == [int(NodeType.INPUT)] * 3 and state._depth == [2] * 3
    assert state._input_key == [(1, 0), (1, 1), (1, 2)]
    assert resolve(state, Val(depth=4), 2).tolist() == [3, 4]               # no bookkeeping: fresh hidden
    assert resolve(state, 1.5, 1).tolist() == [5]
    assert state._type[3:] == [int(NodeType.HIDDEN)] * 3 and state._depth[3:] == [4, 4, 0]


def test_input_columns_of_a_flattened_map_repeat_each_channel_with_its_positions():
    state = _state()
    x = Val(own_nodes=state.new_nodes(2, NodeType.HIDDEN, 1), depth=1, spatial=(1, 3))
    nodes, pos = input_columns(state, x, 6)
    assert nodes.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(pos, torch.cat([spatial_positions((1, 3))] * 2))
    # a spatial shape that does not fit the columns is guessed: square if it can be, else 1-D
    nodes, pos = input_columns(state, x, 8)
    assert nodes.tolist() == [0] * 4 + [1] * 4 and torch.equal(pos, torch.cat([spatial_positions((2, 2))] * 2))
    nodes, pos = input_columns(state, Val(own_nodes=x.own_nodes, depth=1), 4)
    assert torch.equal(pos, torch.cat([spatial_positions((2,))] * 2))
    # as many columns as nodes: no positions; sizes that do not divide: fresh units at the value's depth
    nodes, pos = input_columns(state, x, 2)
    assert nodes.tolist() == [0, 1] and pos is None
    nodes, pos = input_columns(state, x, 3)
    assert nodes.tolist() == [2, 3, 4] and pos is None and state._depth[2:] == [1] * 3
    nodes, pos = input_columns(state, None, 2)
    assert nodes.tolist() == [5, 6] and state._depth[5:] == [0, 0]


def test_depth_of_is_the_deepest_value_or_zero():
    assert depth_of() == 0 and depth_of(None, 3) == 0
    assert depth_of(Val(depth=2), None, Val(depth=5), Val(depth=1)) == 5


# ------------------------------------------------------------------ state
def test_a_weights_row_and_column_endpoints_are_read_from_any_broadcast_layout():
    rows, cols = torch.tensor([[4], [6]]), torch.tensor([[5, 7, 9]])
    for src, dst in [(cols, rows), (rows, cols), (cols.flatten(), rows)]:       # 1-D ends broadcast as a row
        got = GraphState._factors((2, 3), src, dst)
        assert got[0].tolist() == [4, 6] and got[1].tolist() == [5, 7, 9]
    one = GraphState._factors((1, 3), torch.tensor([[4]]), cols)
    assert one[0].tolist() == [4] and one[1].tolist() == [5, 7, 9]
    # a 1 x 1 weight: the first end is the row, the second the column
    one = GraphState._factors((1, 1), torch.tensor([[4]]), torch.tensor([[5]]))
    assert one[0].tolist() == [4] and one[1].tolist() == [5]
    # endpoints that vary along both dims, or a weight that is not 2-D: no factors
    assert GraphState._factors((2, 3), torch.arange(6).view(2, 3), cols) is None
    assert GraphState._factors((2, 3), rows, torch.tensor([[1]])) is None
    assert GraphState._factors((2, 3, 1), rows.view(2, 1, 1), cols.view(1, 3, 1)) is None


class _Twice(nn.Module):
    """One bias-free Linear applied to two inputs (a siamese pair)."""

    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(n, n, bias=False)

    def forward(self, a, b):
        return torch.cat([self.fc(a), self.fc(b)], -1)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("capture", ["eager", "fx"])
def test_a_weight_used_twice_merges_the_second_uses_units_with_the_first_even_when_1x1(n, capture):
    g = build_graph(_Twice(n), (torch.randn(3, n), torch.randn(3, n)), use_cache=False, capture=capture)
    assert g.num_nodes == 2 * n
    assert g.node_type.tolist() == [int(NodeType.INPUT)] * n + [int(NodeType.OUTPUT)] * n
    assert g.notes == ["tied/shared weights (entries on their first use's edges, later uses' units merged "
                       "with it): fc.weight"]


def _used_twice(second_shape, second_src, second_dst):
    """A 2 x 3 weight placed as edges, then met again with the given layout."""
    fc = nn.Linear(3, 2, bias=False)
    state = GraphState(fc)
    x, y = state.new_nodes(3, NodeType.INPUT, 0), state.new_nodes(2, NodeType.HIDDEN, 1)
    assert state.add_edges(fc.weight, (2, 3), x.view(1, 3), y.view(2, 1), 0)
    new = state.new_nodes(5, NodeType.HIDDEN, 2)
    assert not state.add_edges(fc.weight, second_shape, second_src(new), second_dst(new), 0)
    return state, new


def test_a_weight_met_again_with_another_shape_or_no_row_column_layout_is_not_merged():
    for shape, src, dst in [((3, 2), lambda n: n[:3].view(3, 1), lambda n: n[3:].view(1, 2)),
                            ((2, 3), lambda n: torch.stack([n[:3], n[2:]]), lambda n: n[3:].view(2, 1))]:
        state, new = _used_twice(shape, src, dst)
        assert [state.find(i) for i in range(10)] == list(range(10)) and state.reused == []
    state, new = _used_twice((2, 3), lambda n: n[:3].view(1, 3), lambda n: n[3:].view(2, 1))
    assert [state.find(i) for i in range(10)] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4] and state.reused == ["weight"]


# --------------------------------------------------------- eager outputs
def _outputs(g):
    """OUTPUT nodes in output order."""
    out = (g.node_type == int(NodeType.OUTPUT)).nonzero().flatten()
    return out[g.node_io_index[out].argsort()].tolist()


def _eager(model, x):
    """The eager capture alone (``auto`` would fall back to fx if it failed), on one bare tensor."""
    g = build_graph(model, x, strict=True, use_cache=False, capture="eager")
    assert g.capture == "eager" and g.notes == []
    return g


class _Heads(nn.Module):
    """A trunk and two heads, returned in a container with extras that are not outputs."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.trunk, self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 3)

    def forward(self, x):
        h = self.trunk(x)
        a, b = self.a(h), self.b(h)
        if self.kind == "dict":
            return {"a": a, "past_key_values": h, "b": b}
        return (a, h.sum(), (h > 0).long(), [b])


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_the_eager_outputs_are_the_floating_outputs_in_order_without_caches_scalars_or_integers(kind):
    g = _eager(_Heads(kind), torch.randn(2, 3))
    a_units, b_units = part(g, "a.weight")[1][:, 0], part(g, "b.weight")[1][:, 0]
    assert _outputs(g) == a_units.tolist() + b_units.tolist()
    assert sorted(g.node_io_index[a_units].tolist() + g.node_io_index[b_units].tolist()) == list(range(5))


@pytest.mark.parametrize("shape, fdim, width", [((2, 5, 3), -1, 4), ((2, 5, 3), -1, 1), ((2, 3, 4, 5), 1, 4),
                                                 ((2, 3, 6), 1, 4)])
def test_the_eager_outputs_of_a_map_are_its_channels_and_of_a_sequence_its_last_dim(shape, fdim, width):
    if fdim == -1:
        model = nn.Sequential(nn.Linear(3, width))
        units = lambda g: part(g, "0.weight")[1][:, 0]          # noqa: E731
    else:
        conv = nn.Conv2d(3, 4, 1) if len(shape) == 4 else nn.Conv1d(3, 4, 1)
        model = nn.Sequential(conv, nn.ReLU())
        units = lambda g: part(g, "0.weight")[1].flatten(1)[:, 0]   # noqa: E731
    g = _eager(model, torch.randn(*shape))
    assert _outputs(g) == units(g).tolist()


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb = nn.Linear(3, 2), nn.Linear(4, 2)

    def forward(self, a, b):
        return self.fb(b) + self.fa(a)          # b is read first


@pytest.mark.parametrize("as_dict", [False, True])
def test_eager_inputs_are_numbered_by_argument_position_and_may_be_keywords(as_dict):
    model = _TwoInputs().train()
    model.fa.eval()
    a, b = torch.randn(2, 3), torch.randn(2, 4)
    inputs = {"a": a, "b": b} if as_dict else (a, b)
    g = build_graph(model, inputs, strict=True, use_cache=False, capture="eager")
    assert g.capture == "eager" and g.notes == []
    a_in, b_in = part(g, "fa.weight")[0][0], part(g, "fb.weight")[0][0]
    assert g.node_io_index[a_in].tolist() == [0, 1, 2] and g.node_io_index[b_in].tolist() == [3, 4, 5, 6]
    assert [m.training for m in model.modules()] == [True, False, True]     # each module's own mode kept


def test_a_failure_placing_attention_score_scales_is_noted_and_the_build_goes_on(monkeypatch):
    import l2o.graph.capture as capture

    def boom(rec):
        raise RuntimeError("boom")
    monkeypatch.setattr(capture, "place_score_scales", boom)
    g = build_graph(nn.Linear(3, 2), torch.randn(2, 3), use_cache=False, capture="eager")
    assert g.notes == ["op not followed: score scales: RuntimeError: boom"]
    assert _outputs(g) == part(g, "weight")[1][:, 0].tolist()

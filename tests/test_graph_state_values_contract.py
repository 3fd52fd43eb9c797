"""The graph builder's node bookkeeping (:mod:`l2o.graph.state`) and fx values
(:mod:`l2o.graph.values`), second pass: written against the survivors of a
mutation run over these two modules (docs/mutation.md) that
tests/test_graph_state_contract.py left alive. Each test pins a behaviour
against a plain reference (exact node types, io indices, depths, endpoints)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from l2o.graph.param_graph import EntryKind, NodeType
from l2o.graph.state import GraphState
from l2o.graph.values import Val, input_columns, spatial_positions

I, H, O, T = int(NodeType.INPUT), int(NodeType.HIDDEN), int(NodeType.OUTPUT), int(NodeType.TENSOR)


def _state(*shapes):
    """A GraphState over a module holding one parameter per shape (p0, p1, ...)."""
    m = nn.Module()
    for k, s in enumerate(shapes):
        m.register_parameter(f"p{k}", nn.Parameter(torch.zeros(s)))
    return GraphState(m), m


# ------------------------------------------------------------------ merge
def test_merging_node_lists_of_different_sizes_names_both_sizes():
    st, _ = _state()
    st.new_nodes(5, NodeType.HIDDEN, 0)
    with pytest.raises(ValueError, match=r"^cannot merge node lists of sizes 2 and 3$"):
        st.merge(torch.arange(2), torch.arange(3))


def test_a_merged_unit_keeps_the_lower_raw_id_so_the_final_numbering_follows_first_creation():
    st, _ = _state()
    st.new_nodes(1, NodeType.HIDDEN, 0)   # 0
    st.new_nodes(1, NodeType.HIDDEN, 2)   # 1
    st.new_nodes(1, NodeType.HIDDEN, 1)   # 2
    st.merge(torch.tensor([2]), torch.tensor([0]))   # larger id first
    assert st.find(2) == 0 and st.find(0) == 0
    g = st.finish([], [])
    assert g.num_nodes == 2
    # the merged unit is node 0 (raw 0's place) with the deeper depth 1 of the two; raw 1 (depth 2) is node 1
    assert g.node_depth.tolist() == [0.5, 1.0]


def test_a_hidden_unit_merged_with_an_input_becomes_that_input_with_its_input_order():
    st, _ = _state()
    st.new_nodes(1, NodeType.HIDDEN, 1)                     # 0
    st.new_nodes(2, NodeType.INPUT, 0, input_group=1)       # 1, 2 (second network input)
    st.new_nodes(1, NodeType.INPUT, 0, input_group=0)       # 3   (first network input)
    st.merge(torch.tensor([0]), torch.tensor([2]))
    assert st.node_type_of(0) == I
    g = st.finish([], [])
    assert g.node_type.tolist() == [I, I, I]
    # ordered by (input group, position): raw 3 first, then raw 1, then the merged raw 2 (now node 0)
    assert g.node_io_index.tolist() == [2, 1, 0]


def test_an_input_unit_merged_with_a_later_output_unit_stays_an_input():
    st, _ = _state()
    st.new_nodes(1, NodeType.INPUT, 0, input_group=0)   # 0
    st.new_nodes(1, NodeType.OUTPUT, 1)                  # 1
    st.merge(torch.tensor([1]), torch.tensor([0]))
    assert st.node_type_of(1) == I
    g = st.finish([], [])
    assert g.node_type.tolist() == [I] and g.node_io_index.tolist() == [0]


# ---------------------------------------------------------------- entries
def test_add_entries_says_whether_it_placed_the_tensor():
    st, m = _state((3,))
    nodes = st.new_nodes(3, NodeType.HIDDEN, 1)
    assert st.add_entries(m.p0, nodes, EntryKind.BIAS) is True
    assert st.add_entries(m.p0, nodes, EntryKind.BIAS) is False      # already placed
    assert st.add_entries(torch.zeros(3), nodes, EntryKind.BIAS) is False  # not a model parameter
    assert st.add_entries(None, nodes, EntryKind.BIAS) is False
    assert st.unclaimed() == []


def test_errors_noted_is_true_exactly_when_a_note_says_an_op_was_not_followed():
    st, _ = _state()
    assert st.errors_noted() is False
    st.notes = ["something else", "tied/shared weights: x"]
    assert st.errors_noted() is False
    st.notes.append("op not followed: aten.foo (1 call)")
    assert st.errors_noted() is True


# ----------------------------------------------------------------- finish
def test_finish_gives_hidden_units_io_index_minus_one_and_depths_scaled_by_the_deepest():
    st, m = _state((2, 2), (2,))
    x = st.new_nodes(2, NodeType.INPUT, 0, input_group=0)
    h = st.new_nodes(2, NodeType.HIDDEN, 1)
    y = st.new_nodes(1, NodeType.OUTPUT, 2)
    st.add_edges(m.p0, (2, 2), x.view(1, 2), h.view(2, 1), 0)
    st.mark_outputs(y.tolist())
    g = st.finish([1], [])      # p1 left over: one TENSOR node
    assert g.num_nodes == 6
    assert g.node_type.tolist() == [I, I, H, H, O, T]
    assert g.node_io_index.tolist() == [0, 1, -1, -1, 0, -1]
    assert g.node_depth.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0, 0.0]


def test_finish_gives_an_unmarked_output_unit_io_index_minus_one():
    st, _ = _state()
    st.new_nodes(1, NodeType.OUTPUT, 1)
    st.new_nodes(1, NodeType.OUTPUT, 1)
    st.mark_outputs([1])
    g = st.finish([], [])
    assert g.node_type.tolist() == [O, O]
    assert g.node_io_index.tolist() == [-1, 0]


def test_finish_with_every_unit_at_depth_zero_gives_depth_zero():
    st, _ = _state()
    st.new_nodes(2, NodeType.INPUT, 0, input_group=0)
    g = st.finish([], [])
    assert g.node_depth.tolist() == [0.0, 0.0]


def test_finish_with_only_fallback_tensors_gives_one_tensor_node_each_at_depth_zero():
    st, _ = _state((3,), (2, 2))
    g = st.finish([0, 1], [])
    assert g.num_nodes == 2
    assert g.node_type.tolist() == [T, T]
    assert g.node_io_index.tolist() == [-1, -1]
    assert g.node_depth.tolist() == [0.0, 0.0]
    assert g.entry_node.tolist() == [0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("bad", [[[3]], [[-1]]])
def test_finish_refuses_an_edge_endpoint_outside_the_units(bad):
    # one endpoint just past the last unit (n_raw) or below 0: a mapper bug, caught before assembling
    st, m = _state((1, 2))
    x = st.new_nodes(2, NodeType.INPUT, 0, input_group=0)
    st.new_nodes(1, NodeType.OUTPUT, 1)
    st.add_edges(m.p0, (1, 2), x.view(1, 2), torch.tensor(bad), 0)
    with pytest.raises(AssertionError, match="edge endpoints of p0 out of range"):
        st.finish([], [])


def test_finish_accepts_the_last_unit_as_an_edge_endpoint():
    st, m = _state((1, 2))
    x = st.new_nodes(2, NodeType.INPUT, 0, input_group=0)
    st.new_nodes(1, NodeType.OUTPUT, 1)
    st.add_edges(m.p0, (1, 2), x.view(1, 2), torch.tensor([[2]]), 0)
    g = st.finish([], [])
    assert g.edge_index.tolist() == [[0, 1], [2, 2]]


# ----------------------------------------------------------------- values
def test_spatial_positions_of_a_2d_map_are_row_major_and_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pos = spatial_positions((2, 3))
    assert pos.tolist() == [[-1.0, -1.0], [-1.0, 0.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 0.0], [1.0, 1.0]]


def test_a_single_channel_flattened_into_a_linear_feeds_every_column_from_that_channel():
    st, _ = _state()
    ch = st.new_nodes(1, NodeType.HIDDEN, 3)
    nodes, pos = input_columns(st, Val(own_nodes=ch), 4)
    assert nodes.tolist() == [0, 0, 0, 0]
    assert pos.tolist() == [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]   # a guessed 2 x 2 map
    assert st.num_raw_nodes == 1


def test_a_value_with_no_units_read_by_a_linear_gets_fresh_hidden_columns_at_its_depth():
    st, _ = _state()
    nodes, pos = input_columns(st, Val(own_nodes=torch.zeros(0, dtype=torch.long), depth=2), 3)
    assert nodes.tolist() == [0, 1, 2] and pos is None
    assert [st.node_type_of(i) for i in range(3)] == [H, H, H]
    assert st._depth == [2, 2, 2]


def test_finish_scales_depths_by_a_deepest_depth_of_one():
    st, _ = _state()
    st.new_nodes(2, NodeType.INPUT, 0, input_group=0)
    y = st.new_nodes(1, NodeType.OUTPUT, 1)
    st.mark_outputs(y.tolist())
    assert st.finish([], []).node_depth.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [[0, 3], [-1, 0], [3]])
def test_finish_refuses_entries_on_units_that_do_not_exist(bad):
    st, m = _state((len(bad),))
    st.new_nodes(3, NodeType.HIDDEN, 1)
    st.add_entries(m.p0, torch.tensor(bad), EntryKind.BIAS)
    with pytest.raises(AssertionError, match="entries of p0 on nonexistent nodes"):
        st.finish([], [])


def test_edge_positions_keep_the_default_dtype_of_the_build():
    st, m = _state((2, 2))
    x = st.new_nodes(2, NodeType.INPUT, 0, input_group=0)
    y = st.new_nodes(2, NodeType.OUTPUT, 1)
    st.add_edges(m.p0, (2, 2), x.view(1, 2), y.view(2, 1), 0)
    g = st.finish([], [])
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pos = g.edge_pos
    finally:
        torch.set_default_dtype(old)
    assert pos.dtype == old and pos.tolist() == [[0.0, 0.0]] * 4


# ------------------------------------------------------- nodes and outputs
def test_token_sets_not_fed_by_a_network_input_are_ordered_after_the_inputs_in_creation_order():
    st, _ = _state()
    st.new_nodes(2, NodeType.INPUT, 0)                  # 0, 1: a token set (no input group)
    st.new_nodes(1, NodeType.INPUT, 0)                  # 2: a second token set
    st.new_nodes(2, NodeType.INPUT, 0, input_group=5)   # 3, 4: a network input
    assert st.num_raw_nodes == 5
    g = st.finish([], [])
    assert g.node_io_index.tolist() == [2, 3, 4, 0, 1]
    assert st._token_groups == 2


def test_outputs_are_numbered_by_their_first_position_and_an_input_read_as_output_becomes_output():
    st, _ = _state()
    x = st.new_nodes(1, NodeType.INPUT, 0, input_group=0)   # 0
    h = st.new_nodes(2, NodeType.HIDDEN, 1)                 # 1, 2
    st.mark_outputs([2, int(x[0]), 2, 1])
    g = st.finish([], [])
    assert g.node_type.tolist() == [O, O, O]
    assert g.node_io_index.tolist() == [1, 3, 0]
    assert h.tolist() == [1, 2]


def test_a_weight_used_again_is_not_placed_twice_and_merges_its_second_use_with_the_first():
    st, m = _state((2, 2))
    x = st.new_nodes(2, NodeType.INPUT, 0, input_group=0)   # 0, 1
    h = st.new_nodes(2, NodeType.HIDDEN, 1)                 # 2, 3
    a = st.new_nodes(2, NodeType.HIDDEN, 2)                 # 4, 5
    b = st.new_nodes(2, NodeType.HIDDEN, 3)                 # 6, 7
    assert st.add_edges(m.p0, (2, 2), x.view(1, 2), h.view(2, 1), 0) is True
    assert st.add_edges(m.p0, (2, 2), a.view(1, 2), b.view(2, 1), 0) is False
    assert st.reused == ["p0"]
    assert [st.find(i) for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    g = st.finish([], [])
    assert g.num_nodes == 4 and g.num_edges == 4
    assert torch.equal(g.node_depth, torch.tensor([2 / 3, 2 / 3, 1.0, 1.0]))


def test_an_empty_model_gives_an_empty_graph_with_integer_node_tensors():
    st, _ = _state()
    g = st.finish([], [])
    assert g.num_nodes == 0
    assert g.node_type.dtype == torch.long and g.node_io_index.dtype == torch.long
    assert g.node_depth.dtype == torch.float32


def test_node_depths_are_float32_whatever_the_default_dtype():
    st, _ = _state()
    st.new_nodes(1, NodeType.INPUT, 0, input_group=0)
    st.new_nodes(1, NodeType.HIDDEN, 1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = st.finish([], [])
    finally:
        torch.set_default_dtype(old)
    assert g.node_depth.dtype == torch.float32 and g.node_depth.tolist() == [0.0, 1.0]


def test_a_weight_with_no_entries_gives_no_edge_positions_even_with_nonzero_positions():
    st, m = _state((0, 3))
    x = st.new_nodes(3, NodeType.INPUT, 0, input_group=0)
    st.add_edges(m.p0, (0, 3), torch.zeros(0, 1, dtype=torch.long), x.view(1, 3), 0,
                 pos=torch.tensor([0.5, 0.5]))
    g = st.finish([], [])
    assert g.num_edges == 0
    assert g.has_edge_pos is False

"""The chunked no-grad step (l2o/fast) computes what the differentiable forward computes."""
import copy
import functools
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o
import tasks
from l2o.fast import backend as backend_mod
from l2o.fast import native
from l2o.fast import plan as plan_mod
from l2o.fast.backend import ChunkedBackend, fused_kernels, select_impl
from l2o.graph.blocks import ScatterBlock, edge_blocks
from l2o.layout import tensor_layout
from lopt_helpers import seeded_weights

# float16 edge states: each state rounded to 11 significant bits (relative 2^-11)
HALF_RTOL = 1e-2

MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), None),
    # grouped and depthwise convs, then a flatten: edge positions vary along a row
    "grouped_conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv1d(8, 8, 3, groups=8),
                                             nn.Flatten(), nn.Linear(8 * 4, 3)), (torch.randn(2, 4, 8),)),
    "conv2d_bn": (lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)),
                  (torch.randn(2, 3, 6, 6),)),
    "embedding_transformer": (lambda: nn.Sequential(nn.Embedding(11, 16),
                                                    nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)),
                              (torch.randint(0, 11, (2, 5)),)),
    "conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1)),
                       (torch.randn(2, 4, 5, 5),)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 4, 3), nn.ReLU(), nn.ConvTranspose3d(4, 4, 2, groups=2), nn.Flatten(),
                                     nn.Linear(4 * 3 * 3 * 3, 3)), (torch.randn(2, 2, 4, 4, 4),)),
}


@pytest.fixture(params=[(5, 1), (37, 1), (10**6, 1), (5, 8)], ids=["chunk5", "chunk37", "one_run", "dense_runs_longer"])
def chunk(request, monkeypatch):
    """Tiny chunks force runs of single rows, several runs per group and per
    tensor; a huge one puts each tensor in one run. The same run length with
    the kernels as without (by default the fused GMN's runs are longer), and
    over dense blocks either the same or (``dense_runs_longer``, as the fused
    GMN's by default) 8x longer than the statistics, scatter and node runs."""
    chunk, dense = request.param
    monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK", chunk)
    monkeypatch.setattr(backend_mod, "CHUNKED", {cls: (module, 1, 1, dense)
                                                 for cls, (module, *_) in backend_mod.CHUNKED.items()})
    return chunk


def chunked_step(lopt, graph, flat, grad, state, **options):
    """The flat chunked step, fused where the ``kernels`` fixture (``L2O_NATIVE``)
    lets the kernels load (``options``: :class:`ChunkedBackend`'s)."""
    kernels = fused_kernels(lopt, "cpu") if native.enabled() else None
    return ChunkedBackend(lopt, graph, kernels, **options).step_flat(flat, grad, state)


gmn_step = mlp_step = chunked_step


def _scrambled(lopt, seed: int = 0):
    return seeded_weights(lopt, seed).requires_grad_(False)


def _random_state(lopt, flat, seed=1):
    g = torch.Generator().manual_seed(seed)
    state = lopt.init_state(flat)
    state["m"] = torch.randn(state["m"].shape, generator=g)
    state["v"] = torch.rand(state["v"].shape, generator=g)
    grad = torch.randn(flat.shape, generator=g)
    # entries with (almost) no gradient history, where Adam's eps matters
    state["v"][::7], grad[::7] = 1e-18, 0.0
    state["v"][::11], state["m"][:, ::11], grad[::11] = 0.0, 0.0, 0.0
    state["step"] = torch.tensor(4.0)
    return state, grad


def _compare(lopt, fast_step, graph, flat, entry_step=None, rtol=1e-4):
    state, grad = _random_state(lopt, flat)
    if entry_step is not None:
        state["entry_step"] = entry_step
    with torch.no_grad():
        expected, expected_state = lopt(graph, flat, grad, {k: v.clone() for k, v in state.items()})
    got, got_state = fast_step(lopt, graph, flat, grad, {k: v.clone() for k, v in state.items()})
    scale = expected.abs().max()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0.1 * rtol * float(scale))
    for key in ("m", "v", "step") + (("entry_step",) if entry_step is not None else ()):
        torch.testing.assert_close(got_state[key], expected_state[key])


@pytest.mark.parametrize("edge_states", ["float32", "recompute", "float16"])
@pytest.mark.parametrize("name", MODELS)
def test_gmn_fast_step_equals_forward(name, chunk, kernels, edge_states):
    """Every way of carrying edge states between passes: kept for the whole
    graph, recomputed per run from its features (large models), or kept as
    half floats (equal to the rounding of the states: ~3 significant digits)."""
    torch.manual_seed(0)
    make, example = MODELS[name]
    model = make()
    graph = l2o.build_graph(model, example)
    flat = graph.gather([p.detach() for p in model.parameters()])
    step, rtol = _gmn_step_keeping(edge_states)
    _compare(_scrambled(l2o.GMNLOpt()), step, graph, flat, rtol=rtol)


def _gmn_step_keeping(edge_states: str):
    """The chunked GMN step with these edge states, and its tolerance (half states: HALF_RTOL)."""
    return functools.partial(chunked_step, edge_states=edge_states), 1e-4 if edge_states != "float16" else HALF_RTOL


def _per_tensor_steps(graph):
    """Entry step counts that differ between tensors (0: a tensor's first step)."""
    per_tensor = torch.tensor([float((3 * k) % 7) for k in range(graph.num_tensors)])
    return per_tensor[graph.tensor_id]


@pytest.mark.parametrize("name", ["mlp", "conv2d_bn", "embedding_transformer"])
def test_per_tensor_step_counts_on_both_paths(name, kernels):
    """``entry_step`` (tensors with their own counters) sets each tensor's bias
    correction: the chunked step agrees with the forward, and the forward's
    Adam direction is that of the tensor's own count."""
    torch.manual_seed(0)
    make, example = MODELS[name]
    model = make()
    graph = l2o.build_graph(model, example)
    flat = graph.gather([p.detach() for p in model.parameters()])
    steps = _per_tensor_steps(graph)
    _compare(_scrambled(l2o.GMNLOpt()), gmn_step, graph, flat, steps.clone())
    layout = tensor_layout(graph.param_shapes)
    _compare(_scrambled(l2o.MLPLOpt()), mlp_step, layout, layout.gather(graph.scatter(flat)),
             _per_tensor_steps(layout))

    from l2o import features as F_
    state, grad = _random_state(l2o.GMNLOpt(), flat)
    with_counts = F_.update_state(dict(state, entry_step=steps), grad)
    direction = F_.adam_direction(with_counts)
    for k in range(graph.num_tensors):
        sel = graph.tensor_id == k
        alone = F_.adam_direction({"m": with_counts["m"][:, sel], "v": with_counts["v"][sel],
                                   "step": steps[sel][0] + 1.0})
        torch.testing.assert_close(direction[sel], alone)
    assert not torch.allclose(direction, F_.adam_direction(F_.update_state(state, grad)))


@pytest.mark.parametrize("name", ["mlp", "embedding_transformer"])
def test_mlp_fast_step_equals_forward(name, chunk, kernels):
    torch.manual_seed(0)
    make, example = MODELS[name]
    model = make()
    layout = tensor_layout([p.shape for p in model.parameters()])
    flat = layout.gather([p.detach() for p in model.parameters()])
    _compare(_scrambled(l2o.MLPLOpt()), mlp_step, layout, flat)


@pytest.mark.parametrize("edge_states", ["float32", "float16"])
def test_irregular_edges_take_the_scatter_runs(chunk, kernels, edge_states):
    """A scatter run (torch ops) beside a dense one: with kept states, one
    buffer holds the scatter run's states as [De, L] rows and the dense run's
    in the fused kernels' own order."""
    graph = l2o.build_graph(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    graph.edge_index = graph.edge_index.clone()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    graph.edge_index[1, :12] = graph.edge_index[1, :12][perm]  # no block pattern left in the first layer
    assert isinstance(edge_blocks(graph)[0], ScatterBlock)
    flat = torch.randn(graph.num_params)
    step, rtol = _gmn_step_keeping(edge_states)
    _compare(_scrambled(l2o.GMNLOpt()), step, graph, flat, rtol=rtol)


def test_node_ids_that_are_not_ranges_take_the_gather_path(chunk, kernels):
    """Relabel the nodes at random: blocks stay dense but their rows are no
    longer a range of node ids."""
    make, example = MODELS["grouped_conv1d"]
    graph = l2o.build_graph(make(), example)
    new_id = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(0))
    old_of_new = torch.argsort(new_id)
    graph.node_type, graph.node_io_index, graph.node_depth = (
        graph.node_type[old_of_new], graph.node_io_index[old_of_new], graph.node_depth[old_of_new])
    graph.edge_index, graph.entry_node = new_id[graph.edge_index], new_id[graph.entry_node]
    runs = [r for r in plan_mod.ChunkPlan(graph).edge_runs if isinstance(r, plan_mod.DenseRun)]
    if chunk > 5:  # (runs of one row are trivially ranges)
        assert any(r.row_range is None for r in runs)
    flat = torch.randn(graph.num_params, generator=torch.Generator().manual_seed(1))
    _compare(_scrambled(l2o.GMNLOpt()), gmn_step, graph, flat)


def test_half_edge_states_saturate_instead_of_overflowing(kernels):
    """Edge states beyond the half range are kept as +-65504 (both paths), so
    the step stays finite where float32 states would have been exact."""
    torch.manual_seed(0)
    make, example = MODELS["mlp"]
    model = make()
    graph = l2o.build_graph(model, example)
    flat = graph.gather([p.detach() for p in model.parameters()])
    lopt = _scrambled(l2o.GMNLOpt())
    lopt.edge_feat.bias.fill_(1e6)                    # every encoded edge state ~1e6
    state, grad = _random_state(lopt, flat)
    backend = ChunkedBackend(lopt, graph, fused_kernels(lopt, "cpu") if native.enabled() else None,
                             edge_states="float16")
    update, new_state = backend.step_flat(flat, grad, state)
    kept = next(t for key, t in backend.plan._buffers.items() if key[0] == "edge_states")
    assert kept.dtype == torch.float16
    assert kept.abs().max() == torch.finfo(torch.float16).max
    assert torch.isfinite(kept).all() and torch.isfinite(update).all()
    assert torch.isfinite(new_state["m"]).all()


def test_edge_states_is_checked_and_reaches_the_step(kernels):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with pytest.raises(ValueError, match="edge_states must be one of"):
        l2o.GMNOptimizer(model, edge_states="half")
    with pytest.raises(ValueError, match="only the GMN has edge states"):
        ChunkedBackend(l2o.MLPLOpt(), tensor_layout([p.shape for p in model.parameters()]), edge_states="float16")
    x = torch.randn(16, 64)
    steps = {}
    for edge_states in ("float32", "float16"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = l2o.GMNOptimizer(m, edge_states=edge_states, impl="chunked")
        for _ in range(3):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        assert opt.backend.edge_states == edge_states
        kept = [t for key, t in opt.backend.plan._buffers.items() if key[0] == "edge_states"]
        assert [t.dtype for t in kept] == [getattr(torch, edge_states)]
        steps[edge_states] = torch.cat([p.detach().flatten() for p in m.parameters()])
    torch.testing.assert_close(steps["float16"], steps["float32"], rtol=1e-3, atol=1e-6)


def test_gmn_fast_step_without_the_nominal_term(kernels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 19), nn.Tanh(), nn.Linear(19, 3))
    graph = l2o.build_graph(model)
    lopt = _scrambled(l2o.GMNLOpt(nominal=False))
    _compare(lopt, gmn_step, graph, graph.gather([p.detach() for p in model.parameters()]))


def test_fused_kernels_build_where_there_is_a_compiler(monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.delenv("L2O_NATIVE", raising=False)
    assert native.load(8, 8, 16) is not None, native.status()
    assert native.status() == "fused C kernels in use"
    monkeypatch.setenv("L2O_NATIVE", "0")
    assert native.load(8, 8, 16) is None and "disabled" in native.status()


@pytest.mark.parametrize("cpu", ["avx512", "avx2"])
def test_both_libraries_take_16_lanes_only_on_avx512_in_tiles_of_their_own(cpu, monkeypatch):
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    flags = "flags\t\t: fpu sse2 avx avx2 fma" + (" avx512f avx512bw" if cpu == "avx512" else "") + "\n"
    monkeypatch.setattr(native, "_cpu_flags", lambda: flags)
    gmn, mlp = native._variants((8, 8, 16, 0)), native._variants((8, 0, 0, 32))
    fallbacks = [["-march=native"], ["-DVB=4"]]
    if cpu == "avx512":
        assert gmn == [["-march=native", "-DVB=16", "-DT=1"], *fallbacks]
        assert mlp == [["-march=native", "-DVB=16", "-DT=2"], *fallbacks]
    else:
        assert gmn == mlp == fallbacks


# every flag set either library may be built with on this machine
_FLAG_SETS = [list(f) for f in dict.fromkeys(tuple(f) for sizes in ((8, 8, 16, 0), (8, 0, 0, 32))
                                             for f in native._variants(sizes))]


@pytest.mark.slow
@pytest.mark.parametrize("flags", _FLAG_SETS, ids=" ".join)
def test_each_vector_width_the_kernels_build_with_computes_the_forwards_step(flags, monkeypatch, tmp_path):
    """native.py builds with the first of its flag sets that compiles (16
    lanes on AVX-512, one or two vectors per tile, then -march=native's 8,
    then a portable 4): every set this machine offers gives the forward's
    step, for both metanetworks, partial tiles included."""
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.delenv("L2O_NATIVE", raising=False)
    monkeypatch.setenv("L2O_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_variants", lambda sizes: [flags])
    monkeypatch.setattr(plan_mod, "DEFAULT_CHUNK", 37)   # runs that end mid-tile
    native.forget()
    try:
        for name in ("grouped_conv1d", "embedding_transformer"):
            torch.manual_seed(0)
            make, example = MODELS[name]
            _both_fused_steps_equal_the_forward(make(), example)
    finally:
        native.forget()


def _both_fused_steps_equal_the_forward(model, example=None):
    """The fused step of each metanetwork (scrambled weights) against its forward on ``model``."""
    graph = l2o.build_graph(model, example)
    flat = graph.gather([p.detach() for p in model.parameters()])
    lopt = _scrambled(l2o.GMNLOpt())
    kernels = fused_kernels(lopt, "cpu")
    assert kernels is not None, native.status()
    for edge_states in ("float32", "recompute") + (("float16",) if kernels.half_states else ()):
        _compare(lopt, lambda *a: gmn_step(*a, edge_states=edge_states), graph, flat,
                 rtol=HALF_RTOL if edge_states == "float16" else 1e-4)
    layout = tensor_layout(graph.param_shapes)
    lopt = _scrambled(l2o.MLPLOpt())
    assert fused_kernels(lopt, "cpu") is not None, native.status(mlp_hidden=lopt.hidden)
    _compare(lopt, mlp_step, layout, layout.gather(graph.scatter(flat)))


def test_the_kernels_thread_on_torchs_own_openmp_runtime():
    """Where torch runs on OpenMP the kernels link the runtime it loaded, so
    their loops run on its thread pool: loading them maps no second runtime."""
    if (native.compiler() is None or "OpenMP" not in torch.__config__.parallel_info()
            or not os.path.exists("/proc/self/maps")):
        pytest.skip("no C compiler, torch without OpenMP, or not Linux")
    runtime = native.torch_openmp_runtime()
    assert runtime is not None and runtime.exists()
    assert native._threading()[0][1][0] == str(runtime)

    def mapped_runtimes():
        with open("/proc/self/maps") as f:
            return {line.split()[-1].rsplit("/", 1)[-1] for line in f if "omp" in line.split()[-1].rsplit("/", 1)[-1]}
    before = mapped_runtimes()
    assert native.load(8, 8, 16) is not None, native.status()
    assert mapped_runtimes() == before


# each way the kernels may run their loops on this machine: torch's OpenMP pool, threads of their own
_THREADING = [pytest.param(t, id="openmp" if t[0] else "own-threads") for t in native._threading()]


@pytest.mark.slow
@pytest.mark.parametrize("threading", _THREADING)
def test_each_threading_build_on_two_threads_computes_the_forwards_step(threading, monkeypatch, tmp_path):
    """Runs long enough to be split over two threads (each thread sums its own
    copy of a round's column messages, merged after the loop; the statistics
    sums likewise): the same step as the forward, for both metanetworks."""
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.delenv("L2O_NATIVE", raising=False)
    monkeypatch.setenv("L2O_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_threading", lambda: [threading])
    native.forget()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        # 76,800 entries a weight
        _both_fused_steps_equal_the_forward(nn.Sequential(nn.Linear(300, 256), nn.ReLU(), nn.Linear(256, 300)))
    finally:
        torch.set_num_threads(threads)
        native.forget()


def test_without_a_compiler_the_step_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.delenv("L2O_NATIVE", raising=False)
    monkeypatch.setenv("L2O_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native.forget()
    try:
        assert native.load(8, 8, 16) is None
        assert "unavailable" in native.status() and "no-such-cc" in native.status()
        model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 2))
        graph = l2o.build_graph(model)
        _compare(_scrambled(l2o.GMNLOpt()), gmn_step, graph, graph.gather([p.detach() for p in model.parameters()]))
    finally:
        native.forget()


def test_metanetworks_of_other_widths(kernels):
    """Widths that are not multiples of the kernels' register blocks, and
    three message-passing rounds."""
    make, example = MODELS["grouped_conv1d"]
    model = make()
    graph = l2o.build_graph(model, example)
    flat = graph.gather([p.detach() for p in model.parameters()])
    _compare(_scrambled(l2o.GMNLOpt(node_dim=12, edge_dim=6, hidden=5, num_layers=3)), gmn_step, graph, flat)
    layout = tensor_layout([p.shape for p in model.parameters()])
    flat = layout.gather([p.detach() for p in model.parameters()])
    _compare(_scrambled(l2o.MLPLOpt(hidden=7)), mlp_step, layout, flat)


def test_first_step_statistics_match_the_forward_exactly(kernels):
    """From zero state the momenta and second moment are the gradient times
    (1 - beta): both paths must use the forward's coefficients."""
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    graph = l2o.build_graph(model)
    lopt = _scrambled(l2o.GMNLOpt())
    flat = graph.gather([p.detach() for p in model.parameters()])
    grad = torch.linspace(-3, 3, flat.numel())
    with torch.no_grad():
        _, expected = lopt(graph, flat, grad, lopt.init_state(flat))
    _, got = gmn_step(lopt, graph, flat, grad, lopt.init_state(flat))
    for key in ("m", "v"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=0)


def test_a_non_finite_input_shows_in_the_update_as_in_the_forward(kernels):
    """The optimizer skips non-finite gradients before the metanetwork runs;
    the metanetwork itself must not hide a NaN (a diverging learned optimizer
    has to be visible), on any path."""
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    graph = l2o.build_graph(model)
    flat = graph.gather([p.detach() for p in model.parameters()])
    half_states = functools.partial(gmn_step, edge_states="float16")   # saturated, but a NaN stays NaN
    for lopt, step, layout in ((_scrambled(l2o.GMNLOpt()), gmn_step, graph),
                               (_scrambled(l2o.GMNLOpt()), half_states, graph),
                               (_scrambled(l2o.MLPLOpt()), mlp_step, tensor_layout(graph.param_shapes))):
        grad = torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
        grad[3] = float("nan")
        with torch.no_grad():
            expected, _ = lopt(layout, flat, grad, lopt.init_state(flat))
        got, _ = step(lopt, layout, flat, grad, lopt.init_state(flat))
        assert not torch.isfinite(expected).all()
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))


def test_the_fused_read_out_counts_each_entry_it_could_not_apply_once():
    """An entry whose update is not finite keeps ``p * decay`` and is counted
    once, in whole vectors and in a row's partial last one (the kernels count
    lane by lane and sum at the end)."""
    from l2o.fast import kernel_calls
    kernels = kernel_calls.load(l2o.features.NUM_ENTRY_FEATURES, mh=8)
    if kernels is None:
        pytest.skip("no C compiler for the fused kernels")
    g = torch.Generator().manual_seed(0)
    nf, mh = l2o.features.NUM_ENTRY_FEATURES, 8
    run = kernels.mlp_network(torch.randn(1, mh, nf, generator=g), torch.randn(mh, generator=g),
                              torch.randn(mh, mh, generator=g), torch.randn(mh, generator=g),
                              torch.randn(2, mh, generator=g), torch.randn(2, 1, generator=g), 0.1, 1.0)
    for n, bad in ((37, [0, 9, 36]), (64, [63]), (5, [])):
        x = torch.randn(nf, n, generator=g)
        x[l2o.features.ROW_G, bad] = float("nan")
        p = x[l2o.features.ROW_P].clone()   # the read-out takes p from the features
        before = p.clone()
        assert run(x, 0, torch.empty(n), apply=(p, 1e-3, 0.5)) == len(bad)
        assert torch.equal(p[bad], before[bad] * 0.5)
        good = [k for k in range(n) if k not in bad]
        assert torch.isfinite(p).all() and not torch.equal(p[good], before[good] * 0.5)


@pytest.mark.slow
def test_a_damaged_cached_kernel_library_is_rebuilt(monkeypatch, tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.delenv("L2O_NATIVE", raising=False)
    monkeypatch.setenv("L2O_CACHE", str(tmp_path / "first"))
    native.forget()
    try:
        assert native.load(8, 8, 16) is not None
        (built,) = (tmp_path / "first" / "native").glob("*.so")
        # the same entry in another cache, damaged (e.g. a disk that filled up
        # mid-copy); a fresh file, since this process has the first one mapped
        damaged = tmp_path / "second" / "native" / built.name
        damaged.parent.mkdir(parents=True)
        damaged.write_bytes(b"\x7fELF")
        monkeypatch.setenv("L2O_CACHE", str(tmp_path / "second"))
        native.forget()
        assert native.load(8, 8, 16) is not None, native.status()
        assert damaged.stat().st_size > 1000
    finally:
        native.forget()


def test_a_compiler_that_rejects_the_source_is_asked_once(monkeypatch, tmp_path):
    calls = tmp_path / "calls"
    cc = tmp_path / "failing-cc"
    cc.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'error: no' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.delenv("L2O_NATIVE", raising=False)
    monkeypatch.setenv("L2O_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(cc))
    native.forget()
    try:
        assert native.load(8, 8, 16) is None
        asked = len(calls.read_text().splitlines())
        native.forget()  # as in a new process
        assert native.load(8, 8, 16) is None
        assert len(calls.read_text().splitlines()) == asked + 1  # only `cc --version` again, no build
        assert "delete it to retry" in native.status()
    finally:
        native.forget()


@pytest.mark.parametrize("dense_factor", [None, 8])
def test_plan_runs_tile_the_flat_vector(chunk, dense_factor):
    """Runs cover the flat vector in order, within tensors, at most ``chunk``
    entries long (``dense_chunk`` over edges; a dense run at least one row)."""
    make, example = MODELS["grouped_conv1d"]
    graph = l2o.build_graph(make(), example)
    dense = chunk if dense_factor is None else dense_factor * chunk
    p = plan_mod.ChunkPlan(graph, dense_chunk=None if dense_factor is None else dense)
    edges = sorted((r.start, r.stop) for r in p.edge_runs)
    assert edges[0][0] == 0 and edges[-1][1] == graph.num_edges
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    stats = [(r.start, r.stop) for r in p.stat_runs]
    assert stats[0][0] == 0 and stats[-1][1] == graph.num_params
    assert all(a[1] == b[0] for a, b in zip(stats, stats[1:]))
    widest_row = max(b.cols for b in edge_blocks(graph) if hasattr(b, "cols"))
    for r in p.stat_runs + p.edge_runs:
        bound = dense if r.stop <= graph.num_edges else chunk
        assert r.stop - r.start <= max(bound, widest_row)
        t = p.tensor_slices[r.tensor]
        assert t.start <= r.start < r.stop <= t.stop
    if dense_factor is not None and dense < graph.num_edges:   # longer runs over edges, where they fit
        assert max(r.stop - r.start for r in p.edge_runs) > min(chunk, widest_row)


def test_plan_cuts_end_runs_where_asked_and_refuse_a_cut_inside_a_row():
    """A sharded step's span bounds (``cuts``) are run bounds of every kind of
    run -- dense (grouped convolution blocks too), scatter, statistics -- and
    a cut inside a dense block's row is refused, naming the tensor."""
    make, example = MODELS["grouped_conv1d"]
    graph = l2o.build_graph(make(), example)
    blocks = [(k, b) for k, b in enumerate(edge_blocks(graph)) if hasattr(b, "cols")]
    cuts = [b.start + b.cols * max(1, b.rows // 3) for _, b in blocks if b.rows > 1]
    cuts += [graph.num_edges + 1, graph.num_params - 1]
    plan = plan_mod.ChunkPlan(graph, 10**6, cuts=cuts)
    for runs in (plan.edge_runs, plan.stat_runs):
        bounds = {r.start for r in runs} | {r.stop for r in runs}
        covered = sorted((r.start, r.stop) for r in runs)
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
        assert {c for c in cuts if covered[0][0] < c < covered[-1][1]} <= bounds
    assert len(plan.edge_runs) > len(plan_mod.ChunkPlan(graph, 10**6).edge_runs)
    k, b = next((k, b) for k, b in blocks if b.cols > 1)
    with pytest.raises(ValueError, match=f"cuts a row of tensor {k}"):
        plan_mod.ChunkPlan(graph, 10**6, cuts=[b.start + 1])


def test_node_held_groups_close_at_a_gap():
    """A shard's node-held runs can leave gaps (FSDP2: a tensor's rows on
    another rank): a group is one contiguous range, so a gap starts a new one."""
    from l2o.fast.gmn import held_groups
    groups = held_groups([(0, 10, 14), (1, 14, 16), (2, 20, 22), (3, 22, 23)], 10**6)
    assert groups == [[(0, 10, 14), (1, 14, 16)], [(2, 20, 22), (3, 22, 23)]]


def test_node_held_runs_are_grouped_in_order_and_within_the_chunk():
    """The node-held runs (biases, norms) go through the encoder and read-out
    in groups: consecutive runs, in order, none lost, each group at most a
    chunk of entries unless a single run is longer."""
    from l2o.fast.gmn import held_groups
    runs, start = [], 100
    for k, n in enumerate([3, 4, 1, 9, 2, 2, 30, 1]):
        runs.append((k, start, start + n))
        start += n
    for chunk in (1, 5, 8, 10**6):
        groups = held_groups(runs, chunk)
        assert [r for g in groups for r in g] == runs
        for g in groups:
            assert all(a[2] == b[1] for a, b in zip(g, g[1:]))   # one contiguous range per group
            assert len(g) == 1 or g[-1][2] - g[0][1] <= chunk
        for a, b in zip(groups, groups[1:]):   # a group closes only when the next run would overflow it
            assert b[0][2] - a[0][1] > chunk
    assert len(held_groups(runs, 10**6)) == 1 and held_groups([], 5) == []


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls", [l2o.GMNOptimizer, l2o.MLPOptimizer])
def test_optimizer_takes_the_fast_path_on_large_models_and_matches(cls, use_step_path, kernels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    model[2].weight.requires_grad_(False)  # a frozen tensor: never moves
    frozen = model[2].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]

    results = {}
    for path in ("reference", "chunked"):
        use_step_path(path)
        m = copy.deepcopy(model)
        opt = cls(m)  # the shipped weights: a realistic trajectory, not a chaotic one
        _train(m, opt, batches)
        results[path] = (m, opt)
    (m_ref, opt_ref), (m_fast, opt_fast) = results["reference"], results["chunked"]
    for a, b in zip(m_ref.parameters(), m_fast.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    for key in ("m", "v"):
        torch.testing.assert_close(opt_fast._flat_state[key], opt_ref._flat_state[key])
    assert torch.equal(m_fast[2].weight, frozen)


@pytest.mark.parametrize("lopt_class", [l2o.GMNLOpt, l2o.MLPLOpt])
def test_auto_takes_the_chunked_step_only_for_large_cpu_models(monkeypatch, lopt_class):
    """Each metanetwork's own per-tensor threshold for the fused step (its
    calls per run cost differently: bench/impl_thresholds.py)."""
    monkeypatch.delenv("L2O_IMPL", raising=False)
    lopt = lopt_class()
    cases = [("chunked", "0", backend_mod.CHUNKED_MIN_PARAMS, backend_mod.CHUNKED_MIN_PARAMS_PER_TENSOR)]
    if fused_kernels(lopt, "cpu") is not None:
        cases.append(("fused", "1", backend_mod.FUSED_MIN_PARAMS, backend_mod.FUSED_MIN_PARAMS_PER_TENSOR[lopt_class]))
    for impl, native_flag, n, per_tensor in cases:
        monkeypatch.setenv("L2O_NATIVE", native_flag)
        assert select_impl(lopt, tensor_layout([(n,)]), "cpu") == impl
        assert select_impl(lopt, tensor_layout([(n - 1,)]), "cpu") == "forward"
        assert select_impl(lopt, tensor_layout([(n,)]), "cuda:0") == "forward"
        # many small tensors: the per-run loop would cost more than it saves
        many = tensor_layout([(per_tensor - 1,)] * (n // (per_tensor - 1) + 1))
        assert many.num_params >= n and select_impl(lopt, many, "cpu") == "forward"
    # the kernels make the chunked step pay off on smaller models
    assert backend_mod.FUSED_MIN_PARAMS < backend_mod.CHUNKED_MIN_PARAMS


def test_impl_names_a_backend_or_fails_clearly(monkeypatch):
    monkeypatch.delenv("L2O_IMPL", raising=False)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    graph = l2o.build_graph(model)
    lopt = l2o.GMNLOpt()
    assert select_impl(lopt, graph, "cpu") == "forward"         # tiny: the forward wins
    assert select_impl(lopt, graph, "cpu", "chunked") == "chunked"
    with pytest.raises(ValueError, match="impl must be"):
        select_impl(lopt, graph, "cpu", "fast")

    class ForwardOnly(l2o.GMNLOpt):   # may change the math: no chunked step
        pass
    with pytest.raises(ValueError, match="no chunked implementation"):
        select_impl(ForwardOnly(), graph, "cpu", "chunked")
    monkeypatch.setenv("L2O_IMPL", "chunked")     # the documented override of "auto"
    assert select_impl(lopt, graph, "cpu") == "chunked"
    assert select_impl(ForwardOnly(), graph, "cpu") == "forward"
    monkeypatch.setenv("L2O_NATIVE", "0")
    with pytest.raises(RuntimeError, match="disabled"):
        select_impl(lopt, graph, "cpu", "fused")


def test_medium_models_take_the_chunked_step_where_the_kernels_build(kernels, monkeypatch):
    """A 12k-parameter model: below the torch-ops threshold, above the fused one."""
    monkeypatch.delenv("L2O_IMPL", raising=False)
    model = nn.Sequential(nn.Linear(60, 150), nn.ReLU(), nn.Linear(150, 20))
    graph = l2o.build_graph(model)
    assert backend_mod.FUSED_MIN_PARAMS <= graph.num_params < backend_mod.CHUNKED_MIN_PARAMS
    lopt = l2o.GMNLOpt()
    assert select_impl(lopt, graph, "cpu") == ("fused" if kernels == "native" else "forward")
    assert select_impl(lopt.double(), graph, "cpu") == "forward"  # the kernels take float32 only
    assert l2o.GMNOptimizer(model, weights=None).backend.name == select_impl(lopt.float(), graph, "cpu")


# The >= 1M-parameter test models add no layer kind or shape pattern the others lack; with a
# scrambled metanetwork their 1024-wide float32 sums differ by rounding beyond rtol 1e-4.
@pytest.mark.parametrize("name", [n for n in tasks.list_tasks("all") if tasks.get_task(n).available()
                                  and tasks.get_task(n).num_params() < 1_000_000])
def test_fast_step_equals_forward_on_every_task_of_the_suite(name, kernels):
    task = tasks.get_task(name)
    model = task.init(0)
    graph = l2o.build_graph(model, task.example_inputs())
    flat = graph.gather([p.detach() for p in model.parameters()])
    _compare(_scrambled(l2o.GMNLOpt()), gmn_step, graph, flat)
    layout = tensor_layout([p.shape for p in model.parameters()])
    _compare(_scrambled(l2o.MLPLOpt()), mlp_step, layout, layout.gather([p.detach() for p in model.parameters()]))


def test_the_temporary_kernel_cache_must_be_private(monkeypatch, tmp_path):
    """Without a usable home directory the kernels are cached under the temp
    directory, whose libraries get loaded: a directory others can write is refused."""
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path))
    private = native._private_temp_dir()
    assert private.parent == tmp_path and private.stat().st_mode & 0o077 == 0
    private.chmod(0o777)
    with pytest.raises(RuntimeError, match="not a private directory"):
        native._private_temp_dir()


def test_a_gmn_with_more_rounds_than_the_fused_pass_takes_steps_with_torch_ops(kernels):
    """The fused pass runs at most ``MAX_ROUNDS`` message-passing rounds; a
    deeper GMN's dense runs take the torch ops, with the same result."""
    from l2o.fast.kernel_calls import MAX_ROUNDS
    torch.manual_seed(0)
    make, example = MODELS["mlp"]
    model = make()
    graph = l2o.build_graph(model, example)
    flat = graph.gather([p.detach() for p in model.parameters()])
    _compare(_scrambled(l2o.GMNLOpt(node_dim=8, edge_dim=4, hidden=4, num_layers=MAX_ROUNDS + 1)), gmn_step,
             graph, flat)

"""The task suite: registry, determinism, training signal, functional loss, samplers, graph coverage."""
import copy

import pytest
import torch

import tasks
from tasks.families.layers import HELDOUT_ACTIVATIONS

# One named task per family; the BatchNorm ones exercise running-stat buffers.
REPRESENTATIVES = ["mlp_digits", "cnn_digits_bn", "resnet_digits_bn", "transformer_sort",
                   "conv1d_mnist1d_bn", "autoencoder_digits", "regression_teacher",
                   "cnn_digits_gn_deep", "transformer_charlm"]


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_registry_and_suites():
    names = tasks.list_tasks()
    assert len(set(names)) == len(names)
    train, heldout = tasks.get_suite("train"), tasks.get_suite("heldout")
    assert 6 <= len(train) and 6 <= len(heldout)
    assert {t.split for t in train} == {"train"} and {t.split for t in heldout} == {"heldout"}
    assert len({t.family for t in tasks.get_suite("all")}) >= 6
    assert [t.name for t in tasks.get_suite(["mlp_digits", "cnn_digits"])] == ["mlp_digits", "cnn_digits"]
    assert len(tasks.FAMILIES) >= 6


def test_unknown_task_names_close_matches():
    with pytest.raises(KeyError, match="mlp_digits"):
        tasks.get_task("mlp_digit")
    with pytest.raises(KeyError):
        tasks.sample_task("no_such_family", 0)


def test_heldout_differs_structurally_from_train():
    """Every held-out task has a layer type, norm, activation, dataset or size absent from train."""
    def traits(task):
        model = task.init(0)
        kinds = {type(m).__name__ for m in model.modules()}
        return kinds | {task.dataset}
    train_traits = set().union(*(traits(t) for t in tasks.get_suite("train", include_unavailable=True)))
    largest_train = max(t.num_params() for t in tasks.get_suite("train", include_unavailable=True))
    for task in tasks.get_suite("heldout", include_unavailable=True):
        novel = traits(task) - train_traits
        assert novel or task.num_params() > largest_train, task.name


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_init_is_deterministic_per_seed(name):
    task = tasks.get_task(name)
    a, b, c = flat_params(task.init(0)), flat_params(task.init(0)), flat_params(task.init(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert task.num_params() == a.numel()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "transformer_charlm" else n
                                  for n in REPRESENTATIVES])
def test_adam_lowers_training_loss(name):
    task = tasks.get_task(name)
    model = task.init(0)
    batch = next(task.batches("train", seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = task.loss(model, batch).item()
    for _ in range(30):
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    assert task.loss(model, batch).item() < 0.8 * before
    metric = task.metric(model, next(task.batches("test", seed=0)))
    assert set(metric) & {"accuracy", "mse"}
    assert model.training  # metric restores the mode


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_functional_loss_equals_module_loss(name):
    task = tasks.get_task(name)
    model = task.init(0)
    twin = copy.deepcopy(model)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    loss_fn = task.loss_fn(model)
    for batch in [b for _, b in zip(range(2), task.batches("train", seed=3))]:
        functional = loss_fn(params, buffers, batch)
        module = task.loss(twin, batch)
        torch.testing.assert_close(functional, module, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(functional, list(params.values()))
    module.backward()
    for g, (_, p) in zip(grads, twin.named_parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    # BatchNorm running statistics were updated in place, exactly as the module's.
    for key, value in twin.named_buffers():
        torch.testing.assert_close(buffers[key], value)
    if any("running_mean" in k for k in buffers):
        assert not torch.equal(buffers[next(k for k in buffers if "running_mean" in k)],
                               dict(model.named_buffers())[next(k for k in buffers if "running_mean" in k)])


def test_batches_are_seeded_and_infinite():
    task = tasks.get_task("mlp_mnist1d")
    a, b, c = task.batches("train", seed=5), task.batches("train", seed=5), task.batches("train", seed=6)
    for _ in range(3):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(next(a)[0], next(c)[0])
    x, y = next(task.batches("test", seed=0))
    assert x.shape == (task.batch_size, 1, 40) and y.shape == (task.batch_size,)
    with pytest.raises(ValueError):
        next(task.batches("validation"))


@pytest.mark.parametrize("family", sorted(tasks.FAMILIES))
def test_samplers_are_reproducible(family):
    configs = []
    for seed in range(6):
        first, again = tasks.sample_task(family, seed), tasks.sample_task(family, seed)
        assert first.config == again.config and first.name == again.name
        assert first.num_params() == again.num_params()
        configs.append(repr(first.config))
    assert len(set(configs)) > 1, "the sampler ignores its seed"


HELDOUT_DATASETS = {"reverse", "chars", "mnist", "cifar10", "mnist1d_recon"}


@pytest.mark.parametrize("family", sorted(tasks.TRAIN_FAMILIES))
def test_train_samples_avoid_heldout_data_and_sizes(family):
    for seed in range(8):
        task = tasks.sample_task(family, seed, split="train")
        assert task.split == "train"
        assert task.dataset not in HELDOUT_DATASETS
        assert task.num_params() < 100_000   # the test split's "larger models" are >= 10x this
        model = task.init(0)
        loss = task.loss(model, next(task.batches("train", seed=0)))
        assert torch.isfinite(loss)


def test_train_sampler_covers_every_activation_and_norm():
    """Held-out tasks differ by architecture, size and data, not by layers the
    optimizer never met: the train samplers draw every activation and norm."""
    seen_acts, seen_norms = set(), set()
    for family in tasks.TRAIN_FAMILIES:
        for seed in range(40):
            config = tasks.sample_task(family, seed, split="train").config
            seen_acts.add(config.get("activation"))
            seen_norms.add(config.get("norm") or ("layer" if config.get("layer_norm") else None))
            seen_norms.add(config.get("block"))
    assert set(HELDOUT_ACTIVATIONS) | {"relu", "tanh", "gelu"} <= seen_acts
    assert {"batch", "group", "layer", "encoder_layer_norm_first", "prenorm_mha"} <= seen_norms


def test_validation_suite_is_disjoint_from_train_and_test():
    valid = tasks.get_suite("valid")
    assert len({t.family for t in valid}) == len(tasks.FAMILIES)
    assert all(t.split == "valid" for t in valid)
    names = {t.name for t in valid}
    assert not names & set(tasks.list_tasks("train")) and not names & set(tasks.list_tasks("heldout"))
    # sampled names resolve back to the same configuration
    for t in valid:
        assert tasks.get_task(t.name).config == t.config
    assert tasks.get_task("mlp~train~3").config == tasks.sample_task("mlp", 3, "train").config
    test_configs = [repr(t.config) for t in tasks.get_suite("heldout")]
    assert not any(repr(t.config) in test_configs for t in valid)


@pytest.mark.parametrize("family", sorted(tasks.FAMILIES))
def test_heldout_samples_run(family):
    task = tasks.sample_task(family, 0, split="heldout")
    assert task.split == "heldout"
    assert torch.isfinite(task.loss(task.init(0), next(task.batches("train", seed=0))))


def test_cli_lists_every_task(capsys):
    from tasks.__main__ import main
    main(["list"])
    out = capsys.readouterr().out
    for name in tasks.list_tasks():
        assert name in out
    main(["list", "--split", "heldout"])
    out = capsys.readouterr().out
    assert "transformer_charlm" in out and "mlp_digits " not in out


def _graph_cases():
    named = tasks.get_suite("all")
    sampled = [tasks.sample_task(f, s, split) for f in tasks.FAMILIES for s in (0, 1)
               for split in ("train", "heldout")]
    return named + sampled


@pytest.mark.parametrize("task", _graph_cases(), ids=lambda t: t.name)
def test_build_graph_covers_every_task_strictly(task):
    from l2o import build_graph
    from l2o.graph.param_graph import NodeType

    model = task.init(0)
    graph = build_graph(model, task.example_inputs(), strict=True)
    params = dict(model.named_parameters())
    # every parameter entry is held exactly once, structured: weight matrices and
    # kernels (ndim >= 2) on edges, vectors (biases, norms) on node slots, nothing on fallback
    assert graph.param_names == list(params) and graph.num_params == sum(p.numel() for p in params.values())
    assert graph.fractions()["fallback"] == 0 and not graph.unstructured
    assert graph.num_edges == sum(p.numel() for p in params.values() if p.dim() >= 2)
    assert graph.num_entries == sum(p.numel() for p in params.values() if p.dim() < 2)
    assert int(graph.edge_index.min()) >= 0 and int(graph.edge_index.max()) < graph.num_nodes
    # A unit joins itself only in a recurrent layer: W_hh entry (gate g, unit i) <- unit i, and
    # W_ih of a one-layer RNN whose head is tied to the embedding (tying makes embedding
    # dimension i and hidden unit i one unit). Every gate row then has exactly one self-loop.
    for k, s in enumerate(graph.tensor_slices[:graph.num_edge_params]):
        name = graph.param_names[graph.flat_order[k]]
        loops = int((graph.edge_index[0, s] == graph.edge_index[1, s]).sum())
        recurrent = "weight_hh" in name or (task.config.get("tied") and task.config.get("layers") == 1
                                            and "weight_ih_l0" in name)
        assert loops == (params[name].shape[0] if recurrent and task.family == "rnn" else 0), name
    # edges never end on an input neuron nor start at an output neuron (but a tied head's
    # logits are the token nodes: OUTPUT, and the embedding's sources); no fallback nodes
    types = graph.node_type[graph.edge_index]
    assert not bool((types[1] == NodeType.INPUT).any())
    assert task.config.get("tied") or not bool((types[0] == NodeType.OUTPUT).any())
    assert not bool((graph.node_type == NodeType.TENSOR).any())
    assert graph.edge_components() == 1, "the network's wiring falls apart into pieces"

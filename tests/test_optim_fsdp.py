"""ShardedGMNOptimizer on an FSDP2 (fully_shard) model: two gloo processes,
each stepping only the rows it holds, give the unsharded optimizer's updates
on the whole batch, each holding about half of the statistics; uneven and
empty row shards included."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

WORLD = 2


def _model():
    torch.manual_seed(0)
    # rows 48, 48, 40, 5 (3 + 2 over two ranks) and 1 (rank 1 holds none of the head)
    return nn.Sequential(nn.Linear(24, 48), nn.LayerNorm(48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(),
                         nn.Linear(40, 5), nn.Tanh(), nn.Linear(5, 1))


def _worker(rank: int, init_file: str, native: str, weights: str):
    os.environ["L2O_NATIVE"] = native
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    if weights == "gpt2":
        _check_gpt2(rank)
    else:
        _check_fsdp_matches_unsharded(rank, weights)
    dist.barrier()
    # as tests/test_optim_sharded.py: leave without tearing gloo down (its threads have aborted
    # a rank at teardown in loaded CI runs after every check passed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _check_fsdp_matches_unsharded(rank: int, weights: str):
    import l2o
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from l2o.fast import native
    from l2o.fast import plan as plan_mod
    from l2o.optim import ShardedGMNOptimizer
    plan_mod.DEFAULT_CHUNK = 64          # several runs per tensor and per shard
    impl = "fused" if native.enabled() and native.load(8, 8, 16) is not None else "chunked"
    edge_states = "float16" if weights == "pretrained-f16" else "recompute" if weights == "random" else "auto"
    if weights.startswith("pretrained"):
        lopt = "pretrained"
    else:
        from lopt_helpers import seeded_weights
        lopt = seeded_weights(l2o.GMNLOpt(adapt=weights == "adapt"), seed=3, scale=0.05)
    mesh = init_device_mesh("cpu", (WORLD,))
    ref_model, sh_model = _model(), _fsdp_model(mesh)
    with pytest.raises(TypeError, match="ShardedGMNOptimizer"):
        l2o.GMNOptimizer(sh_model, weights=lopt)
    if weights == "random":   # layouts it does not take: named
        import warnings

        from torch.distributed.tensor import Replicate, distribute_tensor
        half = _model()
        fully_shard(half[0], mesh=mesh)              # the other layers' parameters stay plain
        with pytest.raises(ValueError, match="'3.weight' is a plain tensor while other parameters are DTensors"):
            ShardedGMNOptimizer(half, weights=lopt)
        replicated = nn.Linear(4, 3)
        for name in ("weight", "bias"):
            setattr(replicated, name, nn.Parameter(distribute_tensor(getattr(replicated, name).detach(), mesh,
                                                                     [Replicate()])))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the graph builder's fallback warning on DTensors
            with pytest.raises(ValueError, match="'weight' is a DTensor placed"):
                ShardedGMNOptimizer(replicated, weights=lopt)
    ref = l2o.GMNOptimizer(ref_model, weights=lopt, weight_decay=1e-2, impl=impl, edge_states=edge_states)
    sharded = ShardedGMNOptimizer(sh_model, weights=lopt, weight_decay=1e-2, impl=impl, edge_states=edge_states)
    assert ref.backend.name == sharded.backend.name == impl
    # the graph is the whole model's, as the unsharded optimizer's
    assert sharded.graph.num_edges == ref.graph.num_edges and sharded.graph.num_nodes == ref.graph.num_nodes
    n = sum(p.numel() for p in ref_model.parameters())
    local = sharded._flat_state["v"].numel()
    assert local == sum(p.to_local().numel() for p in sh_model.parameters())   # the rows this rank holds
    total = torch.tensor([local])
    dist.all_reduce(total)
    assert int(total) == n
    assert abs(local - n / WORLD) <= 0.15 * n, (local, n)
    head = sh_model[7].weight.to_local()
    assert head.numel() == (5 if rank == 0 else 0)   # an empty shard takes part too
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 16, 24, generator=g), torch.randn(2, 16, 1, generator=g)
    for _ in range(3):
        ref.zero_grad()
        F.mse_loss(ref_model(x.reshape(32, 24)), y.reshape(32, 1)).backward()   # the whole batch
        ref.step()
        sharded.zero_grad()
        F.mse_loss(sh_model(x[rank]), y[rank]).backward()   # this rank's half; FSDP averages the gradients
        sharded.step()
    # the updates agree to float rounding (sums over ranks add in another order: ~1e-8 here);
    # leaving out the all-reduce of the messages summed onto either end moves them by ~1e-6
    for (name, a), b, p0 in zip(ref_model.named_parameters(), sh_model.parameters(), _model().parameters()):
        torch.testing.assert_close(b.full_tensor() - p0.detach(), a.detach() - p0.detach(), rtol=1e-4, atol=1e-7,
                                   msg=name)
    for p, q in zip(sh_model.parameters(), ref_model.parameters()):
        # the statistics sharded as the parameter is (what torch.distributed.checkpoint saves)
        state = sharded.state[p]
        assert state["m"].shape == (4, *p.shape) and state["v"].shape == p.shape and "shard" not in state
        assert state["m"].placements[0].dim == 1 and state["v"].to_local().shape == p.to_local().shape
        torch.testing.assert_close(state["v"].full_tensor(), ref.state[q]["v"], rtol=1e-3, atol=1e-5)
        if sharded.lopt.adapt:
            torch.testing.assert_close(sharded.state[p]["log_lr"], ref.state[q]["log_lr"], rtol=1e-5, atol=1e-6)
    whole = sharded.full_state_dict(to=0)
    if whole is not None:
        ref_state = ref.state_dict()["state"]
        for i in range(len(ref_state)):
            for key in ("m", "v"):
                torch.testing.assert_close(whole["state"][i][key], ref_state[i][key], rtol=1e-3, atol=1e-5)
    # the whole state restores into another FSDP2 optimizer, each rank keeping its rows
    got = [whole]
    dist.broadcast_object_list(got, src=0)
    other = _fsdp_model(mesh)
    restored = ShardedGMNOptimizer(other, weights=lopt, weight_decay=1e-2, impl=impl)
    restored.load_state_dict(got[0])
    for key in ("m", "v"):
        assert torch.equal(restored._flat_state[key], sharded._flat_state[key])
    own = ShardedGMNOptimizer(other, weights=lopt, weight_decay=1e-2, impl=impl)   # and this rank's own shard
    own.load_state_dict(sharded.state_dict())
    for key in ("m", "v"):
        assert torch.equal(own._flat_state[key], sharded._flat_state[key])
    # a non-finite gradient on one rank's rows skips the tensor on both ranks
    before = {name: p.to_local().clone() for name, p in sh_model.named_parameters()}
    sharded.zero_grad()
    F.mse_loss(sh_model(x[rank]), y[rank]).backward()
    if rank == 1:
        sh_model[0].weight.grad.to_local()[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        sharded.step()
    assert torch.equal(sh_model[0].weight.to_local(), before["0.weight"])
    assert not torch.equal(sh_model[3].weight.to_local(), before["3.weight"])


def _check_gpt2(rank: int):
    """Hugging Face GPT-2 (Conv1D weights [in, out]: dim 0 is the source side;
    tied embedding and head), one fully_shard per block and the root: the
    layouts. Its tolerance is that of rounding-amplified updates, too loose to
    see a missing message all-reduce, which the MLP case with the shipped
    weights pins."""
    import transformers
    from torch.distributed.fsdp import fully_shard

    import l2o
    from l2o.optim import ShardedGMNOptimizer
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def make():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config)

    ref_model, sh_model = make(), make()
    for block in sh_model.transformer.h:
        fully_shard(block)
    fully_shard(sh_model)
    ref, sharded = l2o.GMNOptimizer(ref_model), ShardedGMNOptimizer(sh_model)
    assert sharded.graph.num_edges == ref.graph.num_edges and sharded.graph.num_nodes == ref.graph.num_nodes
    assert sharded._flat_state["v"].numel() == sum(p.to_local().numel() for p in sh_model.parameters())
    assert sharded._flat_state["v"].numel() <= 0.55 * ref._flat_state["v"].numel()
    tokens = torch.randint(0, 50, (WORLD, 4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        ref.zero_grad()
        ref_model(tokens.reshape(-1, 16), labels=tokens.reshape(-1, 16)).loss.backward()
        ref.step()
        sharded.zero_grad()
        sh_model(tokens[rank], labels=tokens[rank]).loss.backward()
        sharded.step()
    # rounding in the gradients (FSDP's reduce-scatter, the key bias's zero-in-exact-arithmetic
    # gradient: README, attention symmetries) moves the updates by up to ~3e-4 of their scale
    for (name, a), b, p0 in zip(ref_model.named_parameters(), sh_model.parameters(), make().parameters()):
        update = a.detach() - p0.detach()
        assert float((b.full_tensor() - a.detach()).abs().max()) <= 2e-3 * float(update.abs().max()), name


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("native,weights", [("1", "random"), ("0", "random"), ("1", "adapt"), ("1", "pretrained"),
                                            ("1", "pretrained-f16"), ("1", "gpt2")],
                         ids=["native", "torch", "native-controller", "native-shipped-weights",
                              "native-float16-states", "hf-gpt2"])
def test_fsdp2_step_equals_the_unsharded_one_on_two_gloo_processes(tmp_path, native, weights):
    mp.spawn(_worker, args=(str(tmp_path / "init"), native, weights), nprocs=WORLD, join=True)


def _fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard
    model = _model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _dcp_worker(rank: int, world: int, init_file: str, ckpt: str, phase: str):
    """``save``: 2 steps, the optimizer's state through torch.distributed.checkpoint and,
    whole, through full_state_dict; ``load``: a fresh optimizer at this world size
    restores the checkpoint and must hold the saved statistics."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from l2o.optim import ShardedGMNOptimizer
    model = _fsdp_model(init_device_mesh("cpu", (world,)))
    opt = ShardedGMNOptimizer(model)
    if phase == "save":
        g = torch.Generator().manual_seed(rank)
        for _ in range(2):
            opt.zero_grad()
            F.mse_loss(model(torch.randn(8, 24, generator=g)), torch.randn(8, 1, generator=g)).backward()
            opt.step()
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
        whole = opt.full_state_dict(to=0)
        if rank == 0:
            torch.save(whole["state"], os.path.join(ckpt, "whole.pt"))
    else:
        loaded = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(loaded, checkpoint_id=ckpt)
        set_optimizer_state_dict(model, opt, loaded["optim"])
        whole = opt.full_state_dict(to=0)
        if rank == 0:
            saved = torch.load(os.path.join(ckpt, "whole.pt"))
            assert float(saved[0]["v"].abs().sum()) > 0
            for i, entry in whole["state"].items():
                for key in ("m", "v", "step"):
                    assert torch.equal(entry[key], saved[i][key]), (i, key)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("load_world", [2, 1])
def test_fsdp2_state_goes_through_torch_distributed_checkpoint_and_reshards(tmp_path, load_world):
    """The FSDP2 optimizer's state dict is DTensors sharded as the parameters:
    saved by torch.distributed.checkpoint at 2 ranks, it restores exactly at 2
    ranks and at 1 (DCP reshards it)."""
    ckpt = str(tmp_path / "ckpt")
    mp.spawn(_dcp_worker, args=(2, str(tmp_path / "init_save"), ckpt, "save"), nprocs=2, join=True)
    mp.spawn(_dcp_worker, args=(load_world, str(tmp_path / "init_load"), ckpt, "load"), nprocs=load_world, join=True)

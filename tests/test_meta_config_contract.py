"""The meta-training side modules pinned where the mutation run
(docs/mutation.md) found them unchecked: the config's rules and messages
(l2o/meta/config.py), the torchrun helpers with ranks as threads of this
process (l2o/meta/dist.py), the task pool's draws and caches
(l2o/meta/tasks_pool.py), the run summary (l2o/meta/summary.py), the fault
injection switch (l2o/meta/faults.py) and the quick evaluation
(l2o/meta/quick_eval.py)."""
import dataclasses
import json
import math
import random
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch import nn

from l2o.meta import config as C
from l2o.meta import dist as D
from l2o.meta import faults
from l2o.meta.config import ConfigError, MetaConfig

# ---------------------------------------------------------------- config: the one set of defaults

DEFAULTS = dict(lopt="gmn", lopt_config={}, init_from="", freeze=[], suite="train", eval_task="conv1d~valid~0",
                inner_steps=200, inner_steps_max=0, unroll=10, meta_batch=4, meta_objective="norm",
                meta_log_floor=0.0, meta_data="train", second_order=False, batch_runs=False, diverge_factor=10.0,
                estimator="tbptt", es_pairs=4, es_sigma=0.01, outer_steps=1000, lr=3e-4, weight_decay=0.0,
                warmup=50, min_lr_frac=0.1, nominal_lr_mult=1.0, clip=1.0, device="cpu", seed=0,
                out="runs/meta", checkpoint_every=50, eval_every=100, eval_steps=100, log_every=1, stop_after=0,
                progress=True, threads=0)


def test_defaults_are_the_documented_ones_and_each_instance_gets_its_own_containers():
    """Catches a field's default or its rule lost (they are built by one helper,
    at import): every key, its default, its rule; mutable defaults are fresh
    per instance."""
    cfg = MetaConfig()
    assert cfg.to_dict() == DEFAULTS
    assert C.KEYS == tuple(DEFAULTS)
    rules = {f.name: f.metadata["check"] for f in dataclasses.fields(MetaConfig)}
    assert rules["lopt_config"] == "mapping" and rules["freeze"] == "names" and rules["suite"] == "nonempty"
    assert rules["inner_steps"] == "pos_int" and rules["seed"] == "int" and rules["lr"] == "pos_float"
    assert C.CHOICES == {"lopt": ("gmn", "mlp"), "meta_objective": ("norm", "log", "raw"),
                         "meta_data": ("train", "valid"), "estimator": ("tbptt", "es", "pes")}
    a, b = MetaConfig(), MetaConfig()
    a.lopt_config["hidden"] = 8
    a.freeze.append("log_nominal")
    assert b.lopt_config == {} and b.freeze == []


def test_to_dict_is_plain_json_and_replace_keeps_the_other_keys():
    cfg = MetaConfig(lopt="mlp", lopt_config={"hidden": 8}, freeze=["log_nominal"], lr=1)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["lopt_config"] == {"hidden": 8} and d["lr"] == 1.0
    d["lopt_config"]["hidden"] = 16       # a copy: the config stays untouched
    assert cfg.lopt_config == {"hidden": 8}
    new = cfg.replace(unroll=3, seed=7)
    assert (new.unroll, new.seed, new.lopt, new.freeze) == (3, 7, "mlp", ["log_nominal"])
    assert cfg.unroll == 10 and new is not cfg
    with pytest.raises(ConfigError, match="unroll"):
        cfg.replace(unroll=0)             # replace validates as construction does


# ---------------------------------------------------------------- config: every rule, at its boundary

ACCEPTED = [("lopt", "mlp"), ("meta_objective", "log"), ("inner_steps", 1), ("unroll", 1), ("meta_batch", 1),
            ("outer_steps", 0), ("warmup", 0), ("seed", -3), ("seed", 0), ("lr", 1e-12), ("lr", 2),
            ("meta_log_floor", 0.0), ("weight_decay", 0), ("clip", 0.0), ("min_lr_frac", 1.0),
            ("diverge_factor", 0.5), ("second_order", True), ("progress", False), ("init_from", ""),
            ("suite", "x"), ("lopt_config", {"hidden": 4}), ("lopt_config", {}), ("freeze", ["a", "b.c"]),
            ("freeze", [])]


@pytest.mark.parametrize("key,value", ACCEPTED)
def test_values_at_the_edge_of_each_rule_are_accepted(key, value):
    cfg = MetaConfig(**{key: value})
    assert getattr(cfg, key) == value


REFUSED = [
    ("lopt", "adam", "lopt must be one of ('gmn', 'mlp'), got 'adam'"),
    ("estimator", "TBPTT", "estimator must be one of ('tbptt', 'es', 'pes'), got 'TBPTT'"),
    ("inner_steps", 0, "inner_steps must be >= 1, got 0"),
    ("unroll", -1, "unroll must be >= 1, got -1"),
    ("outer_steps", -1, "outer_steps must be >= 0, got -1"),
    ("inner_steps", 2.0, "inner_steps must be an integer, got 2.0"),
    ("meta_batch", True, "meta_batch must be an integer, got True"),
    ("seed", "0", "seed must be an integer, got '0'"),
    ("seed", False, "seed must be an integer, got False"),
    ("lr", 0, "lr must be > 0, got 0"),
    ("lr", 0.0, "lr must be > 0, got 0.0"),
    ("lr", -1e-3, "lr must be > 0, got -0.001"),
    ("weight_decay", -0.5, "weight_decay must be >= 0, got -0.5"),
    ("clip", "1", "clip must be a number, got '1'"),
    ("es_sigma", True, "es_sigma must be a number, got True"),
    ("meta_log_floor", None, "meta_log_floor must be a number, got None"),
    ("second_order", 1, "second_order must be true or false, got 1"),
    ("progress", "yes", "progress must be true or false, got 'yes'"),
    ("device", 0, "device must be a string, got 0"),
    ("init_from", None, "init_from must be a string, got None"),
    ("suite", "", "suite must be a non-empty string, got ''"),
    ("suite", ["train"], "suite must be a non-empty string, got ['train']"),
    ("lopt_config", [], "lopt_config must be a mapping of constructor arguments, got []"),
    ("lopt_config", None, "lopt_config must be a mapping of constructor arguments, got None"),
    ("freeze", "log_nominal", "freeze must be a list of metanetwork parameter names, got 'log_nominal'"),
    ("freeze", ["a", ""], "freeze must be a list of metanetwork parameter names, got ['a', '']"),
    ("freeze", ["a", 3], "freeze must be a list of metanetwork parameter names, got ['a', 3]"),
    ("freeze", ("a",), "freeze must be a list of metanetwork parameter names, got ('a',)"),
]


@pytest.mark.parametrize("key,value,message", REFUSED)
def test_a_bad_value_is_refused_naming_the_key_the_rule_and_the_value(key, value, message):
    with pytest.raises(ConfigError) as err:
        MetaConfig(**{key: value})
    assert str(err.value) == message


def test_numbers_of_float_keys_are_stored_as_floats_and_other_values_unchanged():
    cfg = MetaConfig(lr=1, clip=0, diverge_factor=3, inner_steps=5, suite="mix")
    assert type(cfg.lr) is float and cfg.lr == 1.0
    assert type(cfg.clip) is float and type(cfg.diverge_factor) is float
    assert type(cfg.inner_steps) is int and cfg.inner_steps == 5 and cfg.suite == "mix"


@pytest.mark.parametrize("longest,ok", [(0, True), (200, True), (201, True), (199, False), (1, False)])
def test_inner_steps_max_is_zero_or_at_least_inner_steps(longest, ok):
    if ok:
        assert MetaConfig(inner_steps=200, inner_steps_max=longest).inner_steps_max == longest
    else:
        with pytest.raises(ConfigError) as err:
            MetaConfig(inner_steps=200, inner_steps_max=longest)
        assert str(err.value) == f"inner_steps_max ({longest}) must be 0 or >= inner_steps (200)"


# ---------------------------------------------------------------- config: files, presets, precedence

@pytest.mark.parametrize("name", ["c.yaml", "c.yml"])
def test_yaml_files_are_read_with_flag_spellings_turned_into_keys(tmp_path, name):
    path = tmp_path / name
    path.write_text("outer-steps: 7\nlr: 0.5\nlopt_config:\n  hidden-size: 4\n")
    assert C.load_file(path) == {"outer_steps": 7, "lr": 0.5, "lopt_config": {"hidden-size": 4}}
    assert C.load_file(str(path)) == C.load_file(path)


def test_json_files_are_read_and_other_suffixes_are_json(tmp_path):
    for name in ("c.json", "c.cfg"):
        path = tmp_path / name
        path.write_text('{"eval-every": 3, "suite": "mix"}')
        assert C.load_file(path) == {"eval_every": 3, "suite": "mix"}
    bad = tmp_path / "c.txt"
    bad.write_text("outer-steps: 7\n")           # YAML, but not named so: parsed as JSON
    with pytest.raises(ConfigError, match=f"^{bad}: not valid JSON: "):
        C.load_file(bad)


@pytest.mark.parametrize("text", ["", "null\n", "# nothing\n"])
def test_an_empty_yaml_file_sets_nothing(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert C.load_file(path) == {}


def test_a_config_file_that_is_not_a_mapping_is_refused_naming_the_file_and_what_it_holds(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lr\n- 0.1\n")
    with pytest.raises(ConfigError) as err:
        C.load_file(path)
    assert str(err.value) == f"{path}: a config file must hold a mapping of keys, got list"


def test_a_missing_config_file_is_named(tmp_path):
    for missing in (tmp_path / "nope.yaml", tmp_path):       # absent, or a directory
        with pytest.raises(ConfigError) as err:
            C.load_file(missing)
        assert str(err.value) == f"config file not found: {missing}"


SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix()
                         if p.parent.name == "experiments" else p.name)
def test_every_shipped_config_passes_the_checks_meta_train_makes_before_training(path):
    """A config in configs/ that meta_train.py refuses at start (configs/tiny.yaml
    and small.yaml once named a test task as eval_task) is a broken command in the docs."""
    from l2o.meta.quick_eval import check_eval_task
    from l2o.meta.tasks_pool import suite_specs

    cfg = C.resolve(None, C.load_file(path), {})
    assert suite_specs(cfg.suite)
    if cfg.eval_every:
        check_eval_task(cfg.eval_task)


def test_the_tiny_config_file_is_the_tiny_preset():
    """configs/tiny.yaml says it is the same as --preset tiny."""
    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert C.resolve(None, C.load_file(path), {}).to_dict() == C.resolve("tiny").to_dict()


def test_precedence_is_defaults_then_preset_then_file_then_flags():
    cfg = C.resolve("tiny", {"unroll": 3, "lr": 0.5}, {"lr": 0.25})
    assert (cfg.unroll, cfg.lr, cfg.inner_steps, cfg.clip) == (3, 0.25, 30, 1.0)
    assert C.resolve().to_dict() == DEFAULTS
    assert C.resolve(None, None, {"seed": 4}).seed == 4
    assert C.resolve("", {"seed": 5}).seed == 5


def test_a_preset_is_copied_so_runs_never_change_it():
    before = json.dumps(C.PRESETS, sort_keys=True)
    cfg = C.resolve("tiny")
    cfg.lopt_config["hidden"] = 99
    assert json.dumps(C.PRESETS, sort_keys=True) == before and C.resolve("tiny").lopt_config == {}


def test_an_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as err:
        C.resolve("huge")
    assert str(err.value) == "unknown preset 'huge'; choose from ['small', 'tiny']"


@pytest.mark.parametrize("where", ["config file", "flags"])
def test_an_unknown_key_is_refused_naming_its_source_and_the_known_keys(where):
    given = {"outer_step": 3, "lr": 0.1, "unrol": 2}
    with pytest.raises(ConfigError) as err:
        C.resolve(None, given if where == "config file" else None, given if where == "flags" else None)
    assert str(err.value) == (f"unknown config key(s) in {where}: ['outer_step', 'unrol']; "
                              f"known keys: {sorted(DEFAULTS)}")


def test_a_retired_key_given_as_configuration_says_where_it_went():
    with pytest.raises(ConfigError) as err:
        C.resolve(None, None, {"inject_nan_steps": [1], "zzz": 1})
    assert str(err.value) == ("unknown config key(s) in flags: ['inject_nan_steps', 'zzz'] (inject_nan_steps: "
                              "no longer configuration; tests inject faults with l2o.meta.faults); "
                              f"known keys: {sorted(DEFAULTS)}")


def test_several_retired_keys_are_listed_in_one_hint(monkeypatch):
    monkeypatch.setattr(C, "RETIRED_KEYS", ("inject_nan_steps", "old_knob"))
    with pytest.raises(ConfigError) as err:
        C.resolve(None, {"old_knob": 1, "inject_nan_steps": [1]})
    assert str(err.value).startswith("unknown config key(s) in config file: ['inject_nan_steps', 'old_knob'] "
                                     "(inject_nan_steps, old_knob: no longer configuration; ")


# ---------------------------------------------------------------- config: checkpoints and resuming

def test_a_checkpoints_config_comes_back_and_a_retired_key_is_dropped_with_a_warning():
    saved = MetaConfig(lopt="mlp", unroll=3).to_dict()
    assert C.from_checkpoint(saved) == MetaConfig(lopt="mlp", unroll=3)
    with pytest.warns(UserWarning) as rec:
        cfg = C.from_checkpoint({**saved, "inject_nan_steps": [2]})
    assert cfg == MetaConfig(lopt="mlp", unroll=3)
    assert [str(w.message) for w in rec] == [
        "the checkpoint's config sets inject_nan_steps, no longer a config key: ignored"]
    # stacklevel: reported at the caller's line (under mutmut, its trampoline is one frame more)
    assert rec[0].filename == __file__ or "mutmut" in rec[0].filename
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.from_checkpoint({**saved, "inject_nan_steps": []}) == cfg   # unset: dropped silently


def test_a_checkpoint_with_an_unknown_key_is_refused_naming_the_checkpoint():
    with pytest.raises(ConfigError) as err:
        C.from_checkpoint({**MetaConfig().to_dict(), "future_key": 1})
    assert str(err.value).startswith("unknown config key(s) in the checkpoint: ['future_key']; known keys: ")


def test_resuming_may_change_only_the_resumable_keys():
    saved = MetaConfig(unroll=3, outer_steps=10).to_dict()
    cfg = C.resume(saved, {"outer_steps": 20, "progress": False, "unroll": 3, "lr": 3e-4})
    assert cfg == MetaConfig(unroll=3, outer_steps=20, progress=False)
    assert C.resume(saved, {}) == MetaConfig(unroll=3, outer_steps=10)
    with pytest.raises(ConfigError) as err:
        C.resume(saved, {"unroll": 4, "seed": 1, "outer_steps": 30})
    assert str(err.value) == ("cannot change ['seed', 'unroll'] when resuming (would not continue the same run); "
                              f"resumable overrides: {C.RESUMABLE_OVERRIDES}")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) in flags: \['unrol'\]"):
        C.resume(saved, {"unrol": 4})


def test_resuming_a_checkpoint_with_a_retired_key_warns_and_continues():
    saved = {**MetaConfig(unroll=3).to_dict(), "inject_nan_steps": [1]}
    with pytest.warns(UserWarning, match="inject_nan_steps"):
        assert C.resume(saved, {"outer_steps": 5}) == MetaConfig(unroll=3, outer_steps=5)


# ---------------------------------------------------------------- dist: ranks as threads of this process

class ThreadCollectives:
    """The torch.distributed calls of l2o.meta.dist for ranks that are threads
    of this process (signatures and defaults as torch's): sums in rank order,
    broadcast / gather_object at their root; each call is recorded."""

    def __init__(self, world: int):
        self.world, self.local, self.calls = world, threading.local(), []
        self.barrier_ = threading.Barrier(world, timeout=60)
        self.slots = [None] * world
        self.initialized = True

    def _meet(self, value):
        self.slots[self.local.rank] = value
        self.barrier_.wait()
        values = list(self.slots)
        self.barrier_.wait()
        return values

    def all_reduce(self, tensor, op=tdist.ReduceOp.SUM, group=None, async_op=False):
        assert op == tdist.ReduceOp.SUM, op
        self.calls.append(("all_reduce", self.local.rank))
        total = None
        for t in self._meet(tensor.clone()):
            total = t.clone() if total is None else total + t
        tensor.copy_(total)

    def broadcast(self, tensor, src=None, group=None, async_op=False, group_src=None):
        if src is None and group_src is None:
            raise ValueError("Must specify global_rank or group_rank")
        self.calls.append(("broadcast", self.local.rank))
        tensor.copy_(self._meet(tensor.clone())[src])

    def gather_object(self, obj, object_gather_list=None, dst=None, group=None, group_dst=None):
        dst = 0 if dst is None else dst
        if (self.local.rank == dst) != (object_gather_list is not None):
            raise ValueError("object_gather_list must be given on the destination rank only")
        objs = self._meet(obj)
        if object_gather_list is not None:
            object_gather_list[:] = objs

    def barrier(self, group=None, async_op=False, device_ids=None):
        self.calls.append(("barrier", self.local.rank))
        self._meet(None)

    def is_initialized(self):
        return self.initialized

    def destroy_process_group(self, group=None):
        self.calls.append(("destroy", self.local.rank))

    def run(self, fn):
        """``fn(DistInfo of the rank)`` on every rank, each in its own thread; their results."""
        results, errors = [None] * self.world, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(D.DistInfo(rank=rank, world_size=self.world, local_rank=rank))
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier_.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return results


@pytest.fixture
def collectives(monkeypatch):
    """``collectives(world)``: a ThreadCollectives installed as torch.distributed."""
    def install(world: int) -> ThreadCollectives:
        fake = ThreadCollectives(world)
        for name in ("all_reduce", "broadcast", "gather_object", "barrier", "is_initialized",
                     "destroy_process_group"):
            monkeypatch.setattr(D.dist, name, getattr(fake, name))
        fake.local.rank = 0
        return fake
    return install


def test_a_single_process_is_rank_zero_of_one_and_not_distributed(monkeypatch):
    info = D.DistInfo()
    assert (info.rank, info.world_size, info.local_rank, info.device) == (0, 1, 0, torch.device("cpu"))
    assert info.is_main and not info.enabled
    assert not D.DistInfo(rank=1, world_size=2).is_main and D.DistInfo(rank=1, world_size=2).enabled
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: pytest.fail("no process group for one process"))
    for world in (None, "1"):
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        monkeypatch.delenv("RANK", raising=False)
        assert D.setup("meta") == D.DistInfo(device=torch.device("meta"))


@pytest.mark.parametrize("initialized", [False, True])
def test_under_torchrun_setup_reads_the_rank_and_joins_a_gloo_group_on_the_cpu(monkeypatch, initialized):
    joined = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: initialized)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: joined.append(kw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.setup("cpu") == D.DistInfo(1, 2, 1, torch.device("cpu"))
    assert joined == ([] if initialized else [{"backend": "gloo"}])
    monkeypatch.delenv("LOCAL_RANK")               # optional: 0 when absent
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert D.setup("cpu") == D.DistInfo(1, 3, 0, torch.device("cpu"))


def test_under_torchrun_on_gpus_each_process_takes_its_local_gpu_and_nccl(monkeypatch):
    joined, chosen = [], []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kw: joined.append(kw))
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.setup("cuda") == D.DistInfo(3, 4, 1, torch.device("cuda", 1))
    assert chosen == [1] and joined == [{"backend": "nccl"}]


def test_each_rank_owns_the_slots_congruent_to_its_rank():
    assert D.my_slots(D.DistInfo(), 3) == [0, 1, 2]
    assert D.my_slots(D.DistInfo(rank=1, world_size=3), 7) == [1, 4]
    assert D.my_slots(D.DistInfo(rank=2, world_size=3), 3) == [2]
    with pytest.raises(ValueError) as err:
        D.my_slots(D.DistInfo(rank=0, world_size=3), 2)
    assert str(err.value) == "meta_batch (2) must be >= the number of processes (3)"


def test_each_rank_resumes_its_own_random_stream_and_the_main_rank_warns_on_another_world_size():
    states = {}
    for r in (0, 1):
        torch.manual_seed(100 + r)
        states[r] = torch.get_rng_state()
    expected = torch.rand(3, generator=torch.Generator().manual_seed(101))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.restore_rng(D.DistInfo(rank=1, world_size=2), states, 2)
        assert torch.equal(torch.rand(3), expected)
        torch.manual_seed(5)
        D.restore_rng(D.DistInfo(rank=2, world_size=3), states, 2)   # no saved stream: left as it is
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    with pytest.warns(UserWarning) as rec:
        D.restore_rng(D.DistInfo(rank=0, world_size=3), states, 2)
    assert [str(w.message) for w in rec] == [
        "resuming a checkpoint written by 2 process(es) on 3: the runs continue, but not bit-exactly "
        "as they would have"]
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(100)))


def test_one_process_all_reduce_packs_the_gradients_and_returns_the_scalars():
    a, b, c = (nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in ((2, 3), (4,), (1, 2)))
    a.grad = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    c.grad = torch.tensor([[7.0, 8.0]], dtype=torch.float64)
    extras = D.all_reduce_grads(D.DistInfo(), [a, b, c], [0.1, 1 / 3, 2.0])
    assert extras == [0.1, 1 / 3, 2.0]                    # in the parameters' dtype: exact
    assert torch.equal(a.grad, torch.arange(6, dtype=torch.float64).reshape(2, 3))
    assert torch.equal(b.grad, torch.zeros(4, dtype=torch.float64))        # missing: zero
    assert torch.equal(c.grad, torch.tensor([[7.0, 8.0]], dtype=torch.float64))
    a.grad.add_(1.0)                                      # each its own tensor
    assert torch.equal(c.grad, torch.tensor([[7.0, 8.0]], dtype=torch.float64))


def test_all_reduce_sums_every_ranks_gradients_and_scalars(collectives):
    fake = collectives(3)

    def rank_fn(info):
        p, q = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(3))
        p.grad = torch.full((2, 2), float(info.rank + 1))
        if info.rank != 1:
            q.grad = torch.tensor([1.0, 2.0, 3.0]) * (info.rank + 1)
        extras = D.all_reduce_grads(info, [p, q], [float(info.rank), 1.0])
        return p.grad, q.grad, extras

    for p, q, extras in fake.run(rank_fn):
        assert torch.equal(p, torch.full((2, 2), 6.0))
        assert torch.equal(q, torch.tensor([4.0, 8.0, 12.0]))        # ranks 0 and 2; rank 1 counts zero
        assert extras == [3.0, 3.0]
    assert sorted(fake.calls) == [("all_reduce", 0), ("all_reduce", 1), ("all_reduce", 2)]


def test_broadcast_gives_every_rank_the_main_ranks_parameters_and_buffers(collectives):
    fake = collectives(2)

    def rank_fn(info):
        torch.manual_seed(info.rank)          # global generator: only the values matter here
        module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        with torch.no_grad():
            module[1].running_mean.fill_(info.rank + 1.0)
            module[1].num_batches_tracked.fill_(info.rank + 5)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        D.broadcast_module(info, module)
        return before, module.state_dict()

    (before0, after0), (before1, after1) = fake.run(rank_fn)
    assert not torch.equal(before0["0.weight"], before1["0.weight"])
    for key in before0:
        assert torch.equal(after0[key], before0[key]) and torch.equal(after1[key], before0[key]), key


def test_gather_collects_every_ranks_object_on_the_main_rank(collectives):
    assert D.gather(D.DistInfo(), {"a": 1}) == [{"a": 1}]
    fake = collectives(3)
    assert fake.run(lambda info: D.gather(info, ("rank", info.rank))) == [
        [("rank", 0), ("rank", 1), ("rank", 2)], None, None]


def test_barrier_and_cleanup_touch_torch_distributed_only_when_distributed(collectives):
    fake = collectives(2)
    D.barrier(D.DistInfo())
    D.cleanup(D.DistInfo())
    assert fake.calls == []
    fake.run(lambda info: (D.barrier(info), D.cleanup(info)))
    # cleanup meets the other ranks before leaving: no rank tears gloo down under another's traffic
    assert sorted(fake.calls) == [("barrier", 0)] * 2 + [("barrier", 1)] * 2 + [("destroy", 0), ("destroy", 1)]
    for rank in (0, 1):
        mine = [call for call, r in fake.calls if r == rank]
        assert mine == ["barrier", "barrier", "destroy"]
    fake.calls.clear()
    fake.initialized = False                  # already destroyed: nothing to do
    fake.run(D.cleanup)
    assert fake.calls == []


# ---------------------------------------------------------------- faults

def test_nan_faults_are_on_only_inside_the_block_and_nest():
    assert not any(faults.forced_nan(s) for s in range(5))
    with faults.nan_meta_loss(steps=[1, "3"]):
        assert [s for s in range(5) if faults.forced_nan(s)] == [1, 3]
        with faults.nan_meta_loss(steps=[2]):
            assert [s for s in range(5) if faults.forced_nan(s)] == [2]
        assert [s for s in range(5) if faults.forced_nan(s)] == [1, 3]
    assert not any(faults.forced_nan(s) for s in range(5))
    with pytest.raises(RuntimeError):
        with faults.nan_meta_loss(steps=[0]):
            raise RuntimeError("a failing run")
    assert not faults.forced_nan(0)


# ---------------------------------------------------------------- tasks_pool: the pool of specs and the draws

from l2o.meta import tasks_pool as TP  # noqa: E402


def test_named_suites_give_their_available_tasks_and_families_add_samplers():
    import tasks
    for suite in ("train", "valid", "heldout", "all"):
        assert TP.suite_specs(suite) == [f"task:{t.name}" for t in tasks.get_suite(suite)]
    assert TP.suite_specs("families") == [f"family:{f}" for f in tasks.TRAIN_FAMILIES]
    assert TP.suite_specs("mix") == TP.suite_specs("train") + TP.suite_specs("families")
    assert TP.suite_specs(" mlp_synthetic, ,regression_teacher ,") == ["task:mlp_synthetic",
                                                                      "task:regression_teacher"]
    assert TP.suite_specs("mlp~valid~0") == ["task:mlp~valid~0"]


def test_a_typo_in_a_suite_of_names_fails_before_training():
    import tasks
    with pytest.raises(tasks.registry.UnknownTaskError, match="mlp_synthetc"):
        TP.suite_specs("mlp_synthetic,mlp_synthetc")


def test_a_named_suite_without_available_data_says_so(monkeypatch):
    import tasks
    monkeypatch.setattr(tasks, "get_suite", lambda suite: [])
    with pytest.raises(ConfigError) as err:
        TP.suite_specs("heldout")
    assert str(err.value) == "suite 'heldout' has no task whose data is available (is $L2O_DATA set?)"


def _reference_draw(pool, seed, slot, index):
    """The documented stream: one random.Random per (seed, slot, index), seeded by
    the string "seed/slot/index"; a family sampler's config seed, then the init
    seed, both below 2**31 (what resumed runs and older checkpoints rely on)."""
    rng = random.Random(f"{seed}/{slot}/{index}")
    choice = pool[rng.randrange(len(pool))]
    if choice.startswith("family:"):
        choice += f":{rng.randrange(2 ** 31)}"
    return choice, rng.randrange(2 ** 31)


def test_draws_are_a_pure_function_of_seed_slot_and_index():
    pool = ["task:mlp_synthetic", "family:mlp", "task:regression_teacher", "family:cnn"]
    draws = [TP.draw_spec(pool, seed, slot, index) for seed in (0, 3) for slot in (0, 1) for index in range(60)]
    assert draws == [_reference_draw(pool, seed, slot, index)
                     for seed in (0, 3) for slot in (0, 1) for index in range(60)]
    assert {spec for spec, _ in draws} >= {"task:mlp_synthetic", "task:regression_teacher"}
    family_seeds = [int(spec.rsplit(":", 1)[1]) for spec, _ in draws if spec.startswith("family:")]
    for seeds in (family_seeds, [s for _, s in draws]):
        assert all(0 <= s < 2 ** 31 for s in seeds) and max(seeds) > 2 ** 30
    assert TP.resolve_task(next(s for s, _ in draws if s.startswith("family:cnn"))).family == "cnn"


def test_run_lengths_are_log_uniform_between_the_bounds_and_fixed_without_a_longer_bound():
    assert TP.draw_length(30, 0, 0, 0, 0) == 30
    assert TP.draw_length(30, 30, 0, 0, 0) == 30
    assert TP.draw_length(30, 20, 0, 0, 0) == 30
    lengths = [TP.draw_length(10, 1000, 2, slot, index) for slot in range(3) for index in range(100)]
    ref = [int(round(math.exp(random.Random(f"length/2/{slot}/{index}").uniform(math.log(10), math.log(1000)))))
           for slot in range(3) for index in range(100)]
    assert lengths == ref
    assert all(10 <= n <= 1000 for n in lengths) and min(lengths) < 15 and max(lengths) > 700
    assert 60 < sorted(lengths)[150] < 160      # the median of a log-uniform draw: sqrt(10 * 1000) = 100


def test_specs_resolve_to_named_or_sampled_tasks():
    import tasks
    assert TP.resolve_task("task:mlp_synthetic").name == "mlp_synthetic"
    sampled = TP.resolve_task("family:regression:17")
    assert sampled.name == tasks.sample_task("regression", 17).name and sampled.family == "regression"
    assert TP.resolve_task("family:regression:18").name != sampled.name
    for bad in ("mlp_synthetic", "tasks:mlp_synthetic", "graph:mlp"):
        with pytest.raises(ConfigError) as err:
            TP.resolve_task(bad)
        assert str(err.value) == f"bad task spec {bad!r}"


# ---------------------------------------------------------------- tasks_pool: the cache

def test_an_entry_is_the_tasks_initial_model_its_layout_and_loss_built_once():
    pool = TP.TaskPool("mlp", "cpu")
    assert pool.device == torch.device("cpu") and isinstance(pool.device, torch.device)
    entry = pool.get("task:mlp_synthetic")
    assert pool.get("task:mlp_synthetic") is entry
    assert entry.task.name == "mlp_synthetic"
    ref = entry.task.init(0)
    named = list(ref.named_parameters())
    assert [n for n, _ in entry.module.named_parameters()] == [n for n, _ in named]
    for (_, p), (_, q) in zip(entry.module.named_parameters(), named):
        assert torch.equal(p, q)
    assert entry.graph.param_names == [n for n, _ in named]
    assert [tuple(s) for s in entry.graph.param_shapes] == [tuple(p.shape) for _, p in named]
    assert entry.graph.num_tensors == len(named) and entry.graph.edge_index.shape[1] == 0
    batch = (torch.randn(4, *entry.task.input_shape), None)
    params, buffers = dict(entry.module.named_parameters()), dict(entry.module.named_buffers())
    out = entry.task.init(0)(batch[0])
    targets = torch.randn_like(out) if entry.task.objective == "mse" else torch.zeros(len(out), dtype=torch.long)
    assert torch.equal(entry.loss_fn(params, buffers, (batch[0], targets)), entry.task.loss(ref, (batch[0], targets)))


def test_the_pool_keeps_the_most_recently_used_entries():
    pool = TP.TaskPool("mlp", "cpu", max_size=2)
    a, b = pool.get("task:mlp_synthetic"), pool.get("task:regression_teacher")
    assert pool.get("task:mlp_synthetic") is a                # now the most recent
    c = pool.get("family:regression:3")                        # evicts regression_teacher
    assert pool.get("task:mlp_synthetic") is a and pool.get("family:regression:3") is c
    assert pool.get("task:regression_teacher") is not b        # rebuilt


def test_by_default_the_pool_keeps_the_64_most_recent_tasks():
    pool = TP.TaskPool("mlp", "cpu")
    entries = [pool.get(f"family:regression:{i}") for i in range(65)]
    assert pool.get("family:regression:1") is entries[1]           # the oldest of the last 64
    assert pool.get("family:regression:0") is not entries[0]       # the 65th back: rebuilt


def test_unions_are_built_once_in_the_given_order_and_the_last_sixteen_kept():
    pool = TP.TaskPool("mlp", "cpu")
    names = ["task:mlp_synthetic", "task:regression_teacher"]
    ab = pool.union(tuple(names))
    ba = pool.union(tuple(reversed(names)))
    assert pool.union(tuple(names)) is ab and ba is not ab
    sizes = [pool.get(n).graph.num_params for n in names]
    assert ab.run_entries == tuple(sizes) and ba.run_entries == tuple(reversed(sizes))
    combos = [tuple(names[i] for i in bits) for bits in
              [(0,), (1,), (0, 0), (1, 1), (0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (0, 0, 1), (0, 1, 0),
               (1, 0, 1), (1, 1, 0), (0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 1), (1, 0, 1, 0)]]
    fresh = TP.TaskPool("mlp", "cpu")
    first = [fresh.union(c) for c in combos]                   # sixteen: all kept
    assert fresh.union(combos[0]) is first[0]
    fresh.union(tuple(names))                                  # a seventeenth: the least recent goes
    assert fresh.union(combos[2]) is first[2]
    assert fresh.union(combos[1]) is not first[1]


def test_gmn_entries_get_the_traced_graph():
    from l2o.graph import build_graph
    pool = TP.TaskPool("gmn", "cpu")
    entry = pool.get("task:mlp_synthetic")
    ref = build_graph(entry.task.init(0), example_inputs=entry.task.example_inputs())
    assert entry.graph.param_names == ref.param_names
    assert entry.graph.edge_index.shape[1] > 0 and torch.equal(entry.graph.edge_index, ref.edge_index)


@pytest.mark.parametrize("kind", ["mlp", "gmn", "gmn, untraceable"])
def test_a_pool_on_another_device_builds_its_models_and_graphs_there(kind, monkeypatch):
    """The "meta" device stands in for a GPU."""
    import l2o.graph
    cpu = TP.TaskPool(kind.split(",")[0], "cpu").get("task:mlp_synthetic").graph
    if kind.endswith("untraceable"):
        monkeypatch.setattr(l2o.graph, "build_graph", lambda module, example_inputs: 1 / 0)
    with warnings.catch_warnings():
        # the untraceable case says so (tested below); a traced one has nothing to say (the
        # example inputs are on the model's device, so shape propagation runs)
        warnings.simplefilter("ignore" if kind.endswith("untraceable") else "error")
        entry = TP.TaskPool(kind.split(",")[0], "meta").get("task:mlp_synthetic")
    assert {p.device.type for p in entry.module.parameters()} == {"meta"}
    assert entry.graph.device.type == "meta" and entry.graph.edge_index.device.type == "meta"
    assert entry.graph.param_names == cpu.param_names
    expected_edges = 0 if kind != "gmn" else cpu.edge_index.shape[1]
    assert expected_edges == entry.graph.edge_index.shape[1] and (kind != "gmn" or expected_edges > 0)


def test_a_model_that_cannot_be_traced_falls_back_to_the_layout_warning_once(monkeypatch):
    import l2o.graph

    def refuse(module, example_inputs):
        assert isinstance(module, nn.Module) and all(isinstance(x, torch.Tensor) for x in example_inputs)
        raise RuntimeError("untraceable")
    monkeypatch.setattr(l2o.graph, "build_graph", refuse)
    pool = TP.TaskPool("gmn", "cpu")
    with pytest.warns(UserWarning) as rec:
        entry = pool.get("family:regression:1")
        assert pool.get("task:regression~train~1").task.name == entry.task.name   # another spec, the same
                                                                                # task: said once
    name = entry.task.name
    assert [str(w.message) for w in rec] == [
        f"build_graph failed for {name} (RuntimeError: untraceable); using the structure-free layout for it"]
    named = list(entry.module.named_parameters())
    assert entry.graph.param_names == [n for n, _ in named] and entry.graph.edge_index.shape[1] == 0
    assert [tuple(s) for s in entry.graph.param_shapes] == [tuple(p.shape) for _, p in named]
    with pytest.warns(UserWarning, match="mlp_synthetic"):
        pool.get("task:mlp_synthetic")


# ---------------------------------------------------------------- summary

from l2o.meta import summary as SUM  # noqa: E402

COUNTERS = {"outer_step": 25, "inner_steps": 250, "skipped": 2, "resets": 3, "finished_runs": 4,
            "wall_time_s": 12.5}


def test_the_summary_reports_counters_and_the_meta_loss_at_both_ends():
    losses = [float(i) for i in range(1, 22)]                  # 21 finite values: 10% is 2
    history = {"meta_loss": [None] + losses[:10] + [None] + losses[10:], "eval": [{"a": 1}, {"b": 2}]}
    s = SUM.summarize(MetaConfig(lopt="mlp", estimator="pes"), COUNTERS, history, "out/w.safetensors",
                      world_size=3, replicas_identical=False)
    assert s == {"lopt": "mlp", "estimator": "pes", "outer_steps": 25, "outer_steps_planned": 1000,
                 "finished": False, "inner_steps": 250, "skipped": 2,
                 "resets": 3, "finished_runs": 4, "wall_time_s": 12.5, "world_size": 3,
                 "meta_loss_first": 1.0, "meta_loss_last": 21.0,
                 "meta_loss_first10pct_mean": 1.5, "meta_loss_last10pct_mean": 20.5, "meta_loss_min": 1.0,
                 "last_eval": {"b": 2}, "weights": "out/w.safetensors", "replicas_identical": False}
    short = SUM.summarize(MetaConfig(outer_steps=25), COUNTERS, {"meta_loss": [5.0, 3.0, 4.0], "eval": []}, "w")
    assert short["finished"] is True and short["outer_steps_planned"] == 25
    assert (short["meta_loss_first10pct_mean"], short["meta_loss_last10pct_mean"]) == (5.0, 4.0)
    assert (short["meta_loss_min"], short["last_eval"], short["world_size"], short["replicas_identical"]) == (
        3.0, None, 1, True)


def test_a_summary_without_any_finite_meta_loss_has_none_for_them():
    s = SUM.summarize(MetaConfig(), COUNTERS, {"meta_loss": [None, None], "eval": []}, "w")
    for key in ("meta_loss_first", "meta_loss_last", "meta_loss_first10pct_mean", "meta_loss_last10pct_mean",
                "meta_loss_min", "last_eval"):
        assert s[key] is None, key


def test_the_summary_of_a_checkpoint_is_that_of_the_run_it_holds(tmp_path):
    from l2o.checkpoint import make_lopt
    from l2o.meta import state as S
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    opt = torch.optim.Adam(lopt.parameters(), lr=1e-3)
    cfg = MetaConfig(lopt="mlp", estimator="es", unroll=3)
    history = {"meta_loss": [3.0, None, 2.0, 1.0], "eval": [{"lopt_final": 0.5}]}
    S.save(tmp_path, lopt, opt, cfg.to_dict(), COUNTERS, [], [torch.get_rng_state()], history)
    s = SUM.summarize_checkpoint(str(tmp_path))
    assert s == SUM.summarize(cfg, COUNTERS, history, tmp_path / S.LOPT_FILE, replicas_identical=None)
    assert s["weights"] == str(tmp_path / "lopt.safetensors") and s["estimator"] == "es"
    assert s["replicas_identical"] is None and s["meta_loss_last"] == 1.0

"""The meta-training train state (``l2o/meta/state.py``): the checkpoint directory's
life cycle (same-step rewrites, crashes, leftovers, the legacy flat layout) and the
errors ``load`` gives for checkpoints it cannot resume. End-to-end resume is in
``tests/test_meta_train.py``; these call ``save`` / ``load`` directly."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2o.checkpoint import lopt_extra, make_lopt  # noqa: E402
from l2o.meta import state as S  # noqa: E402


@dataclass
class FakeRun:
    """What ``save`` needs of an inner run: its slot, tensors and scalars."""
    slot: int
    value: float

    def tensors(self):
        return {"params": torch.full((3,), self.value)}

    def scalars(self):
        return {"slot": self.slot, "value": self.value}


def write(out: Path, step: int, fill: float = 0.0, world_size: int = 1) -> None:
    """A checkpoint at ``step`` whose metanetwork weights all equal ``fill``."""
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    with torch.no_grad():
        for p in lopt.parameters():
            p.fill_(fill)
    opt = torch.optim.Adam(lopt.parameters(), lr=1e-3)
    cfg = {"suite": "mlp_synthetic", "lopt": "mlp"}
    counters = {"outer_step": step, "inner_steps": 10 * step}
    S.save(out, lopt, opt, cfg, counters, [FakeRun(1, fill), FakeRun(0, fill)],
           [torch.get_rng_state() for _ in range(world_size)], {"meta_loss": [float(step)]})


def weights_fill(out: Path) -> float:
    """The value every weight of the resumable checkpoint holds."""
    values = {float(p.detach().flatten()[0]) for p in S.load(out)["lopt"].parameters()}
    assert len(values) == 1
    return values.pop()


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("ckpt"))


# --------------------------------------------------------------------- what is written
def test_save_creates_missing_output_directories_and_load_reads_back_everything(tmp_path):
    out = tmp_path / "runs" / "new"
    write(out, 3, fill=0.5, world_size=2)
    assert S.checkpoint_dir(out) == out / "ckpt-3"
    assert (out / "latest").read_text() == "ckpt-3\n"
    loaded = S.load(out)
    assert loaded["counters"] == {"outer_step": 3, "inner_steps": 30}
    assert loaded["config"] == {"suite": "mlp_synthetic", "lopt": "mlp"}
    assert loaded["history"] == {"meta_loss": [3.0]}
    assert loaded["world_size"] == 2 and sorted(loaded["rng"]) == [0, 1]
    assert [s["slot"] for s in loaded["run_scalars"].values()] == [0, 1]
    assert torch.equal(loaded["run_tensors"][1]["params"], torch.full((3,), 0.5))
    assert weights_fill(out) == 0.5


def test_the_weights_users_load_record_the_config_and_counters_that_made_them(tmp_path):
    write(tmp_path, 2)
    for path in (tmp_path / "lopt.safetensors", tmp_path / "ckpt-2" / "lopt.safetensors"):
        extra = lopt_extra(path)
        assert extra["meta_train_config"] == {"suite": "mlp_synthetic", "lopt": "mlp"}
        assert extra["counters"]["outer_step"] == 2


def test_outer_optimizer_state_keys_with_dots_and_scalar_only_entries_survive_the_split():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p, q], lr=0.1)
    opt.state[p]["ema.slow"] = torch.tensor([1.0, 2.0])
    opt.state[p]["count"] = 3
    opt.state[q]["count"] = 5          # a tensor whose state has no tensor at all
    tensors, scalars = S._optimizer_split(opt)
    joined = S._optimizer_join(tensors, json.loads(json.dumps(scalars)))
    assert set(joined["state"][0]) == {"ema.slow", "count"}
    assert torch.equal(joined["state"][0]["ema.slow"], torch.tensor([1.0, 2.0]))
    assert joined["state"][0]["count"] == 3 and joined["state"][1] == {"count": 5}


# ------------------------------------------------------------- the directory life cycle
def test_a_later_checkpoint_replaces_the_earlier_one(tmp_path):
    write(tmp_path, 2, fill=0.1)
    write(tmp_path, 4, fill=0.2)
    assert checkpoint_names(tmp_path) == ["ckpt-4"]
    assert weights_fill(tmp_path) == pytest.approx(0.2)
    assert torch.equal(load_file(tmp_path / "lopt.safetensors")["inp.weight"],
                       load_file(tmp_path / "ckpt-4" / "lopt.safetensors")["inp.weight"])


def test_rewriting_the_current_step_replaces_it(tmp_path):
    # e.g. a run resumed from its last checkpoint and stopped again before the next one
    write(tmp_path, 2, fill=0.1)
    leftover = tmp_path / f"ckpt-2.{os.getpid()}"     # an earlier same-step rewrite of this process
    leftover.mkdir()
    (leftover / "junk").write_text("x")
    write(tmp_path, 2, fill=0.3)
    assert weights_fill(tmp_path) == pytest.approx(0.3)
    assert len(checkpoint_names(tmp_path)) == 1
    write(tmp_path, 4, fill=0.4)
    assert checkpoint_names(tmp_path) == ["ckpt-4"]


def test_a_crash_while_rewriting_the_current_step_keeps_it(tmp_path, monkeypatch):
    write(tmp_path, 2, fill=0.1)

    real_replace = os.replace

    def crash_at_the_directory_rename(src, dst):
        if Path(src).name.startswith("ckpt.tmp-"):
            raise SystemExit("killed before the rename")
        real_replace(src, dst)

    monkeypatch.setattr(S.os, "replace", crash_at_the_directory_rename)
    with pytest.raises(SystemExit):
        write(tmp_path, 2, fill=0.3)
    monkeypatch.undo()
    assert S.checkpoint_dir(tmp_path).name == "ckpt-2"
    assert weights_fill(tmp_path) == pytest.approx(0.1)


def test_a_stale_directory_of_the_step_being_written_is_replaced(tmp_path):
    # A crash after the rename but before the pointer moved leaves ckpt-4 beside
    # the pointer's ckpt-2; the resumed run writes step 4 again.
    write(tmp_path, 2, fill=0.1)
    stale = tmp_path / "ckpt-4"
    stale.mkdir()
    (stale / "junk").write_text("x")
    write(tmp_path, 4, fill=0.2)
    assert (tmp_path / "latest").read_text() == "ckpt-4\n"
    assert checkpoint_names(tmp_path) == ["ckpt-4"] and not (stale / "junk").exists()
    assert weights_fill(tmp_path) == pytest.approx(0.2)


def test_leftovers_of_crashed_writes_of_other_steps_are_removed(tmp_path):
    (tmp_path / "ckpt.tmp-7").mkdir(parents=True)
    (tmp_path / "ckpt.tmp-7" / "train_state.json").write_text("{}")
    write(tmp_path, 2)
    assert checkpoint_names(tmp_path) == ["ckpt-2"]


def test_an_old_generation_that_cannot_be_removed_does_not_fail_the_save(tmp_path):
    # A user's symlink to an old checkpoint kept elsewhere: rmtree refuses links,
    # and the target is not the run's to delete.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "lopt.safetensors").write_text("x")
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-0").symlink_to(kept, target_is_directory=True)
    write(out, 2)
    assert S.checkpoint_dir(out).name == "ckpt-2"
    assert (kept / "lopt.safetensors").read_text() == "x"


def test_the_legacy_flat_layout_is_superseded_by_the_first_new_checkpoint(tmp_path):
    # Before checkpoints were directories the three files sat at the top of the
    # output directory, with no ``latest`` pointer.
    write(tmp_path, 2, fill=0.1)
    for name in (S.JSON_FILE, S.TENSORS_FILE, S.LOPT_FILE):
        os.replace(tmp_path / "ckpt-2" / name, tmp_path / name)
    (tmp_path / "ckpt-2").rmdir()
    (tmp_path / "latest").unlink()
    assert S.checkpoint_dir(tmp_path) == tmp_path and weights_fill(tmp_path) == pytest.approx(0.1)
    write(tmp_path, 4, fill=0.2)
    assert not (tmp_path / S.JSON_FILE).exists() and not (tmp_path / S.TENSORS_FILE).exists()
    assert S.checkpoint_dir(tmp_path).name == "ckpt-4" and weights_fill(tmp_path) == pytest.approx(0.2)


# ------------------------------------------------------------------- what load refuses
def test_no_checkpoint_is_reported_naming_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint in {tmp_path} \(no {tmp_path / 'latest'}\)"):
        S.load(tmp_path)


@pytest.mark.parametrize("name", [S.JSON_FILE, S.TENSORS_FILE, S.LOPT_FILE])
def test_a_missing_file_is_reported_by_its_path(tmp_path, name):
    write(tmp_path, 2)
    (tmp_path / "ckpt-2" / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"cannot resume: {tmp_path / 'ckpt-2' / name} is missing"):
        S.load(tmp_path)


def test_an_unsupported_version_is_reported_with_its_number(tmp_path):
    write(tmp_path, 2)
    path = tmp_path / "ckpt-2" / S.JSON_FILE
    meta = json.loads(path.read_text())
    meta["version"] = 99
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{path}: unsupported train-state version 99"):
        S.load(tmp_path)


def _strip_tensor_step(ckpt: Path) -> None:
    tensors = load_file(ckpt / S.TENSORS_FILE)
    save_file(tensors, ckpt / S.TENSORS_FILE)           # no metadata


def _strip_weights_counters(ckpt: Path) -> None:
    from safetensors import safe_open
    with safe_open(str(ckpt / S.LOPT_FILE), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    extra = json.loads(meta["l2o_extra"])
    del extra["counters"]
    meta["l2o_extra"] = json.dumps(extra)
    save_file(tensors, ckpt / S.LOPT_FILE, metadata=meta)


@pytest.mark.parametrize("damage", [_strip_tensor_step, _strip_weights_counters], ids=["tensors", "weights"])
def test_files_without_their_step_are_refused_even_at_step_one(tmp_path, damage):
    # Files that do not say their step cannot be shown to belong together; the
    # stand-in step must be one no checkpoint has (not 1, not 0).
    for step in (1, 0):
        out = tmp_path / str(step)
        write(out, step)
        damage(out / f"ckpt-{step}")
        with pytest.raises(ValueError, match=r"disagree on the outer step .*restore the files from one checkpoint"):
            S.load(out)


def test_files_of_different_steps_are_refused_naming_each_step(tmp_path):
    write(tmp_path / "a", 2)
    write(tmp_path / "b", 4)
    os.replace(tmp_path / "b" / "ckpt-4" / S.TENSORS_FILE, tmp_path / "a" / "ckpt-2" / S.TENSORS_FILE)
    with pytest.raises(ValueError, match=r"\(json 2, tensors 4, weights 2\): they come from different checkpoints; "
                                         r"restore the files from one checkpoint"):
        S.load(tmp_path / "a")


def test_only_the_checkpoint_directories_save_wrote_are_removed(tmp_path):
    # Folders of the user's that merely start with "ckpt-" are not the run's to delete;
    # earlier generations, a same-step copy and a crashed write's leftovers are.
    for name in ("ckpt-old-experiment", "ckpt-8-keep", "ckpt-1", f"ckpt-2.{os.getpid() + 1}", "ckpt.tmp-7"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    write(tmp_path, 2)
    assert checkpoint_names(tmp_path) == ["ckpt-2", "ckpt-8-keep", "ckpt-old-experiment"]
    assert (tmp_path / "ckpt-8-keep" / "f").read_text() == "x"


def test_a_directory_holding_only_what_a_run_leaves_before_its_first_checkpoint_is_ours(tmp_path):
    assert S.foreign_entries(tmp_path / "absent") == [] and S.foreign_entries(tmp_path) == []
    for name in ("tb", "ckpt.tmp-2", "ckpt-2"):
        (tmp_path / name).mkdir()
    (tmp_path / ".hidden").write_text("")
    assert S.foreign_entries(tmp_path) == []
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "ckpt-old").mkdir()
    assert S.foreign_entries(tmp_path) == ["ckpt-old", "summary.json"]


def test_the_task_pool_is_stored_and_loaded(tmp_path):
    write(tmp_path, 2)
    assert S.load(tmp_path)["tasks"] is None     # not given (as by versions before pools were stored)
    torch.manual_seed(0)
    lopt = make_lopt("mlp")
    S.save(tmp_path, lopt, torch.optim.Adam(lopt.parameters()), {}, {"outer_step": 3}, [],
           [torch.get_rng_state()], {"meta_loss": []}, tasks=["task:a", "family:mlp"])
    assert S.load(tmp_path)["tasks"] == ["task:a", "family:mlp"]

"""l2o.checkpoint: the weights file format, its errors and its atomic writes.

Written to kill the mutants mutmut left alive in l2o/checkpoint.py (see
docs/mutation.md); each test pins a property a user or a resumed run relies on.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from l2o import checkpoint as CK
from l2o.mlp_lopt import MLPLOpt


def _metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_creates_missing_directories(tmp_path):
    target = tmp_path / "a" / "b" / "c.bin"
    CK.atomic_write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc"


def test_atomic_write_goes_through_a_hidden_temp_file_beside_the_target(tmp_path, monkeypatch):
    # Beside the target: a rename is atomic only within one filesystem. Hidden and
    # named after the target: leftovers of a crash are recognisable, never globbed as
    # checkpoints or weights.
    renames, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((Path(src), Path(dst))), real(src, dst)))
    target = tmp_path / "lopt.safetensors"
    CK.atomic_write_bytes(target, b"x")
    [(src, dst)] = renames
    assert dst == target and src.parent == target.parent
    assert src.name.startswith(".lopt.safetensors.") and src.name.endswith(".tmp")


def test_atomic_write_gives_the_usual_permissions(tmp_path, umask_022):
    # mkstemp creates 0600 files; weights must be readable like any file the user writes.
    target = tmp_path / "w.bin"
    CK.atomic_write_bytes(target, b"x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_json_files_are_indented_and_sorted(tmp_path):
    # Stable, diffable files (summaries and configs are committed next to weights).
    CK.atomic_write_json(tmp_path / "s.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "s.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown learned optimizer kind 'adam'; choose from \['gmn', 'mlp'\]"):
        CK.make_lopt("adam")


def test_weights_file_records_format_kind_config_and_extra(tmp_path):
    lopt = MLPLOpt(hidden=16)
    CK.save_lopt(lopt, tmp_path / "w.safetensors", extra={"step": 3})
    meta = _metadata(tmp_path / "w.safetensors")
    assert meta["l2o_format"] == CK.FORMAT_VERSION == "1"
    assert meta["l2o_kind"] == "mlp" and json.loads(meta["l2o_config"]) == lopt.config()
    assert CK.lopt_extra(tmp_path / "w.safetensors") == {"step": 3}


def test_load_rebuilds_the_saved_architecture(tmp_path):
    torch.manual_seed(0)
    lopt = MLPLOpt(hidden=16, out_scale=2e-3)
    CK.save_lopt(lopt, tmp_path / "w.safetensors")
    back = CK.load_lopt(tmp_path / "w.safetensors")
    assert type(back) is MLPLOpt and back.config() == lopt.config() and back.hidden == 16
    sd, sd2 = lopt.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def _raw_file(path, tensors, **metadata):
    save_file(tensors, str(path), metadata=metadata or None)
    return path


def test_files_without_l2o_metadata_are_rejected(tmp_path):
    tensors = {k: v.contiguous() for k, v in MLPLOpt().state_dict().items()}
    for meta in ({}, {"l2o_kind": "mlp"}, {"l2o_config": "{}"}):
        path = _raw_file(tmp_path / "x.safetensors", tensors, **meta)
        with pytest.raises(CK.WeightsFileError, match=r"not l2o learned-optimizer weights \(no l2o_kind/l2o_config metadata\)"):
            CK.load_lopt(path)


def test_extra_defaults_to_empty(tmp_path):
    tensors = {k: v.contiguous() for k, v in MLPLOpt().state_dict().items()}
    path = _raw_file(tmp_path / "x.safetensors", tensors, l2o_kind="mlp", l2o_config="{}")
    assert CK.lopt_extra(path) == {}
    assert isinstance(CK.load_lopt(path), MLPLOpt)


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("out.bias"), r"missing=\['out.bias'\] unexpected=\[\] wrong_shape=\[\]"),
    (lambda t: t.update(extra=torch.zeros(2)), r"missing=\[\] unexpected=\['extra'\] wrong_shape=\[\]"),
    (lambda t: t.update({"out.bias": torch.zeros(3)}), r"missing=\[\] unexpected=\[\] wrong_shape=\['out.bias'\]"),
], ids=["missing", "unexpected", "wrong_shape"])
def test_tensors_that_do_not_match_the_config_are_named(tmp_path, damage, message):
    tensors = {k: v.contiguous() for k, v in MLPLOpt().state_dict().items()}
    damage(tensors)
    path = _raw_file(tmp_path / "x.safetensors", tensors, l2o_kind="mlp", l2o_config="{}")
    with pytest.raises(CK.WeightsFileError, match=message):
        CK.load_lopt(path)


def test_pretrained_weights_are_loaded_by_kind(tmp_path, monkeypatch):
    for kind in ("gmn", "mlp"):
        if not CK.pretrained_path(kind).is_file():
            continue
        lopt = CK.load_pretrained(kind)
        assert lopt.kind == kind
        ref = CK.load_lopt(CK.pretrained_path(kind)).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in lopt.state_dict().items())
    # a file of the wrong kind under the right name is refused
    monkeypatch.setattr(CK, "PRETRAINED_DIR", tmp_path)
    CK.save_lopt(MLPLOpt(), tmp_path / "gmn.safetensors")
    with pytest.raises(CK.WeightsFileError, match="holds a 'mlp' learned optimizer, expected 'gmn'"):
        CK.load_pretrained("gmn")
    with pytest.raises(FileNotFoundError, match="no pretrained MLP weights are installed"):
        CK.load_pretrained("mlp")


def test_a_run_directory_loads_its_newest_weights_and_another_directory_is_named(tmp_path):
    lopt = CK.make_lopt("mlp")
    CK.save_lopt(lopt, tmp_path / "run" / "lopt.safetensors")
    loaded = CK.load_lopt(tmp_path / "run", expect_kind="mlp")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), lopt.state_dict().values()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory without lopt.safetensors"):
        CK.load_lopt(tmp_path / "empty")

"""Checkpoint bundles: atomic, complete-only resume, pruning, compatibility checks."""

import json

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.errors import CheckpointError


def save(d, step, keep=3, **state):
    return ckpt.save_checkpoint(d, step=step, lora={"w": torch.full((2, 2), float(step))},
                                optimizer={"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
                                lr_scheduler={"last_epoch": step}, rng={"torch": torch.get_rng_state()},
                                state={"job": "j", "signature": "s", **state}, keep_last=keep)


def test_save_load_roundtrip_and_prune(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2, data={"epoch": 0, "index": step})
    done = ckpt.complete_checkpoints(tmp_path)
    assert [p.name for p in done] == ["step_00000030", "step_00000040"]
    b = ckpt.load_bundle(done[-1])
    assert b["state"]["step"] == 40 and b["state"]["data"]["index"] == 40
    assert torch.equal(b["lora"]["w"], torch.full((2, 2), 40.0))
    assert b["lr_scheduler"] == {"last_epoch": 40}
    assert ckpt.find_resume(tmp_path, "latest") == done[-1]
    assert ckpt.find_resume(tmp_path, None) is None


def test_incomplete_bundles_are_skipped(tmp_path):
    save(tmp_path, 10)
    # a writer killed mid-save leaves a temp folder; a folder without state.json is not complete either
    (tmp_path / ".tmp_step_00000020_99999").mkdir()
    half = tmp_path / "step_00000030"
    half.mkdir()
    (half / "lora.safetensors").write_bytes(b"garbage")
    assert ckpt.find_resume(tmp_path, "latest").name == "step_00000010"
    save(tmp_path, 40)
    assert not (tmp_path / ".tmp_step_00000020_99999").exists()  # stale temp of a dead writer cleaned


def test_resaving_same_step_replaces_atomically(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 10, data={"epoch": 1, "index": 2})
    assert ckpt.load_bundle(tmp_path / "step_00000010")["state"]["data"] == {"epoch": 1, "index": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]


def test_compatibility_errors(tmp_path):
    p = save(tmp_path, 10)
    st = ckpt.read_state(p)
    ckpt.check_compatible(st, p, job_name="j", signature="s")
    with pytest.raises(CheckpointError, match="belongs to job 'j'"):
        ckpt.check_compatible(st, p, job_name="other", signature="s")
    with pytest.raises(CheckpointError, match="different model family, network shape"):
        ckpt.check_compatible(st, p, job_name="j", signature="t")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.find_resume(tmp_path, str(tmp_path / "nope"))
    (p / "state.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.read_state(p)


def test_state_is_strict_json(tmp_path):
    with pytest.raises(ValueError):
        save(tmp_path, 10, bad=float("nan"))
    assert not ckpt.complete_checkpoints(tmp_path) and not list(tmp_path.glob(".tmp*"))
    p = save(tmp_path, 20)
    json.loads((p / "state.json").read_text())

"""Stops at any moment, on a real `python -m trainer run` process: SIGINT and SIGTERM stop at a step boundary
with a complete checkpoint, a partial LoRA and exit code 130, and the same command continues; kill -9 in the
middle of a checkpoint or LoRA write never leaves a corrupt file, and `resume: latest` takes the previous one.

PT_TEST_SLOW_SAVE=<seconds> (a test-only hook in trainer.checkpoint) sleeps between the files of a save so the
kill lands inside the write.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_models import tiny_sd15_path  # noqa: F401
from tests.reliability_helpers import cli_env, start_cli
from trainer import checkpoint as ckpt
from trainer.demo import make_images
from trainer.export import atomic_save_safetensors
from trainer.metrics import read_records

TIMEOUT = 120  # generous: a loaded 2-core CI machine; the runs themselves take seconds


def write_job(tmp_path: Path, model: Path, every: int) -> Path:
    data = tmp_path / "images"
    make_images(data, size=32)
    spec = {
        "job": "cli", "output_dir": "out",
        "model": {"family": "sd15", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": "images", "resolution": [32]}],
        "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 4},
        # far more steps than a test waits for: every run here ends by a signal or a --steps override
        "train": {"steps": 100000, "batch_size": 1, "lr": 1e-3, "seed": 3},
        "save": {"every": every, "keep_last": 3, "resume": "latest"},
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def wait_for(condition, proc: subprocess.Popen, what: str, log: Path, poll: float = 0.02):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


def logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    with warnings.catch_warnings():  # polling may catch the writer mid-line: read_records warns and skips it
        warnings.simplefilter("ignore")
        return [r["step"] for r in read_records(metrics)]


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the run did not end:\n{log.read_text()[-3000:]}")


def assert_every_checkpoint_loads(ckpt_dir: Path) -> list[Path]:
    done = ckpt.complete_checkpoints(ckpt_dir)
    for p in done:
        b = ckpt.load_bundle(p)
        assert b["state"]["step"] == int(p.name.split("_")[1]) and b["lora"], p
    return done


@pytest.mark.parametrize("first,second", [(signal.SIGINT, signal.SIGTERM)], ids=["SIGINT-then-SIGTERM"])
def test_signals_stop_at_a_step_boundary_and_the_same_command_continues(tiny_sd15_path, tmp_path, first, second):
    job = write_job(tmp_path, tiny_sd15_path, every=1000)
    out = tmp_path / "out"
    metrics, log = out / "metrics_cli.jsonl", tmp_path / "run.log"
    stops = []  # the second run is the same command again: it resumes, continues, and is stopped too
    for sig in (first, second):
        proc = start_cli(["run", job], tmp_path, log)
        wait_for(lambda: len(logged_steps(metrics)) >= (stops[-1] if stops else 0) + 3, proc,
                 "three new steps", log)
        proc.send_signal(sig)
        assert finish(proc, log) == 130, log.read_text()[-3000:]
        steps = logged_steps(metrics)
        stop = steps[-1]
        assert steps == list(range(1, stop + 1))  # each step once, the last one the stop
        rec = read_records(metrics)[-1]
        assert rec["event"] == "interrupt" and rec["event_detail"]["path"].endswith(f"step_{stop:08d}")
        latest = ckpt.find_resume(out / "checkpoints", "latest")
        assert latest.name == f"step_{stop:08d}" and ckpt.load_bundle(latest)["state"]["step"] == stop
        partial = out / f"cli_step{stop}.safetensors"
        assert load_file(str(partial)), "the partial LoRA must be a complete safetensors file"
        assert f"stopped at step {stop}" in log.read_text()
        if stops:
            assert stop > stops[-1] and read_records(metrics)[stops[-1]]["event"] == "resume"
        stops.append(stop)
    assert not list(out.rglob(".*")), "temporary files left behind"


def test_kill_9_during_checkpoint_writes_never_corrupts_and_latest_skips_the_partial_one(tiny_sd15_path, tmp_path):
    job = write_job(tmp_path, tiny_sd15_path, every=3)
    out = tmp_path / "out"
    ckpt_dir, metrics, log = out / "checkpoints", out / "metrics_cli.jsonl", tmp_path / "run.log"
    rng = random.Random(1234)
    for attempt in range(2):
        proc = start_cli(["run", job], tmp_path, log, PT_TEST_SLOW_SAVE=0.4)

        def writing_after_a_complete_bundle():
            done = ckpt.complete_checkpoints(ckpt_dir)
            newer = [p for p in ckpt_dir.glob(".tmp_step_*") if done and p.name[5:18] > done[-1].name]
            return (done[-1], newer[0]) if newer else None

        previous, tmp = wait_for(writing_after_a_complete_bundle, proc, "a second checkpoint write", log, poll=0.01)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside the ~1.2 s write (three 0.4 s pauses)
        proc.send_signal(signal.SIGKILL)
        assert finish(proc, log) == -signal.SIGKILL
        assert tmp.exists(), "the kill was meant to land inside the write"
        done = assert_every_checkpoint_loads(ckpt_dir)
        # the bundle being written is not complete: `latest` is the one before it
        assert ckpt.find_resume(ckpt_dir, "latest") == done[-1] == previous
    # a run after the kills resumes from the last complete bundle and cleans the dead writers' leftovers
    latest = ckpt.find_resume(ckpt_dir, "latest")
    resumed_at = ckpt.read_state(latest)["step"]
    end = resumed_at + 4
    proc = start_cli(["run", job, "--steps", end], tmp_path, log)
    assert finish(proc, log) == 0, log.read_text()[-3000:]
    assert logged_steps(metrics) == list(range(1, end + 1))  # steps logged after the checkpoint were replaced
    assert read_records(metrics)[resumed_at]["event"] == "resume"
    assert not list(ckpt_dir.glob(".*")), "a dead writer's temporary bundle was not cleaned up"
    assert ckpt.find_resume(ckpt_dir, "latest").name == f"step_{end:08d}"


WRITE_LORA = """
import sys, torch
from trainer.export import atomic_save_safetensors
atomic_save_safetensors({"w": torch.full((64, 64), 2.0)}, sys.argv[1], {"version": "2"})
"""


def test_kill_9_during_a_lora_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "my_lora.safetensors"
    save_file({"w": torch.full((64, 64), 1.0)}, str(target), {"version": "1"})
    before = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", WRITE_LORA, str(target)], env=cli_env(PT_TEST_SLOW_SAVE=60),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    while not list(tmp_path.glob(".my_lora.safetensors.tmp-*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the writer never started"
        time.sleep(0.02)
    proc.kill()
    proc.wait(TIMEOUT)
    assert target.read_bytes() == before  # the old file, whole
    assert len(list(tmp_path.glob(".my_lora.safetensors.tmp-*"))) == 1  # the dead writer's temp file
    atomic_save_safetensors({"w": torch.full((64, 64), 3.0)}, target)
    assert torch.equal(load_file(str(target))["w"], torch.full((64, 64), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["my_lora.safetensors"]  # the leftover was removed

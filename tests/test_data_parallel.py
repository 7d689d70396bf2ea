"""Data-parallel training with two processes (CPU, gloo): one metrics log, one writer, resumable.

The frozen denoiser is not wrapped in DDP; the loop averages the LoRA's gradients itself and every process
takes its own batch of the same global order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import tiny_sd15_path  # noqa: F401
from trainer import checkpoint as ckpt
from trainer.demo import make_images
from trainer.loop import _DataPosition, _average_gradients  # noqa: F401  (the pieces under test)
from trainer.metrics import read_records

REPO = Path(__file__).resolve().parents[1]


def launch(job_file: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    # What `accelerate launch --multi_gpu` runs on GPUs: torch.distributed.run, one process per device. On CPUs
    # accelerate's own multi-CPU launcher wants MPI; torchrun with ACCELERATE_USE_CPU gives the gloo backend.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "trainer", "run", str(job_file), *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def write_job(tmp_path, model, steps, resume="latest"):
    make_images(tmp_path / "images")
    job = {"job": "ddp", "output_dir": str(tmp_path / "out"),
           "model": {"family": "sd15", "path": str(model), "dtype": "fp32"},
           "datasets": [{"folder_path": str(tmp_path / "images"), "resolution": [32]}],
           "network": {"linear": 4, "linear_alpha": 4},
           "train": {"steps": steps, "batch_size": 1, "lr": 1e-3, "seed": 3},
           "save": {"every": 10, "resume": resume}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path


def test_two_processes_write_once_and_resume(tiny_sd15_path, tmp_path):
    job = write_job(tmp_path, tiny_sd15_path, steps=10)
    first = launch(job, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("saved LoRA") == 1  # only the main process speaks and writes
    recs = read_records(tmp_path / "out" / "metrics_ddp.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 11))
    bundle = ckpt.load_bundle(ckpt.find_resume(tmp_path / "out" / "checkpoints", "latest"))
    per_rank = bundle["rng"]["per_rank"]
    assert len(per_rank) == 2 and not torch.equal(per_rank[0]["noise_gen"], per_rank[1]["noise_gen"])

    job.write_text(job.read_text().replace('"steps": 10', '"steps": 20'))
    second = launch(job, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout
    recs = read_records(tmp_path / "out" / "metrics_ddp.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert load_file(str(tmp_path / "out" / "ddp.safetensors"))

    # a checkpoint of two processes does not resume silently in one
    job.write_text(job.read_text().replace('"steps": 20', '"steps": 30'))
    single = subprocess.run([sys.executable, "-m", "trainer", "run", str(job)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert single.returncode == 2 and "written by 2 processes" in single.stderr


class _Batches:
    def epoch_batches(self, epoch, batch_size, seed):
        return [[epoch * 10 + i] for i in range(6)]


def test_each_process_takes_its_own_batch_of_one_global_order():
    a, b, one = _DataPosition(_Batches(), 1, 0), _DataPosition(_Batches(), 1, 0), _DataPosition(_Batches(), 1, 0)
    got = [(a.next_for(0, 2), b.next_for(1, 2)) for _ in range(4)]
    assert got == [([0], [1]), ([2], [3]), ([4], [5]), ([10], [11])]
    assert a.state() == b.state() == {"epoch": 1, "index": 2}  # one position for all processes
    assert [one.next_for(0, 1) for _ in range(3)] == [[0], [1], [2]]

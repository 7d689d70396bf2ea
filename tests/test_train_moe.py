"""Wan 2.2 A14B: one LoRA, optimizer and alpha schedule per expert, in one run.

Each expert only sees timesteps of its own range, the two transition independently, every record names its
expert, two ComfyUI files come out, and resume restores both experts exactly.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import tiny_wan22_14b_path  # noqa: F401
from tests.media import textured_frames, write_caption, write_video
from trainer import checkpoint as ckpt
from trainer.data.training_set import TrainingSet
from trainer.errors import JobError
from trainer.families import get_family
from trainer.job import parse_job
from trainer.loop import train
from trainer.metrics import read_records

EASY = {"loss_improvement_rate_below": 1.0, "min_gradient_stability": 0.0, "max_loss_cv": 10.0}
NEVER = {"loss_improvement_rate_below": 0.0, "min_gradient_stability": 1.0}


def job_spec(model, data, out, steps, every=20, **extra):
    return {
        "job": "moe", "output_dir": str(out),
        "model": {"family": "wan22_14b", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
        "network": {"linear": 4, "linear_alpha": 4, "alpha_schedule": {"per_expert": {
            # high noise may move on as soon as it has 100 losses; low noise never meets its criteria
            "high_noise": {"phases": {"foundation": {"alpha": 4, "min_steps": 100, "exit_criteria": EASY},
                                      "emphasis": {"alpha": 8}}},
            "low_noise": {"phases": {"foundation": {"alpha": 4, "min_steps": 100, "exit_criteria": NEVER},
                                     "emphasis": {"alpha": 8}}},
        }}},
        "train": {"steps": steps, "lr": 2e-3, "seed": 5, "switch_boundary_every": every},
        "save": {"every": 60, "keep_last": 10, "resume": "latest"},
        **extra,
    }


@pytest.fixture
def clips(tmp_path):
    data = tmp_path / "clips"
    for i in range(2):
        write_video(data / f"c{i}.mp4", textured_frames(8, 48, 32, seed=i), num_frames=8, width=48, height=32, gop=4)
        write_caption(data / f"c{i}.mp4", f"clip number {i}")
    return data


def load(model, job):
    fam = get_family("wan22_14b").load(str(model), dtype=torch.float32)
    ts = TrainingSet.build(job.datasets, fam, seed=0,
                           log=lambda m: None)
    return fam, ts


def test_experts_train_apart_and_transition_independently(tiny_wan22_14b_path, clips, tmp_path):
    job = parse_job(job_spec(tiny_wan22_14b_path, clips, tmp_path / "out", steps=240))
    fam, ts = load(tiny_wan22_14b_path, job)
    seen = []
    sample = fam.sample_timesteps

    def spy(n, generator, expert=None):
        u = sample(n, generator, expert=expert)
        seen.append((expert, fam.sigmas_from_u(u) * 1000))
        return u

    fam.sample_timesteps = spy
    result = train(job, family=fam, training_set=ts)

    boundary = fam.boundary_timestep
    assert {e for e, _ in seen} == {"high_noise", "low_noise"}
    for expert, t in seen:
        assert bool((t >= boundary).all()) if expert == "high_noise" else bool((t < boundary).all())
    recs = read_records(job.metrics_path)
    # blocks of 20 steps: 1-20 high, 21-40 low, ...
    assert [r["expert"] for r in recs[:41:20]] == ["high_noise", "low_noise", "high_noise"]
    high = [r for r in recs if r["expert"] == "high_noise"]
    low = [r for r in recs if r["expert"] == "low_noise"]
    assert len(high) == len(low) == 120
    # steps_in_phase counts the expert's own steps, not the run's
    assert high[99]["steps_in_phase"] == 100 or high[99]["event"] == "transition"
    transitions = [r for r in recs if r["event"] == "transition"]
    assert [r["expert"] for r in transitions] == ["high_noise"]
    assert {r["phase"] for r in low} == {"foundation"} and low[-1]["linear_alpha"] == 4.0
    assert high[-1]["phase"] == "emphasis" and high[-1]["linear_alpha"] == 8.0
    # statistics never mix experts: the low expert's window holds only its own 120 losses
    assert low[-1]["loss_samples"] == 120

    files = {e: load_file(str(p)) for e, p in result.lora_paths.items()}
    assert set(result.lora_paths) == {"high_noise", "low_noise"}
    assert result.lora_paths["high_noise"].name == "moe_high_noise.safetensors"
    for e, sd in files.items():
        assert all(k.startswith("diffusion_model.blocks.") for k in sd)
        assert {v.item() for k, v in sd.items() if k.endswith(".alpha")} == ({8.0} if e == "high_noise" else {4.0})
    a, b = files["high_noise"], files["low_noise"]
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("lora_up.weight"))


def test_one_expert_only_and_resume_restores_both(tiny_wan22_14b_path, clips, tmp_path):
    spec = job_spec(tiny_wan22_14b_path, clips, tmp_path / "full", steps=120)
    full = parse_job(spec)
    fam, ts = load(tiny_wan22_14b_path, full)
    train(full, family=fam, training_set=ts)

    half = parse_job(job_spec(tiny_wan22_14b_path, clips, tmp_path / "half", steps=60))
    fam, ts = load(tiny_wan22_14b_path, half)
    train(half, family=fam, training_set=ts)
    half.train.steps = 120
    fam, ts = load(tiny_wan22_14b_path, half)
    train(half, family=fam, training_set=ts)
    a = ckpt.load_bundle(ckpt.find_resume(full.checkpoint_dir, "latest"))
    b = ckpt.load_bundle(ckpt.find_resume(half.checkpoint_dir, "latest"))
    assert set(a["optimizer"]) == {"high_noise", "low_noise"}
    assert a["lora"].keys() == b["lora"].keys()
    for k in a["lora"]:
        assert torch.equal(a["lora"][k], b["lora"][k]), k
    assert a["state"]["scheduler"] == b["state"]["scheduler"]

    only = parse_job(job_spec(tiny_wan22_14b_path, clips, tmp_path / "low", steps=20,
                              ) | {"model": {"family": "wan22_14b", "path": str(tiny_wan22_14b_path),
                                             "dtype": "fp32", "train_high_noise": False}})
    fam, ts = load(tiny_wan22_14b_path, only)
    result = train(only, family=fam, training_set=ts)
    assert set(result.lora_paths) == {"low_noise"}
    assert {r["expert"] for r in read_records(only.metrics_path)} == {"low_noise"}


def test_expert_settings_are_validated(tiny_wan22_14b_path, clips, tmp_path):
    spec = job_spec(tiny_wan22_14b_path, clips, tmp_path, steps=10)
    spec["network"]["alpha_schedule"]["per_expert"]["mid_noise"] = {"phases": {"a": {"alpha": 1}}}
    with pytest.raises(JobError) as e:
        parse_job(spec)
    assert e.value.field == "network.alpha_schedule.per_expert.mid_noise"
    spec = job_spec(tiny_wan22_14b_path, clips, tmp_path, steps=10)
    spec["network"]["alpha_schedule"]["per_expert"]["low_noise"]["phases"]["foundation"]["alpha"] = -1
    with pytest.raises(JobError) as e:
        parse_job(spec)
    assert e.value.field == "network.alpha_schedule.per_expert.low_noise.phases.foundation.alpha"
    spec = job_spec(tiny_wan22_14b_path, clips, tmp_path, steps=10)
    spec["model"] = {"family": "wan21", "path": "x/y/z", "train_low_noise": False}
    with pytest.raises(JobError, match="two-expert"):
        parse_job(spec)

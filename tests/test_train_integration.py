"""`run` end to end on tiny SD 1.5 and Wan 2.1 models saved in diffusers format.

Each run must lower a fixed-noise loss on its training set, pass through phases, and export a file whose
ComfyUI-style application (W + alpha/rank * up @ down, per key) reproduces exactly what training ended with.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures_models import tiny_sd15_path, tiny_wan21_path  # noqa: F401
from tests.media import textured_frames, write_caption, write_image, write_video
from trainer import checkpoint as ckpt
from trainer.__main__ import main as cli
from trainer.data.training_set import TrainingSet
from trainer.demo import make_images
from trainer.export import delta_from_file
from trainer.families import get_family
from trainer.job import parse_job
from trainer.loop import train
from trainer.lora import LoRANetwork
from trainer.metrics import COLUMNS, read_records, records_to_tensor
from trainer.validation import FixedNoiseProbe

FAST_EXIT = {"loss_improvement_rate_below": 0.005, "min_gradient_stability": 0.3, "max_loss_cv": 1.0}


def sd15_job(model, data, out, steps=230, **train):
    return {
        "job": "sd", "output_dir": str(out),
        "model": {"family": "sd15", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32]}],
        "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 8, "alpha_schedule": {
            "conv_alpha_phases": {"foundation": {"alpha": 8, "min_steps": 100, "exit_criteria": FAST_EXIT},
                                  "emphasis": {"alpha": 16, "min_steps": 100}}}},
        "train": {"steps": steps, "batch_size": 2, "lr": 2e-3, "seed": 7, **train},
        "save": {"every": 100, "keep_last": 5, "resume": "latest"},
    }


def apply_file_like_comfyui(family, lora_file, linear_rank, conv_rank):
    """Merge each key's alpha/rank * up @ down into the matching base weight, as ComfyUI's LoraLoader does."""
    by_prefix = {type(family).export_prefix(t.name): t.module
                 for t in family.target_modules(linear_rank, conv_rank)}
    deltas = delta_from_file(lora_file)
    assert set(deltas) <= set(by_prefix), set(deltas) - set(by_prefix)
    with torch.no_grad():
        for prefix, d in deltas.items():
            w = by_prefix[prefix].weight
            w += d.reshape(w.shape).to(w.dtype)
    return len(deltas)


def load_and_cache(family_name, model, job):
    fam = get_family(family_name).load(str(model), dtype=torch.float32)
    ts = TrainingSet.build(job.datasets, fam, seed=0,
                           log=lambda m: None)
    return fam, ts


def test_sd15_run_learns_transitions_and_exports_exact_delta(tiny_sd15_path, tmp_path):
    data = tmp_path / "images"
    make_images(data)
    job = parse_job(sd15_job(tiny_sd15_path, data, tmp_path / "out"))
    fam, ts = load_and_cache("sd15", tiny_sd15_path, job)
    probe = FixedNoiseProbe(ts, fam, items=4)
    before = probe.loss()

    result = train(job, family=fam, training_set=ts)

    # phases: foundation -> emphasis, with the numbers that triggered it
    assert [t["to_phase"] for t in result.transitions] == ["emphasis"]
    tr = result.transitions[0]
    assert tr["step"] >= 100 and -0.005 <= tr["slope"] <= 0.05 * 0.005
    # metrics: one strict-JSON record per step, no duplicates, alpha follows the phase
    lines = job.metrics_path.read_text().splitlines()
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    recs = read_records(job.metrics_path)
    assert [r["step"] for r in recs] == list(range(1, 231))
    assert {r["conv_alpha"] for r in recs if r["step"] < tr["step"]} == {8.0}
    assert {r["conv_alpha"] for r in recs if r["step"] >= tr["step"]} == {16.0}
    assert recs[-1]["conv_alpha"] == 16.0 and recs[-1]["linear_alpha"] == 4.0
    assert recs[tr["step"] - 1]["event"] == "transition"
    tensor = records_to_tensor(recs)
    assert tensor.shape == (230, len(COLUMNS)) and tensor.dtype == torch.float32

    # export: every key maps to a target module, .alpha is the alpha in force at the end
    from safetensors.torch import load_file
    sd = load_file(str(result.lora_path))
    conv_alphas = {k: v.item() for k, v in sd.items() if k.endswith(".alpha") and "resnets" in k}
    assert conv_alphas and set(conv_alphas.values()) == {16.0}
    assert all(k.startswith("lora_unet_") for k in sd)

    # the file applied the ComfyUI way lowers the fixed-noise loss ...
    n = apply_file_like_comfyui(fam, result.lora_path, 4, 4)
    assert n == sum(LoRANetwork(fam.target_modules(4, 4), linear_rank=4, linear_alpha=4, conv_rank=4,
                                conv_alpha=8).group_counts().values())
    after = probe.loss()
    assert after < 0.9 * before, (before, after)


def test_file_delta_equals_trained_network_output(tiny_sd15_path, tmp_path):
    """The merged file and the live LoRA network from the final checkpoint give the same denoiser output."""
    data = tmp_path / "images"
    make_images(data)
    job = parse_job(sd15_job(tiny_sd15_path, data, tmp_path / "out", steps=30))
    job.network.alpha_schedule = None
    job.network.conv_alpha = 6.5
    fam, ts = load_and_cache("sd15", tiny_sd15_path, job)
    result = train(job, family=fam, training_set=ts)
    probe = FixedNoiseProbe(ts, fam, items=2)

    bundle = ckpt.load_bundle(ckpt.find_resume(job.checkpoint_dir, "latest"))
    net = LoRANetwork(fam.target_modules(4, 4), linear_rank=4, linear_alpha=4, conv_rank=4, conv_alpha=6.5)
    net.load_state_dict(bundle["lora"])
    net.apply_to()
    live = probe.loss(per_timestep=True)[1]
    net.remove()
    apply_file_like_comfyui(fam, result.lora_path, 4, 4)
    merged = probe.loss(per_timestep=True)[1]
    np.testing.assert_allclose(merged, live, rtol=1e-5)


def test_resume_continues_bit_identically(tiny_sd15_path, tmp_path):
    data = tmp_path / "images"
    make_images(data)
    full = parse_job(sd15_job(tiny_sd15_path, data, tmp_path / "full", steps=40, gradient_accumulation=2))
    full.save.every = 20
    fam, ts = load_and_cache("sd15", tiny_sd15_path, full)
    train(full, family=fam, training_set=ts)

    half = parse_job(sd15_job(tiny_sd15_path, data, tmp_path / "half", steps=20, gradient_accumulation=2))
    half.save.every = 20
    fam, ts = load_and_cache("sd15", tiny_sd15_path, half)
    train(half, family=fam, training_set=ts)
    half.train.steps = 40
    fam, ts = load_and_cache("sd15", tiny_sd15_path, half)
    train(half, family=fam, training_set=ts)

    a = ckpt.load_bundle(ckpt.find_resume(full.checkpoint_dir, "latest"))
    b = ckpt.load_bundle(ckpt.find_resume(half.checkpoint_dir, "latest"))
    assert a["state"]["step"] == b["state"]["step"] == 40
    for k in a["lora"]:
        assert torch.equal(a["lora"][k], b["lora"][k]), k
    assert a["state"]["scheduler"] == b["state"]["scheduler"]
    ra, rb = read_records(full.metrics_path), read_records(half.metrics_path)
    assert [r["step"] for r in rb] == list(range(1, 41))  # no duplicated or missing step after resume
    assert rb[20]["event"] == "resume"
    drop = ("timestamp", "event", "event_detail")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rb]


def test_wan21_run_on_video_and_image(tiny_wan21_path, tmp_path):
    data = tmp_path / "clips"
    write_video(data / "clip.mp4", textured_frames(12, 48, 32), num_frames=12, width=48, height=32, gop=4)
    write_caption(data / "clip.mp4", "[trigger] waves rolling")
    write_image(data / "still.png", 48, 32, seed=3)
    write_caption(data / "still.png", "a still frame")
    spec = {
        "job": "wan", "output_dir": str(tmp_path / "out"),
        "model": {"family": "wan21", "path": str(tiny_wan21_path), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32], "num_frames": 5}],
        "network": {"linear": 4, "linear_alpha": 4, "alpha_schedule": {"ramp_steps": 10, "linear_alpha_phases": {
            "foundation": {"alpha": 4, "min_steps": 100, "exit_criteria": FAST_EXIT},
            "emphasis": {"alpha": 8, "min_steps": 100}}}},
        "train": {"steps": 200, "batch_size": 1, "lr": 3e-3, "seed": 3},
        "save": {"every": 100, "resume": "none"},
    }
    job = parse_job(spec)
    fam, ts = load_and_cache("wan21", tiny_wan21_path, job)
    shapes = sorted(tuple(ts.collate([i], None)["latents"].shape) for i in range(len(ts)))
    assert shapes[0][2] == 1 and shapes[1][2] == 2  # the still is a 1-frame clip; 5 frames -> 2 latent frames
    probe = FixedNoiseProbe(ts, fam, items=2)
    before = probe.loss()
    result = train(job, family=fam, training_set=ts)
    assert [t["to_phase"] for t in result.transitions] == ["emphasis"]
    step = result.transitions[0]["step"]
    recs = read_records(job.metrics_path)
    # a record is the state after its step: the alphas in force for the next forward
    ramp = [r["linear_alpha"] for r in recs[step - 2: step + 9]]
    assert ramp[0] == 4.0 and ramp[-1] == 8.0 and all(b > a for a, b in zip(ramp, ramp[1:]))
    np.testing.assert_allclose(np.diff(ramp), 0.4, rtol=1e-5)  # linear over ramp_steps=10

    from safetensors.torch import load_file
    sd = load_file(str(result.lora_path))
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    assert not any(s in k for k in sd for s in ("attn1", "attn2", "to_q", "ffn.net"))
    assert {v.item() for k, v in sd.items() if k.endswith(".alpha")} == {8.0}
    apply_file_like_comfyui(fam, result.lora_path, 4, 0)
    after = probe.loss()
    assert after < 0.95 * before, (before, after)


def test_cli_run_and_replay(tiny_sd15_path, tmp_path, capsys):
    data = tmp_path / "images"
    make_images(data)
    spec = sd15_job(tiny_sd15_path, data, tmp_path / "out", steps=120)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    assert cli(["run", str(job_file)]) == 0
    out = capsys.readouterr().out
    assert "phase foundation -> emphasis" in out and "LoRA:" in out
    assert cli(["replay", str(job_file), str(tmp_path / "out" / "metrics_sd.jsonl")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    starts = [x for x in lines if "start_step" in x]
    assert [x["phase"] for x in starts] == ["foundation", "emphasis"]
    recorded = next(r["step"] for r in read_records(tmp_path / "out" / "metrics_sd.jsonl") if r["event"] == "transition")
    assert starts[1]["decided_at_step"] == recorded
    # a bad job file is a clear error with exit code 2, before anything loads
    spec["network"]["alpha_schedule"]["conv_alpha_phases"]["foundation"]["alpha"] = 0
    job_file.write_text(json.dumps(spec))
    assert cli(["run", str(job_file)]) == 2
    assert "conv_alpha_phases.foundation.alpha" in capsys.readouterr().err


def test_best_lora_survives_a_resume_under_another_name(tiny_sd15_path, tmp_path):
    """The ComfyUI node resumes under a new counter name: the best file of the first part must still be found."""
    data = tmp_path / "images"
    make_images(data)
    spec = sd15_job(tiny_sd15_path, data, tmp_path / "out", steps=10)
    spec["network"].pop("alpha_schedule")
    spec["validation"] = {"every": 5, "items": 2, "timesteps": 2, "keep_best": True}
    job = parse_job(spec)
    first = train(job, lora_path=tmp_path / "loras" / "sd_00001.safetensors")
    assert first.best_lora_path == tmp_path / "loras" / "sd_00001_best.safetensors"
    assert first.best_lora_path.exists()
    spec["train"]["steps"] = 20
    spec["validation"]["min_delta"] = 0.5  # no new best after the resume: the old file must be reported
    job = parse_job(spec)
    second = train(job, lora_path=tmp_path / "loras" / "sd_00002.safetensors")
    assert second.best_lora_path == first.best_lora_path

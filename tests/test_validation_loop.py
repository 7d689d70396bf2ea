"""Validation inside `train` on a tiny SD 1.5 model overfitting eight images: val_loss in the metrics, phases
that end on a validation plateau with an output-preserving transition, stop advice that ends the run, the best
weights exported, health signals; validation does not disturb a bit-identical resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import tiny_sd15_path  # noqa: F401
from tests.media import write_caption, write_image
from tests.test_train_integration import apply_file_like_comfyui
from trainer import checkpoint as ckpt
from trainer.data.training_set import TrainingSet
from trainer.demo import make_images
from trainer.families import get_family
from trainer.job import parse_job
from trainer.loop import Callbacks, train
from trainer.metrics import COLUMNS, read_records, records_to_tensor
from trainer.validation import FixedNoiseProbe

RATE = 2.0  # relative change of val_loss per 1000 steps below which a phase counts as on a plateau
WINDOW = 5
PATIENCE, MIN_DELTA = 3, 0.02


def spec(model, data, out, steps, validation, schedule=True, save_every=1000):
    net = {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 8}
    if schedule:
        net["alpha_schedule"] = {"transition": "preserve", "conv_alpha_phases": {
            "foundation": {"alpha": 8, "min_steps": 40, "exit_criteria": {
                "source": "validation", "val_window": WINDOW, "val_rate_below": RATE}},
            "emphasis": {"alpha": 16, "min_steps": 40}}}
    return {"job": "val", "output_dir": str(out),
            "model": {"family": "sd15", "path": str(model), "dtype": "fp32"},
            "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32]}],
            "network": net, "train": {"steps": steps, "batch_size": 2, "lr": 5e-3, "seed": 7},
            "save": {"every": save_every, "keep_last": 5, "resume": "latest"}, "validation": validation}


def loaded(model, job):
    fam = get_family("sd15").load(str(model), dtype=torch.float32)
    ts = TrainingSet.build(job.datasets, fam, seed=0,
                           log=lambda m: None)
    return fam, ts


class Quiet(Callbacks):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


@pytest.fixture(scope="module")
def run(tiny_sd15_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("valrun")
    data = tmp / "images"
    make_images(data)
    validation = {"every": 5, "items": 2, "timesteps": 4, "patience": PATIENCE, "min_delta": MIN_DELTA,
                  "stop_on_plateau": True, "keep_best": True}
    job = parse_job(spec(tiny_sd15_path, data, tmp / "out", 400, validation))
    fam, ts = loaded(tiny_sd15_path, job)
    cb = Quiet()
    result = train(job, cb, family=fam, training_set=ts)
    return job, result, cb, ts


def test_val_loss_is_logged_on_validation_steps(run):
    job, result, _, _ = run
    recs = read_records(job.metrics_path)
    val_steps = [r["step"] for r in recs if r.get("val_loss") is not None]
    assert val_steps == [s for s in range(5, result.step + 1, 5)]
    r = recs[val_steps[0] - 1]
    assert len(r["val_loss_t"]) == 4 and r["val_loss"] == pytest.approx(sum(r["val_loss_t"]) / 4)
    col = records_to_tensor(recs)[:, COLUMNS.index("val_loss")]
    assert int(torch.isfinite(col).sum()) == len(val_steps)
    # the model learns: validation falls by far more than its step-to-step wobble
    vals = [x["val_loss"] for x in recs if x.get("val_loss") is not None]
    assert vals[-1] < 0.7 * vals[0]


def test_phase_ends_on_a_validation_plateau_not_while_it_falls(run):
    job, result, _, _ = run
    recs = read_records(job.metrics_path)
    assert [t["to_phase"] for t in result.transitions] == ["emphasis"]
    tr = result.transitions[0]
    assert tr["source"] == "validation" and tr["steps_in_phase"] >= 40
    assert tr["val_rate"] >= -RATE and tr["val_samples"] == WINDOW
    # every earlier evaluation that could have ended the phase saw the validation loss still falling fast
    earlier = [r for r in recs if r["step"] < tr["step"] and r.get("val_samples") == WINDOW and r["step"] >= 40]
    assert earlier and all(r["val_rate"] < -RATE for r in earlier)
    logged = recs[tr["step"] - 1]
    assert logged["event"] == "transition" and logged["event_detail"]["preserve_factors"] == {"conv": 2.0}
    assert logged["conv_alpha"] == 16.0


def test_stop_advice_fires_after_the_plateau_and_ends_the_run_with_the_best_weights(run, tiny_sd15_path):
    job, result, cb, _ = run
    recs = read_records(job.metrics_path)
    advice = [r for r in recs if r["event"] == "suggest_stop"]
    assert len(advice) == 1 and result.stop_advice == advice[0]["event_detail"]
    d = result.stop_advice
    tr_step = result.transitions[0]["step"]
    assert d["step"] == result.step < job.train.steps  # stop_on_plateau ended the run there
    assert d["step"] > tr_step and d["evaluations_without_improvement"] == PATIENCE
    vals = {r["step"]: r["val_loss"] for r in recs if r.get("val_loss") is not None}
    assert vals[d["best_step"]] == d["best_val_loss"] == min(v for s, v in vals.items() if s <= d["best_step"])
    after_best = [v for s, v in vals.items() if d["best_step"] < s <= d["step"]]
    assert all(v >= d["best_val_loss"] * (1 - MIN_DELTA) for v in after_best)  # no real improvement since
    assert any("suggest stop at step" in line for line in cb.lines)
    # a normal end: final checkpoint at the stop step, and both files beside each other
    assert ckpt.find_resume(job.checkpoint_dir, "latest").name == f"step_{d['step']:08d}"
    assert result.lora_path.exists() and result.best_lora_path == job.lora_path.with_name("val_best.safetensors")
    # the best file holds the weights the best validation loss was measured with
    fam = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
    _, ts = loaded(tiny_sd15_path, job)
    probe = FixedNoiseProbe(ts, fam, items=2, timesteps=4, seed=1234, chunk=2)
    apply_file_like_comfyui(fam, result.best_lora_path, 4, 4)
    assert probe.loss() == pytest.approx(d["best_val_loss"], rel=1e-4)
    best_alphas = {v.item() for k, v in load_file(str(result.best_lora_path)).items() if k.endswith(".alpha")}
    assert best_alphas == {4.0, 8.0 if d["best_step"] <= tr_step else 16.0}


def test_health_signals_in_the_records(run):
    job, _, _, _ = run
    recs = read_records(job.metrics_path)
    assert all(r["nan_steps"] == 0 and r["inf_steps"] == 0 for r in recs)
    health = [r for r in recs if "health" in r]
    assert [r["step"] for r in health][:3] == [1, 5, 10]
    h = health[-1]["health"]
    assert set(h["delta_norm"]) == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    assert all(v > 0 for v in h["delta_norm"].values()) and 0 < h["update_ratio_total"] < 1
    assert all(v > 0 for v in h["grad_norm"].values())
    # the LoRA grows while training
    assert health[-1]["health"]["delta_norm_total"] > health[1]["health"]["delta_norm_total"]


def test_resume_with_validation_and_a_held_out_folder_is_bit_identical(tiny_sd15_path, tmp_path):
    data, held = tmp_path / "images", tmp_path / "held_out"
    make_images(data)
    for i in range(2):
        write_image(held / f"h{i}.png", 32, 32, seed=10 + i)
        write_caption(held / f"h{i}.png", f"[trigger] a held-out picture {i}")
    validation = {"every": 5, "items": 2, "timesteps": 2, "folder_path": str(held), "patience": 2}

    def go(out, steps):
        job = parse_job(spec(tiny_sd15_path, data, out, steps, validation, schedule=False, save_every=10))
        fam, ts = loaded(tiny_sd15_path, job)
        cb = Quiet()
        train(job, cb, family=fam, training_set=ts)
        return job, cb

    full, cb = go(tmp_path / "full", 20)
    assert any("on 2 held-out items" in line for line in cb.lines)
    go(tmp_path / "half", 10)
    half, _ = go(tmp_path / "half", 20)
    a = ckpt.load_bundle(ckpt.find_resume(full.checkpoint_dir, "latest"))
    b = ckpt.load_bundle(ckpt.find_resume(half.checkpoint_dir, "latest"))
    for k in a["lora"]:
        assert torch.equal(a["lora"][k], b["lora"][k]), k
    assert a["state"]["stop_advice"] == b["state"]["stop_advice"] and a["state"]["stop_advice"]["best_step"]
    drop = ("timestamp", "event", "event_detail")
    ra, rb = read_records(full.metrics_path), read_records(half.metrics_path)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rb]
    assert [r["step"] for r in ra if r.get("val_loss") is not None] == [5, 10, 15, 20]
    json.dumps(ra, allow_nan=False)

"""Numerical faults: a NaN/Inf loss or gradient skips the step (no weight, optimizer, LR or phase change) with a
`nan_skip` event; train.max_bad_steps consecutive bad steps stop the run with an error and a checkpoint of the
last good weights, from which the run can be resumed.

The faults are injected with a family wrapper: the real tiny SD 1.5 family, whose predict returns NaN (or
passes an infinite gradient back) on chosen steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from fixtures_models import tiny_sd15_path  # noqa: F401
from tests.reliability_helpers import Quiet
from trainer import checkpoint as ckpt
from trainer.data.training_set import TrainingSet
from trainer.demo import make_images
from trainer.errors import TrainerError
from trainer.families import get_family
from trainer.job import parse_job
from trainer.loop import train
from trainer.metrics import read_records


class _InfGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def inject(family, bad_steps, kind: str, accumulation: int = 1):
    """Make `family.predict` faulty on the optimizer steps in `bad_steps` (a set, or a callable step -> bool)."""
    real = family.predict
    calls = [0]
    is_bad = bad_steps if callable(bad_steps) else bad_steps.__contains__

    def predict(noisy, cond):
        calls[0] += 1
        out = real(noisy, cond)
        if not is_bad((calls[0] - 1) // accumulation + 1):
            return out
        return out * float("nan") if kind == "nan_loss" else _InfGradient.apply(out)

    family.predict = predict
    return family


def setup(model, tmp_path, steps, max_bad):
    data = tmp_path / "images"
    make_images(data, size=32)
    job = parse_job({
        "job": "nan", "output_dir": str(tmp_path / "out"),
        "model": {"family": "sd15", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "resolution": [32]}],
        "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 4, "alpha_schedule": {
            "window": 20, "conv_alpha_phases": {"a": {"alpha": 4, "min_steps": 50}, "b": {"alpha": 8}}}},
        "train": {"steps": steps, "batch_size": 1, "lr": 1e-3, "seed": 9, "max_bad_steps": max_bad},
        "save": {"every": 1, "keep_last": 100, "resume": "latest"},  # a bundle per step: the state after each
    })
    family = get_family("sd15").load(str(model), dtype=torch.float32)
    ts = TrainingSet.build(job.datasets, family, seed=0,
                           log=lambda m: None)
    return job, family, ts


def bundle(job, step):
    return ckpt.load_bundle(ckpt.bundle_path(job.checkpoint_dir, step))


def assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class WeightsPerStep(Quiet):
    """Copies the LoRA weights after every step, reaching them through the hooks on the denoiser's layers."""

    def __init__(self, targets):
        self.targets, self.weights = targets, {}

    def on_step(self, record):
        lora = [vars(t.module)["forward"].__self__ for t in self.targets if "forward" in vars(t.module)]
        self.weights[record["step"]] = [p.detach().clone() for m in lora for p in (m.down.weight, m.up.weight)]


@pytest.mark.parametrize("kind", ["nan_loss", "inf_gradient"])
def test_a_bad_step_is_skipped_with_an_event(tiny_sd15_path, tmp_path, kind):
    job, family, ts = setup(tiny_sd15_path, tmp_path, steps=8, max_bad=2)
    job.train.lr_scheduler, job.train.warmup_steps = "linear", 6  # an LR that moves every step
    seen = WeightsPerStep(family.target_modules(4, 4))
    result = train(job, seen, family=inject(family, {3, 6}, kind), training_set=ts)
    assert result.step == 8
    recs = read_records(job.metrics_path)
    assert [r["step"] for r in recs] == list(range(1, 9))
    for r in recs:
        bad = r["step"] in (3, 6)
        assert (r["event"] == "nan_skip") == bad, r
        if bad:
            assert r["event_detail"] == {"consecutive": 1} and r["grad_norm"] is None
            assert (r["loss"] is None) == (kind == "nan_loss")  # strict JSON: NaN is written as null
        else:
            assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
    # the skipped step changed nothing: weights, LR position, phase statistics ...
    assert len(seen.weights[2]) == 2 * 66
    assert all(torch.equal(a, b) for a, b in zip(seen.weights[2], seen.weights[3]))
    assert recs[3]["lr"] == recs[2]["lr"] > recs[1]["lr"]  # step 4 runs with the LR step 3 would have used
    assert recs[2]["steps_in_phase"] == recs[1]["steps_in_phase"] == recs[3]["steps_in_phase"] - 1
    assert recs[2]["loss_samples"] == recs[1]["loss_samples"]
    # ... while a good step does change the weights
    assert not all(torch.equal(a, b) for a, b in zip(seen.weights[3], seen.weights[4]))


def test_consecutive_bad_steps_stop_with_a_checkpoint_of_the_last_good_state(tiny_sd15_path, tmp_path):
    job, family, ts = setup(tiny_sd15_path, tmp_path, steps=12, max_bad=3)
    targets = family.target_modules(4, 4)
    with pytest.raises(TrainerError) as err:
        train(job, Quiet(), family=inject(family, lambda s: s >= 5, "nan_loss"), training_set=ts)
    message = str(err.value)
    stopped = ckpt.bundle_path(job.checkpoint_dir, 7)
    assert "3 consecutive steps had a NaN/Inf loss or gradient" in message and str(stopped) in message
    assert "train.lr" in message  # says what to do
    recs = read_records(job.metrics_path)
    assert [r["step"] for r in recs] == list(range(1, 8))
    assert [r["event_detail"]["consecutive"] for r in recs[4:]] == [1, 2, 3]
    # the checkpoint written at the stop holds the weights of the last good step (4), bit for bit
    last_good, at_stop = bundle(job, 4), bundle(job, 7)
    for part in ("lora", "optimizer", "lr_scheduler"):
        assert_same(last_good[part], at_stop[part], part)
    assert at_stop["state"]["bad_steps"] == 3
    # the error left the model clean: no LoRA hook stays on the denoiser's layers
    assert not any("forward" in vars(t.module) for t in targets)

    # fixed (here: the fault goes away), the same job resumes from that checkpoint and finishes
    family.predict = type(family).predict.__get__(family)
    result = train(job, Quiet(), family=family, training_set=ts)
    assert result.step == 12
    recs = read_records(job.metrics_path)
    assert [r["step"] for r in recs] == list(range(1, 13)) and recs[7]["event"] == "resume"
    assert all(math.isfinite(r["loss"]) for r in recs[7:])

"""Exact resume across a phase transition: N steps in one run == a stop at N/2 and a resume to N, bit for bit.

tests/test_train_integration.py covers gradient accumulation without a transition (by extending train.steps).
Here the first run is *stopped* (the Callbacks.should_stop path that the ComfyUI cancel and SIGINT use) in the
middle of an alpha ramp, between two transitions, with a cosine LR schedule and caption dropout, so that every
piece of state a checkpoint carries matters: LoRA weights, AdamW moments, LR-scheduler position, the alpha
scheduler's phase and windowed statistics, the data position, and the torch / noise / data RNGs.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import tiny_sd15_path  # noqa: F401
from tests.reliability_helpers import StopAfter, no_network, strip_volatile  # noqa: F401
from trainer import checkpoint as ckpt
from trainer.data.training_set import TrainingSet
from trainer.demo import make_images
from trainer.errors import InterruptedTraining
from trainer.families import get_family
from trainer.job import parse_job
from trainer.loop import train
from trainer.metrics import read_records

# Exit rules every phase meets as soon as it has min_steps steps and `window` (20) losses: the transitions
# land at fixed steps (20 and 40), so the stop at 24 is inside the first ramp and before the second transition.
ALWAYS_EXIT = {"loss_improvement_rate_below": 1e6, "min_gradient_stability": 0.0, "max_loss_cv": 1e6}
STEPS, STOP = 48, 24


def spec(model, data, out, accumulation: int, transition: str) -> dict:
    schedule = {"window": 20, "conv_alpha_phases": {
        "foundation": {"alpha": 4, "min_steps": 10, "exit_criteria": ALWAYS_EXIT},
        "balance": {"alpha": 8, "min_steps": 10, "exit_criteria": ALWAYS_EXIT},
        "emphasis": {"alpha": 12}}}
    if transition == "ramp":
        schedule["ramp_steps"] = 8
    else:
        schedule["transition"] = transition
    return {
        "job": "resume", "output_dir": str(out),
        "model": {"family": "sd15", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32],
                      "caption_dropout_rate": 0.3}],
        "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 4, "alpha_schedule": schedule},
        "train": {"steps": STEPS, "batch_size": 2, "gradient_accumulation": accumulation, "lr": 2e-3,
                  "lr_scheduler": "cosine", "warmup_steps": 4, "seed": 5},
        "save": {"every": 10, "keep_last": 10, "resume": "latest"},
    }


def fresh(model, job):
    """A newly loaded model and training set, as a new process would have."""
    family = get_family("sd15").load(str(model), dtype=torch.float32)
    ts = TrainingSet.build(job.datasets, family, seed=0,
                           log=lambda m: None)
    return family, ts


def assert_same_tree(a, b, where="state"):
    """Equal nested containers, tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("accumulation,transition", [(1, "ramp"), (2, "ramp"), (2, "preserve")],
                         ids=["ramp", "ramp-accumulation2", "preserve-accumulation2"])
def test_stop_and_resume_across_transitions_is_bit_identical(tiny_sd15_path, tmp_path, no_network,
                                                             accumulation, transition):
    data = tmp_path / "images"
    make_images(data)
    full = parse_job(spec(tiny_sd15_path, data, tmp_path / "full", accumulation, transition))
    split = parse_job(spec(tiny_sd15_path, data, tmp_path / "split", accumulation, transition))

    family, ts = fresh(tiny_sd15_path, full)
    done = train(full, family=family, training_set=ts)
    steps_of = [t["step"] for t in done.transitions]
    assert len(steps_of) == 2 and steps_of[0] < STOP < steps_of[1], steps_of  # one transition on each side

    # first half: stopped at a step boundary, as a cancel or Ctrl+C does
    with pytest.raises(InterruptedTraining) as stopped:
        train(split, StopAfter(STOP), family=family, training_set=ts)
    assert stopped.value.step == STOP
    assert stopped.value.checkpoint_path == ckpt.bundle_path(split.checkpoint_dir, STOP)
    assert load_file(str(stopped.value.lora_path))  # the partial LoRA is a complete file
    # second half: a new model object, resumed from `latest`
    family2, ts2 = fresh(tiny_sd15_path, split)
    resumed = train(split, family=family2, training_set=ts2)
    assert resumed.step == STEPS

    a = ckpt.load_bundle(ckpt.find_resume(full.checkpoint_dir, "latest"))
    b = ckpt.load_bundle(ckpt.find_resume(split.checkpoint_dir, "latest"))
    assert a["state"]["step"] == b["state"]["step"] == STEPS
    assert_same_tree(a["lora"], b["lora"], "lora")
    assert_same_tree(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tree(a["lr_scheduler"], b["lr_scheduler"], "lr_scheduler")
    assert_same_tree(a["rng"], b["rng"], "rng")
    assert_same_tree(a["state"], b["state"], "state")  # alpha scheduler (stats windows included), data position
    assert a["state"]["scheduler"]["history"] == done.transitions
    assert_same_tree(load_file(str(done.lora_path)), load_file(str(resumed.lora_path)), "exported LoRA")

    ra, rb = read_records(full.metrics_path), read_records(split.metrics_path)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))  # no duplicated or missing step
    assert rb[STOP - 1]["event"] == "interrupt" and rb[STOP]["event"] == "resume"
    assert [strip_volatile(r) for r in ra] == [strip_volatile(r) for r in rb]
    if transition == "ramp":  # the stop fell inside the ramp: alphas in force differ from both phase targets
        assert 4.0 < rb[STOP - 1]["conv_alpha"] < 8.0

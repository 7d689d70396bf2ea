"""Job file validation: every error names the field and says what is allowed."""

import copy
import json

import pytest
import yaml

from trainer.errors import JobError
from trainer.job import job_to_dict, load_job, parse_job

SEED_SCHEDULE = """
enabled: true
linear_alpha: 16
conv_alpha_phases:
  foundation: {alpha: 8, min_steps: 2000, exit_criteria: {loss_improvement_rate_below: 0.005, min_gradient_stability: 0.50, min_loss_r2: 0.01}}
  balance:    {alpha: 14, min_steps: 3000, exit_criteria: {loss_improvement_rate_below: 0.005, min_gradient_stability: 0.50, min_loss_r2: 0.01}}
  emphasis:   {alpha: 20, min_steps: 2000}
"""


def base(family="sd15", **net):
    return {
        "job": "my_lora",
        "model": {"family": family, "path": "/models/x", "dtype": "fp32"},
        "datasets": [{"folder_path": "/data/x", "resolution": [512], "num_frames": 33 if family == "wan21" else 1}],
        "network": {"linear": 16, "linear_alpha": 16, **net},
        "train": {"steps": 100},
    }


def err(data) -> JobError:
    with pytest.raises(JobError) as e:
        parse_job(data)
    return e.value


def test_issue_example_parses_with_seed_schedule_verbatim(tmp_path):
    text = f"""
job: my_lora
output_dir: ./output/my_lora
model: {{family: sd15, path: /models/sd15, dtype: bf16}}
datasets:
  - {{folder_path: /data/clips, caption_ext: txt, trigger_word: ohwx, caption_dropout_rate: 0.05,
     resolution: [512], num_frames: 1, num_repeats: 1}}
network:
  type: lora
  linear: 16
  linear_alpha: 16
  conv: 8
  conv_alpha: 8
  only_if_contains: []
  ignore_if_contains: []
  alpha_schedule:
{SEED_SCHEDULE.replace(chr(10), chr(10) + '    ')}
train: {{steps: 3000, batch_size: 1, gradient_accumulation: 1, lr: 1.0e-4, optimizer: adamw,
        lr_scheduler: constant, warmup_steps: 0, max_grad_norm: 1.0, seed: 42, gradient_checkpointing: false}}
save: {{every: 500, keep_last: 3, resume: latest}}
"""
    p = tmp_path / "job.yaml"
    p.write_text(text)
    job = load_job(p)
    sched = job.network.alpha_schedule
    assert [ph.name for ph in sched.phases] == ["foundation", "balance", "emphasis"]
    assert [ph.alphas for ph in sched.phases] == [{"conv": 8.0}, {"conv": 14.0}, {"conv": 20.0}]
    assert sched.phases[0].exit.loss_improvement_rate_below == 0.005
    assert sched.phases[1].min_steps == 3000
    assert job.network.linear_alpha == 16
    assert job.output_dir == str(tmp_path / "output/my_lora")  # relative to the job file
    # JSON is accepted too, and a round trip through job_to_dict parses to the same job
    pj = tmp_path / "job.json"
    pj.write_text(json.dumps(job_to_dict(job)))
    again = load_job(pj)
    assert again.network.alpha_schedule == sched
    assert again.train == job.train


@pytest.mark.parametrize("mutate, field, words", [
    (lambda d: d["model"].update(family="sd99"), "model.family", "sd15"),
    (lambda d: d.pop("datasets"), "datasets", "required"),
    (lambda d: d.update(datasets=[]), "datasets", "non-empty"),
    (lambda d: d["network"].update(linear=-1), "network.linear", ">= 0"),
    (lambda d: d["network"].update(linear_alpha=0), "network.linear_alpha", "> 0"),
    (lambda d: d["network"].update(linear=0, conv=0), "network.linear", "nothing would be trained"),
    (lambda d: d["network"].update(rnak=4), "network.rnak", "unknown key"),
    (lambda d: d["train"].update(lr="fast"), "train.lr", "number"),
    (lambda d: d["train"].update(optimizer="lion"), "train.optimizer", "adamw"),
    (lambda d: d["train"].update(steps=0), "train.steps", ">= 1"),
    (lambda d: d["datasets"][0].update(resolution=[500]), "datasets[0].resolution", "multiple of 8"),
    (lambda d: d["datasets"][0].update(caption_dropout_rate=1.5), "datasets[0].caption_dropout_rate", "<= 1"),
    (lambda d: d["datasets"][0].update(num_frames=5), "datasets[0].num_frames", "still images"),
    (lambda d: d.update(job="../evil"), "job", "path separators"),
    (lambda d: d.update(job="a/b"), "job", "path separators"),
    (lambda d: d["model"].update(dtype="int4"), "model.dtype", "fp32"),
])
def test_errors_name_the_field(mutate, field, words):
    d = base()
    mutate(d)
    e = err(d)
    assert e.field == field, e
    assert words in e.message, e.message


def test_unknown_key_suggests_the_near_one():
    d = base()
    d["train"]["learning_rate"] = 1e-4
    assert "allowed keys" in err(d).message
    d = base()
    d["train"]["step"] = 10
    assert "did you mean 'steps'" in err(d).message


def test_wan_resolution_factor_and_frames():
    d = base("wan21")
    d["datasets"][0]["resolution"] = [520]
    e = err(d)
    assert e.field == "datasets[0].resolution" and "16" in e.message
    d = base("wan21")
    d["datasets"][0]["num_frames"] = 32
    e = err(d)
    assert e.field == "datasets[0].num_frames" and "4k+1" in e.message


def test_conv_phases_on_model_without_conv_targets_point_to_linear_phases():
    d = base("wan21")
    d["network"]["alpha_schedule"] = yaml.safe_load(SEED_SCHEDULE)
    e = err(d)
    assert e.field == "network.alpha_schedule.conv_alpha_phases"
    assert "linear_alpha_phases" in e.message
    # SD 1.5 with conv rank 0 is the same mistake
    d = base("sd15")
    d["network"]["alpha_schedule"] = yaml.safe_load(SEED_SCHEDULE)
    assert "network.conv is 0" in err(d).message


def test_linear_phases_schedule_linear_layers_on_wan():
    d = base("wan21")
    sched = yaml.safe_load(SEED_SCHEDULE)
    sched["linear_alpha_phases"] = sched.pop("conv_alpha_phases")
    del sched["linear_alpha"]
    d["network"]["alpha_schedule"] = sched
    job = parse_job(d)
    assert job.network.alpha_schedule.groups == ("linear",)


@pytest.mark.parametrize("mutate, field, words", [
    (lambda s: s["conv_alpha_phases"]["balance"].pop("alpha"), "conv_alpha_phases.balance.alpha", "required"),
    (lambda s: s["conv_alpha_phases"]["balance"].update(alpha=-2), "conv_alpha_phases.balance.alpha", "> 0"),
    (lambda s: s["conv_alpha_phases"]["balance"].update(min_steps=-1), "conv_alpha_phases.balance.min_steps", ">= 0"),
    (lambda s: s["conv_alpha_phases"]["foundation"]["exit_criteria"].update(min_gradient_stability=2),
     "conv_alpha_phases.foundation.exit_criteria.min_gradient_stability", "<= 1"),
    (lambda s: s.update(conv_alpha_phases={}), "conv_alpha_phases", "mapping of phase name"),
    (lambda s: s.update(preset="audio"), "preset", "video"),
])
def test_schedule_errors(mutate, field, words):
    d = base(conv=8, conv_alpha=8)
    sched = yaml.safe_load(SEED_SCHEDULE)
    mutate(sched)
    d["network"]["alpha_schedule"] = sched
    e = err(d)
    assert e.field == "network.alpha_schedule." + field, e
    assert words in e.message


def test_both_groups_must_share_phase_names():
    d = base(conv=8, conv_alpha=8)
    sched = yaml.safe_load(SEED_SCHEDULE)
    sched["linear_alpha_phases"] = {"a": {"alpha": 4}, "b": {"alpha": 8}, "c": {"alpha": 16}}
    d["network"]["alpha_schedule"] = sched
    assert "same phase names" in err(d).message
    sched["linear_alpha_phases"] = {"foundation": {"alpha": 4, "min_steps": 2000,
                                                   "exit_criteria": sched["conv_alpha_phases"]["foundation"]["exit_criteria"]},
                                    "balance": {"alpha": 8, "min_steps": 3000,
                                                "exit_criteria": sched["conv_alpha_phases"]["balance"]["exit_criteria"]},
                                    "emphasis": {"alpha": 16, "min_steps": 2000}}
    job = parse_job(d)
    assert job.network.alpha_schedule.phases[1].alphas == {"conv": 14.0, "linear": 8.0}


def test_presets_fill_phases_and_thresholds():
    d = base("wan21")
    d["network"]["alpha_schedule"] = {"preset": "video"}
    job = parse_job(d)
    ph = job.network.alpha_schedule.phases
    assert [p.name for p in ph] == ["foundation", "balance", "emphasis"]
    assert ph[0].alphas == {"linear": 8.0}  # Wan has no conv targets: the preset schedules linear layers
    assert (ph[0].exit.loss_improvement_rate_below, ph[0].exit.min_gradient_stability, ph[0].exit.min_loss_r2) == (0.005, 0.5, 0.01)
    d = base(conv=8, conv_alpha=8)
    d["network"]["alpha_schedule"] = {"preset": "image"}
    ph = parse_job(d).network.alpha_schedule.phases
    assert ph[0].alphas == {"conv": 8.0} and ph[0].exit.min_gradient_stability == 0.55


def test_yaml_string_numbers_and_scalar_resolution():
    d = base()
    d["train"]["lr"] = "1e-4"  # PyYAML reads 1e-4 (no dot) as a string
    d["datasets"][0]["resolution"] = 256
    job = parse_job(d)
    assert job.train.lr == 1e-4 and job.datasets[0].resolution == [256]


def test_network_signature_changes_with_shape_not_with_lr():
    a = parse_job(base())
    d = base()
    d["train"]["lr"] = 3e-4
    assert parse_job(d).network_signature() == a.network_signature()
    d = base()
    d["network"]["linear"] = 8
    assert parse_job(d).network_signature() != a.network_signature()


def test_bad_files(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        load_job(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("job: [unclosed")
    with pytest.raises(JobError, match="not valid YAML"):
        load_job(p)
    p.write_bytes("job: caf\xe9".encode("latin-1"))
    with pytest.raises(JobError, match="UTF-8"):
        load_job(p)


def test_two_experts_always_both_train():
    # A14B experts alternate every switch_boundary_every steps (default 100): a shorter run would export an
    # untrained low-noise LoRA, so the default shrinks to steps / 2, and a value given by the user is refused.
    data = base("wan22_14b")
    data["datasets"][0]["num_frames"] = 5
    data["train"] = {"steps": 60}
    assert parse_job(data).train.switch_boundary_every == 30
    data["train"] = {"steps": 1000}
    assert parse_job(data).train.switch_boundary_every == 100
    data["train"] = {"steps": 60, "switch_boundary_every": 60}
    e = err(data)
    assert e.field == "train.switch_boundary_every" and "low-noise expert would never train" in str(e)
    assert "at most 30" in str(e)
    data["model"]["train_low_noise"] = False  # one expert: nothing to alternate
    assert parse_job(data).train.switch_boundary_every == 60
    data = base("wan21")
    data["train"] = {"steps": 60}
    assert parse_job(data).train.switch_boundary_every == 100

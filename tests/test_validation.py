"""Fixed-noise validation: the probe (timestep quantiles, u range, determinism, no RNG use, dropout off), the
scheduler's validation exit source, and the job's validation / transition settings."""

import json
import math

import pytest
import torch

from fixtures_models import tiny_sd15_path  # noqa: F401
from trainer.data.training_set import TrainingSet
from trainer.demo import make_images
from trainer.errors import JobError
from trainer.families import get_family
from trainer.job import job_to_dict, parse_job
from trainer.lora import LoRANetwork
from trainer.schedule.phases_config import ExitCriteria, Phase, ScheduleConfig
from trainer.schedule.scheduler import AlphaScheduler, format_transition
from trainer.validation import FixedNoiseProbe, quantile_midpoints

# -- the probe ------------------------------------------------------------------------------------------------


def test_quantile_midpoints():
    assert quantile_midpoints(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    assert quantile_midpoints(2, 0.5, 1.0).tolist() == [0.625, 0.875]  # e.g. a high-noise expert's range
    for bad in [(0,), (4, 0.5, 0.5), (4, -0.1, 1.0), (4, 0.0, 1.5)]:
        with pytest.raises(ValueError):
            quantile_midpoints(*bad)


@pytest.fixture(scope="module")
def sd15_set(tiny_sd15_path, tmp_path_factory):
    data = tmp_path_factory.mktemp("val_images")
    make_images(data)
    fam = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
    job = parse_job({"job": "v", "model": {"family": "sd15", "path": str(tiny_sd15_path), "dtype": "fp32"},
                     "datasets": [{"folder_path": str(data), "resolution": [32]}]})
    ts = TrainingSet.build(job.datasets, fam, seed=0,
                           log=lambda m: None)
    return fam, ts


def test_probe_is_deterministic_uses_no_rng_and_chunks_equal(sd15_set):
    fam, ts = sd15_set
    probe = FixedNoiseProbe(ts, fam, items=3, timesteps=4, seed=5)
    assert probe.indices == [0, 2, 4] and len(probe.batches) == 3
    rng = torch.get_rng_state()
    a = probe.loss(per_timestep=True)
    b = probe.loss(per_timestep=True)
    assert torch.equal(torch.get_rng_state(), rng)  # validating does not move the training run's RNG
    assert a == b and len(a[1]) == 4 and a[0] == pytest.approx(sum(a[1]) / 4)
    chunked = FixedNoiseProbe(ts, fam, items=3, timesteps=4, seed=5, chunk=1).loss(per_timestep=True)
    assert chunked[1] == pytest.approx(a[1], rel=1e-5)
    other_seed = FixedNoiseProbe(ts, fam, items=3, timesteps=4, seed=6).loss()
    assert other_seed != a[0]


def test_probe_u_range_places_the_timesteps(sd15_set):
    fam, ts = sd15_set
    low = FixedNoiseProbe(ts, fam, items=1, timesteps=4, u_range=(0.0, 0.5))
    high = FixedNoiseProbe(ts, fam, items=1, timesteps=4, u_range=(0.5, 1.0))
    assert low.u.tolist() == [0.0625, 0.1875, 0.3125, 0.4375] and high.u.max() < 1.0 and high.u.min() >= 0.5
    lat, _, noise = high.batches[0]
    t_high = fam.add_noise(lat.expand(4, *lat.shape[1:]), noise, high.u.float()).timesteps
    t_low = fam.add_noise(lat.expand(4, *lat.shape[1:]), noise, low.u.float()).timesteps
    assert t_low.max() < 500 <= t_high.min()  # u in [0.5, 1) is the upper half of the 1000 DDPM timesteps
    assert len(high.loss(per_timestep=True)[1]) == 4


def test_probe_turns_lora_dropout_off_and_restores_modes(sd15_set):
    fam, ts = sd15_set
    torch.manual_seed(0)
    net = LoRANetwork(fam.target_modules(4, 4), linear_rank=4, linear_alpha=4, conv_rank=4, conv_alpha=4,
                      dropout=0.5).apply_to()
    try:
        for m in net.lora.values():
            torch.nn.init.normal_(m.up.weight, std=0.2)
        probe = FixedNoiseProbe(ts, fam, items=2, timesteps=2)
        net.train()
        fam.denoiser.train()
        with_eval = probe.loss(modules=(net,))
        assert net.training and fam.denoiser.training  # modes restored
        assert probe.loss(modules=(net,)) == with_eval  # dropout off: deterministic
        noisy = probe.loss()  # the LoRA's dropout lives outside the denoiser: left on, it changes the value
        assert noisy != with_eval
    finally:
        net.remove()


# -- the scheduler's validation source ------------------------------------------------------------------------

VAL_EXIT = ExitCriteria(source="validation", val_window=5, val_rate_below=0.05)


def val_scheduler(min_steps=100, n_phases=2):
    phases = (Phase("a", {"linear": 4.0}, min_steps, VAL_EXIT), Phase("b", {"linear": 8.0}, min_steps, VAL_EXIT),
              Phase("c", {"linear": 16.0}, min_steps))[:n_phases]
    return AlphaScheduler(ScheduleConfig(phases=phases), {"conv": 1.0})


def drive(sched, val_at, steps, every=10, train_loss=lambda s: 5.0 - 0.01 * s):
    """Training steps with a (steeply falling, i.e. never 'train-plateaued') training loss; validation every
    `every` steps. Returns the transitions."""
    out = []
    for step in range(1, steps + 1):
        if step % every == 0:
            sched.observe_validation(step, val_at(step))
        tr = sched.update(step, train_loss(step), 0.9)
        if tr:
            out.append(tr)
    return out


def test_validation_source_waits_while_val_falls_and_ends_on_its_plateau():
    # val: falls 10% of its value per 100 steps until step 400, then flat with a little noise
    def val(step):
        return (0.5 * math.exp(-step / 1000 * 1.05) if step <= 400 else 0.5 * math.exp(-0.42)) + \
            (1e-4 if (step // 10) % 2 else -1e-4)

    s = val_scheduler()
    trs = drive(s, val, 1000)
    # falling at ~ -1.05 (relative, per 1000 steps) >> 0.05: no transition at min_steps (100) nor while it
    # falls; the first window of 5 evaluations entirely on the final level is 400..440
    assert [t["step"] for t in trs] == [440]
    tr = trs[0]
    assert tr["source"] == "validation" and tr["val_samples"] == 5 and abs(tr["val_rate"]) < 0.05
    assert tr["thresholds"] == {"min_steps": 100, "min_val_losses": 5, "val_plateau": -0.05}
    assert "validation loss change" in format_transition(tr)
    # the training loss never plateaued: the train rules would have blocked; they are not consulted
    assert s.snapshot()["loss_slope"] is not None and s.snapshot()["loss_slope"] < -0.005


def test_validation_window_restarts_per_phase_and_min_steps_holds():
    s = val_scheduler(min_steps=200, n_phases=3)
    trs = drive(s, lambda step: 0.3, 900)  # flat from the start: ends at min_steps, then 5 fresh values
    assert [t["step"] for t in trs] == [200, 400]
    assert [t["val_samples"] for t in trs] == [5, 5]
    assert s.validation_snapshot() == {"val_rate": 0.0, "val_samples": 5}  # clipped to the window
    assert s.phase.name == "c"


def test_rising_validation_also_ends_the_phase_but_missing_values_block():
    s = val_scheduler()
    assert [t["step"] for t in drive(s, lambda step: 0.2 + 1e-4 * step, 250)] == [100]
    none = val_scheduler()
    assert drive(none, lambda step: float("nan"), 500) == []
    verdict = none.explain()
    assert verdict["source"] == "validation" and not verdict["criteria"]["min_val_losses"]["ok"]


def test_validation_state_round_trips():
    a = val_scheduler()
    drive(a, lambda step: 1.0 / step ** 0.2, 230)
    b = val_scheduler()
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    assert b.validation_snapshot() == a.validation_snapshot()
    old = a.state_dict()
    del old["val_regression"]  # a state written before validation existed still loads
    c = val_scheduler()
    c.load_state_dict(old)
    assert c.validation_snapshot()["val_samples"] == 0


# -- the job file ------------------------------------------------------------------------------------------


def job_spec(tmp_path, **extra):
    (tmp_path / "d").mkdir(exist_ok=True)
    spec = {"job": "j", "output_dir": str(tmp_path / "out"),
            "model": {"family": "wan21", "path": str(tmp_path / "m"), "dtype": "fp32"},
            "datasets": [{"folder_path": str(tmp_path / "d")}],
            "network": {"linear": 4, "linear_alpha": 4}}
    for k, v in extra.items():
        spec[k] = v
    return spec


def test_validation_section_defaults_and_relative_folder(tmp_path):
    assert parse_job(job_spec(tmp_path)).validation is None
    assert parse_job(job_spec(tmp_path, validation={"enabled": False})).validation is None
    v = parse_job(job_spec(tmp_path, validation={"folder_path": "held_out"}), base_dir=tmp_path).validation
    assert (v.every, v.items, v.timesteps, v.seed, v.patience, v.min_delta, v.stop_on_plateau, v.keep_best) == \
           (100, 4, 8, 1234, 5, 0.0, False, True)
    assert v.folder_path == str(tmp_path / "held_out")


@pytest.mark.parametrize("section, field", [
    ({"every": 0}, "validation.every"),
    ({"items": 0}, "validation.items"),
    ({"min_delta": 0.9}, "validation.min_delta"),
    ({"stop_on_plateau": "yes"}, "validation.stop_on_plateau"),
    ({"evry": 10}, "validation.evry"),
])
def test_validation_section_errors_name_the_field(tmp_path, section, field):
    with pytest.raises(JobError) as err:
        parse_job(job_spec(tmp_path, validation=section))
    assert err.value.field == field


def test_preset_listens_to_validation_when_a_section_exists(tmp_path):
    net = {"linear": 4, "linear_alpha": 4, "alpha_schedule": {"preset": "video"}}
    plain = parse_job(job_spec(tmp_path, network=net)).network.alpha_schedule
    assert {p.exit.source for p in plain.phases} == {"train"}
    with_val = parse_job(job_spec(tmp_path, network=net, validation={"every": 50})).network.alpha_schedule
    assert {p.exit.source for p in with_val.phases} == {"validation"}
    assert with_val.phases[0].exit.loss_improvement_rate_below == 0.005  # the rest of the preset stays
    # a phase may still choose the training loss explicitly
    explicit = {"linear": 4, "linear_alpha": 4, "alpha_schedule": {"preset": "video", "linear_alpha_phases": {
        "a": {"alpha": 4, "exit_criteria": {"source": "train"}}, "b": {"alpha": 8}}}}
    mixed = parse_job(job_spec(tmp_path, network=explicit, validation={})).network.alpha_schedule
    assert [p.exit.source for p in mixed.phases] == ["train", "validation"]


def test_validation_source_needs_a_validation_section(tmp_path):
    net = {"linear": 4, "linear_alpha": 4, "alpha_schedule": {"linear_alpha_phases": {
        "a": {"alpha": 4, "exit_criteria": {"source": "validation", "val_window": 4, "val_rate_below": 0.1}},
        "b": {"alpha": 8}}}}
    with pytest.raises(JobError) as err:
        parse_job(job_spec(tmp_path, network=net))
    assert err.value.field == "network.alpha_schedule.linear_alpha_phases.a.exit_criteria.source"
    job = parse_job(job_spec(tmp_path, network=net, validation={"every": 20}))
    ex = job.network.alpha_schedule.phases[0].exit
    assert (ex.source, ex.val_window, ex.val_rate_below) == ("validation", 4, 0.1)
    again = parse_job(json.loads(json.dumps(job_to_dict(job))))
    assert again.network.alpha_schedule == job.network.alpha_schedule and again.validation == job.validation


@pytest.mark.parametrize("sched, field", [
    ({"transition": "ramp"}, "network.alpha_schedule.ramp_steps"),
    ({"transition": "preserve", "ramp_steps": 10}, "network.alpha_schedule.ramp_steps"),
    ({"transition": "smooth"}, "network.alpha_schedule.transition"),
])
def test_transition_setting_errors(tmp_path, sched, field):
    net = {"linear": 4, "linear_alpha": 4, "alpha_schedule": {
        **sched, "linear_alpha_phases": {"a": {"alpha": 4}, "b": {"alpha": 8}}}}
    with pytest.raises(JobError) as err:
        parse_job(job_spec(tmp_path, network=net))
    assert err.value.field == field


def test_transition_kinds_parse(tmp_path):
    def kind(**sched):
        net = {"linear": 4, "linear_alpha": 4, "alpha_schedule": {
            **sched, "linear_alpha_phases": {"a": {"alpha": 4}, "b": {"alpha": 8}}}}
        job = parse_job(job_spec(tmp_path, network=net))
        assert parse_job(json.loads(json.dumps(job_to_dict(job)))).network.alpha_schedule == \
            job.network.alpha_schedule
        return job.network.alpha_schedule.transition_kind

    assert kind() == "jump"
    assert kind(ramp_steps=5) == "ramp"
    assert kind(transition="ramp", ramp_steps=5) == "ramp"
    assert kind(transition="preserve") == "preserve"
    assert kind(transition="jump") == "jump"

"""The alpha phase state machine: each exit rule on its own, ramp, stickiness, resume, presets."""

import json
import math
import random

import pytest

from trainer.errors import CheckpointError, JobError
from trainer.schedule.phases_config import ExitCriteria, Phase, ScheduleConfig
from trainer.schedule.presets import PRESETS, preset_phases
from trainer.schedule.scheduler import AlphaScheduler, format_transition

BASE = {"linear": 16.0, "conv": 4.0}
THR = 0.001  # loss per step
EXIT = ExitCriteria(loss_improvement_rate_below=THR, min_gradient_stability=0.5, min_loss_r2=0.1,
                    max_loss_cv=0.5, r2_gate=False)


def make(exit=EXIT, min_steps=150, ramp_steps=0, n_phases=3, min_losses=100):
    phases = tuple(Phase(name=n, alphas={"conv": a}, min_steps=min_steps, exit=exit)
                   for n, a in zip(("foundation", "balance", "emphasis"), (8.0, 14.0, 20.0)))[:n_phases]
    return AlphaScheduler(ScheduleConfig(phases=phases, ramp_steps=ramp_steps, min_losses=min_losses), BASE)


def flat(k):
    """Plateau: alternating 0.1 +- 0.005, no trend (CV 0.05)."""
    return 0.1 + (0.005 if k % 2 else -0.005)


def run(sched, losses, stability=0.7, start=1):
    """Feed losses from `start`; return the transition records with their steps."""
    out = []
    for i, loss in enumerate(losses):
        stab = stability(i) if callable(stability) else stability
        rec = sched.update(start + i, loss, stab)
        if rec:
            out.append(rec)
    return out


def only_failing(sched):
    return sorted(name for name, c in sched.explain()["criteria"].items() if not c["ok"])


# -- each rule on its own ---------------------------------------------------------------------------------

def test_plateau_passes_at_min_steps():
    s = make()
    recs = run(s, [flat(k) for k in range(150)])
    assert [r["step"] for r in recs] == [150]
    r = recs[0]
    assert (r["from_phase"], r["to_phase"], r["steps_in_phase"]) == ("foundation", "balance", 150)
    assert r["from_alphas"] == {"linear": 16.0, "conv": 8.0} and r["to_alphas"] == {"linear": 16.0, "conv": 14.0}
    assert abs(r["slope"]) < 1e-5 and r["cv"] == pytest.approx(0.05) and r["stability"] == pytest.approx(0.7)
    assert r["loss_samples"] == 150 and 0.0 <= r["r2"] < 0.1
    assert s.phase.name == "balance" and s.phase_idx == 1 and s.steps_in_phase == 0
    assert s.alphas() == {"linear": 16.0, "conv": 14.0}


def test_falling_faster_than_threshold_blocks():
    s = make()
    assert run(s, [2.0 - 0.002 * k for k in range(400)]) == []  # slope -0.002 < -0.001
    assert only_failing(s) == ["plateau"]
    assert s.explain()["criteria"]["plateau"]["value"] == pytest.approx(-0.002)
    # falling a little slower than the threshold is a plateau in the spec's sense
    s2 = make()
    assert [r["step"] for r in run(s2, [2.0 - 0.0009 * k for k in range(299)])] == [150]


def test_rising_blocks_but_tiny_rise_passes():
    s = make()
    assert run(s, [0.1 + 1e-4 * k for k in range(400)]) == []  # +1e-4 > 0.05 * 0.001
    assert only_failing(s) == ["not_rising"]
    s2 = make()
    assert [r["step"] for r in run(s2, [0.1 + 4e-5 * k for k in range(299)])] == [150]


def test_unstable_gradients_block():
    s = make()
    assert run(s, [flat(k) for k in range(400)], stability=0.45) == []
    assert only_failing(s) == ["gradient_stability"]
    # stability recovers: the EMA (span 50) crosses 0.5 a few steps later, then the phase ends
    recs = run(s, [flat(k) for k in range(400, 500)], stability=0.9, start=401)
    assert len(recs) == 1 and 401 < recs[0]["step"] < 420 and recs[0]["stability"] >= 0.5


def test_missing_stability_blocks_unless_threshold_is_zero():
    s = make()
    assert run(s, [flat(k) for k in range(400)], stability=None) == []
    assert only_failing(s) == ["gradient_stability"]
    assert s.snapshot()["gradient_stability_avg"] is None
    no_stab = make(exit=ExitCriteria(THR, 0.0, 0.1))
    assert [r["step"] for r in run(no_stab, [flat(k) for k in range(299)], stability=None)] == [150]


def test_too_few_steps_block():
    s = make(min_steps=1000)
    recs = run(s, [flat(k) for k in range(1200)])
    assert [r["step"] for r in recs] == [1000]


def test_too_few_losses_block():
    # Only odd steps have a loss: min_steps (150) is reached at step 150 with 75 losses; the 100th
    # loss arrives at step 199. None/NaN losses still count as steps in the phase.
    s = make()
    losses = [flat(k) if k % 2 else (None if k % 4 else float("nan")) for k in range(1, 300)]
    recs = run(s, losses)
    assert [r["step"] for r in recs] == [199]
    assert recs[0]["loss_samples"] == 100 and recs[0]["steps_in_phase"] == 199


def test_too_few_losses_reported_by_explain():
    s = make()
    run(s, [flat(k) if k < 60 else None for k in range(300)])
    assert only_failing(s) == ["min_losses"]


def test_noisy_loss_cv_blocks():
    noisy = [0.1 + (0.09 if k % 2 else -0.09) for k in range(400)]  # CV 0.9
    s = make()
    assert run(s, noisy) == []
    assert only_failing(s) == ["loss_cv"]
    assert s.snapshot()["loss_cv"] == pytest.approx(0.9)
    tolerant = make(exit=ExitCriteria(THR, 0.5, 0.1, max_loss_cv=1.0))
    assert [r["step"] for r in run(tolerant, noisy[:299])] == [150]


def test_r2_gate_off_by_default_on_blocks_flat_plateau():
    s = make(exit=ExitCriteria(THR, 0.5, 0.1, r2_gate=True))
    assert run(s, [flat(k) for k in range(400)]) == []
    assert only_failing(s) == ["loss_r2"]
    assert s.explain()["criteria"]["loss_r2"]["gated"] is True
    # a slow, clean decline has a high R2 and passes the gate
    gated = make(exit=ExitCriteria(THR, 0.5, 0.1, r2_gate=True))
    recs = run(gated, [0.5 - 0.0005 * k + (1e-4 if k % 2 else -1e-4) for k in range(299)])
    assert [r["step"] for r in recs] == [150] and recs[0]["r2"] > 0.9
    ungated = make()
    assert run(ungated, [flat(k) for k in range(150)])[0]["r2"] < 0.1  # logged, not gating


def test_final_phase_is_sticky_and_each_phase_restarts_its_statistics():
    s = make()
    recs = run(s, [flat(k) for k in range(5000)])
    # one transition per update, each after its own 150 steps and 100 fresh losses; then never again
    assert [r["step"] for r in recs] == [150, 300]
    assert [r["loss_samples"] for r in recs] == [150, 150]
    assert s.phase.name == "emphasis" and s.steps_in_phase == 4700
    assert s.explain()["final"] is True and s.explain()["ready"] is False
    assert [(h["from_phase"], h["to_phase"]) for h in s.history] == [("foundation", "balance"),
                                                                    ("balance", "emphasis")]


def test_statistics_cleared_at_transition():
    s = make()
    run(s, [flat(k) for k in range(150)])
    snap = s.snapshot()
    assert snap == {"loss_slope": None, "loss_r2": None, "loss_cv": None, "loss_samples": 0,
                    "gradient_stability_avg": None}


def test_single_phase_never_exits():
    s = make(n_phases=1)
    assert run(s, [flat(k) for k in range(1000)]) == []


# -- ramp ---------------------------------------------------------------------------------------------------

def test_ramp_moves_alpha_linearly_over_ramp_steps():
    s = make(ramp_steps=4)
    assert s.alphas() == {"linear": 16.0, "conv": 8.0}
    run(s, [flat(k) for k in range(150)])
    seen = [s.alphas()["conv"]]  # for the first forward of the new phase
    for k in range(150, 155):
        s.update(k + 1, flat(k), 0.7)
        seen.append(s.alphas()["conv"])
    assert seen == [9.5, 11.0, 12.5, 14.0, 14.0, 14.0]
    assert s.alphas()["linear"] == 16.0  # the unscheduled group keeps its base alpha


def test_no_ramp_jumps():
    s = make(ramp_steps=0)
    run(s, [flat(k) for k in range(150)])
    assert s.alphas()["conv"] == 14.0


def test_transition_mid_ramp_starts_from_the_ramped_value():
    s = make(ramp_steps=400, min_steps=150)
    run(s, [flat(k) for k in range(300)])
    rec = s.history[1]
    # second transition at step 300: 150 steps into an 8 -> 14 ramp of 400 steps: 8 + 6 * 150/400
    assert rec["from_alphas"]["conv"] == pytest.approx(8 + 6 * 150 / 400)
    assert s.alphas()["conv"] == pytest.approx(rec["from_alphas"]["conv"] + (20 - rec["from_alphas"]["conv"]) / 400)


# -- resume ------------------------------------------------------------------------------------------------

def test_state_round_trip_mid_window_gives_identical_decisions():
    rng = random.Random(0)
    losses = [0.1 + 0.004 * rng.random() - (1e-4 if k < 200 else 0.0) * k / 10 for k in range(900)]
    stabs = [0.4 + 0.4 * rng.random() for _ in range(900)]
    a = make(ramp_steps=7)
    run(a, losses[:233], stability=lambda i: stabs[i])
    sd = json.loads(json.dumps(a.state_dict(), allow_nan=False))  # strict JSON, like a checkpoint
    b = make(ramp_steps=7)
    b.load_state_dict(sd)
    for k in range(233, 900):
        ra = a.update(k + 1, losses[k], stabs[k])
        rb = b.update(k + 1, losses[k], stabs[k])
        assert ra == rb
        assert a.snapshot() == b.snapshot() and a.alphas() == b.alphas() and a.steps_in_phase == b.steps_in_phase
    assert a.history == b.history and len(a.history) >= 1


@pytest.mark.parametrize("change", ["alpha", "name", "order", "count"])
def test_resume_with_different_phases_is_a_checkpoint_error(change):
    s = make()
    run(s, [flat(k) for k in range(160)])
    sd = s.state_dict()
    phases = list(s.config.phases)
    if change == "alpha":
        phases[1] = Phase("balance", {"conv": 12.0}, 150, EXIT)
    elif change == "name":
        phases[1] = Phase("middle", {"conv": 14.0}, 150, EXIT)
    elif change == "order":
        phases[0], phases[1] = phases[1], phases[0]
    else:
        phases = phases[:2]
    other = AlphaScheduler(ScheduleConfig(phases=tuple(phases)), BASE)
    with pytest.raises(CheckpointError, match="phases differ") as err:
        other.load_state_dict(sd)
    assert "foundation(conv=8)" in str(err.value)


def test_resume_with_retuned_thresholds_is_allowed():
    s = make()
    run(s, [flat(k) for k in range(160)])
    retuned = make(exit=ExitCriteria(0.01, 0.3, 0.05), min_steps=500)
    retuned.load_state_dict(s.state_dict())
    assert retuned.phase_idx == 1 and retuned.steps_in_phase == 10


# -- misc --------------------------------------------------------------------------------------------------

def test_nonfinite_loss_counts_as_step_only():
    s = make()
    s.update(1, float("nan"), 0.6)
    s.update(2, None, float("nan"))
    s.update(3, float("inf"), 0.6)
    s.update(4, 0.2, None)
    assert s.steps_in_phase == 4 and s.snapshot()["loss_samples"] == 1
    assert s.snapshot()["gradient_stability_avg"] == pytest.approx(0.6)
    json.dumps(s.state_dict(), allow_nan=False)


def test_format_transition_names_the_numbers():
    s = make()
    rec = run(s, [flat(k) for k in range(150)])[0]
    line = format_transition(rec)
    assert "step 150" in line and "foundation -> balance" in line and "conv 8 -> 14" in line
    assert "CV 0.050" in line and "gradient stability 0.700" in line


def test_base_alphas_must_cover_unscheduled_groups():
    phases = (Phase("a", {"conv": 8.0}), Phase("b", {"conv": 9.0}))
    with pytest.raises(ValueError, match="linear"):
        AlphaScheduler(ScheduleConfig(phases=phases), {"conv": 4.0})
    both = (Phase("a", {"conv": 8.0, "linear": 4.0}),)
    assert AlphaScheduler(ScheduleConfig(phases=both), {}).alphas() == {"conv": 8.0, "linear": 4.0}


def test_presets_are_the_seeds_thresholds():
    assert PRESETS["video"] == ExitCriteria(0.005, 0.50, 0.01)
    assert PRESETS["image"] == ExitCriteria(0.001, 0.55, 0.1)
    phases = preset_phases("video")
    assert [p.name for p in phases] == ["foundation", "balance", "emphasis"]
    assert [p.alphas for p in phases] == [{"conv": 8.0}, {"conv": 14.0}, {"conv": 20.0}]
    assert [p.min_steps for p in phases] == [2000, 3000, 2000]
    assert all(p.exit == PRESETS["video"] for p in phases)
    lin = preset_phases("image", group="linear", alphas=(4, 8, 16), min_steps=(10, 20, 30))
    assert [p.alphas for p in lin] == [{"linear": 4.0}, {"linear": 8.0}, {"linear": 16.0}]
    assert preset_phases("image", group="both")[0].alphas == {"linear": 8.0, "conv": 8.0}


@pytest.mark.parametrize("kwargs, field", [
    ({"name": "audio"}, "alpha_schedule.preset"),
    ({"name": "video", "group": "attn"}, "alpha_schedule.group"),
    ({"name": "video", "alphas": (8, 14)}, "alpha_schedule.alphas"),
    ({"name": "video", "min_steps": (1, 2, -3)}, "alpha_schedule.min_steps"),
])
def test_preset_errors_name_the_field(kwargs, field):
    with pytest.raises(JobError) as err:
        preset_phases(**kwargs)
    assert err.value.field == field


def test_video_preset_on_seed_like_run():
    # The seed's video thresholds with a real-looking loss curve: exponential decay to a noisy plateau.
    rng = random.Random(3)
    cfg = ScheduleConfig(phases=preset_phases("video", min_steps=(200, 300, 200)))
    s = AlphaScheduler(cfg, BASE)
    losses = [0.08 + 0.1 * math.exp(-k / 150) + 0.01 * rng.random() for k in range(2000)]
    recs = run(s, losses, stability=lambda i: 0.55 + 0.05 * rng.random())
    assert [r["to_phase"] for r in recs] == ["balance", "emphasis"]
    assert recs[0]["step"] >= 200 and recs[1]["step"] - recs[0]["step"] >= 300

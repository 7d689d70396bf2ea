"""Replaying a schedule over a recorded metrics log."""

import json
import math
import random

import pytest

from trainer.errors import TrainerError
from trainer.metrics import MetricsLog, read_records
from trainer.schedule.phases_config import ExitCriteria, Phase, ScheduleConfig
from trainer.schedule.replay import replay
from trainer.schedule.scheduler import AlphaScheduler

BASE = {"linear": 16.0, "conv": 4.0}


def config(min_steps=200, exit=ExitCriteria(0.001, 0.5, 0.1)):
    return ScheduleConfig(phases=(Phase("foundation", {"conv": 8.0}, min_steps, exit),
                                  Phase("balance", {"conv": 14.0}, min_steps, exit),
                                  Phase("emphasis", {"conv": 20.0}, min_steps, exit)))


def live_run(path, cfg, steps=1200, with_stability=True, nan_steps=(57, 433)):
    """What the training loop does: update the scheduler after each good step, log the post-update state."""
    rng = random.Random(0)
    sched = AlphaScheduler(cfg, BASE)
    with MetricsLog(path) as log:
        for step in range(1, steps + 1):
            if step in nan_steps:  # a skipped step: logged, never shown to the scheduler
                log.write(_record(step, float("nan"), None, sched, event="nan_skip"))
                continue
            loss = 0.07 + 0.08 * math.exp(-step / 120) + 0.01 * rng.random()
            stab = 0.5 + 0.2 * rng.random() if with_stability else None
            tr = sched.update(step, loss, stab)
            log.write(_record(step, loss, stab, sched, event="transition" if tr else None, detail=tr))
    return sched


def _record(step, loss, stab, sched, event=None, detail=None):
    snap = sched.snapshot()
    alphas = sched.alphas()
    return {"step": step, "timestamp": None, "loss": loss, **snap, "gradient_stability": stab, "grad_norm": 1.0,
            "lr": 1e-4, "phase": sched.phase.name, "phase_idx": sched.phase_idx,
            "steps_in_phase": sched.steps_in_phase, "linear_alpha": alphas["linear"], "conv_alpha": alphas["conv"],
            "expert": None, "event": event, "event_detail": detail}


def test_replay_with_the_runs_own_schedule_reproduces_its_transitions(tmp_path):
    path = tmp_path / "metrics_x.jsonl"
    sched = live_run(path, config())
    live = sched.history
    assert len(live) == 2
    lines = replay(config(), BASE, read_records(path))
    for line in lines:
        json.dumps(line, allow_nan=False)
    starts, summary = lines[:-1], lines[-1]
    assert [(ln["phase"], ln["start_step"]) for ln in starts] == [
        ("foundation", 1), ("balance", live[0]["step"] + 1), ("emphasis", live[1]["step"] + 1)]
    for ln, tr in zip(starts[1:], live):
        assert ln["decided_at_step"] == tr["step"]
        assert ln["alphas"] == tr["to_alphas"]
        for key in ("slope", "r2", "cv", "stability", "steps_in_phase", "loss_samples"):
            assert ln["reason"][key] == tr[key]  # bit-identical: the log keeps floats exactly
    assert summary["summary"] is True and summary["matches_recorded"] is True
    assert summary["skipped_nan_steps"] == 2 and summary["records"] == 1200
    assert summary["final_phase"] == "emphasis" and summary["transitions"] == 2 and summary["waiting_on"] is None
    assert sum(summary["steps_per_phase"].values()) == 1198


def test_replay_with_retuned_thresholds_moves_the_starts(tmp_path):
    path = tmp_path / "metrics_x.jsonl"
    live_run(path, config(min_steps=200))
    lines = replay(config(min_steps=500), BASE, read_records(path))
    starts = [ln["start_step"] for ln in lines[:-1]]
    assert starts[1] >= 501 and len(starts) == 3 and starts[2] - starts[1] >= 500
    assert lines[-1]["matches_recorded"] is False
    # a strict threshold keeps the first phase going and says what it is waiting on
    strict = replay(config(exit=ExitCriteria(0.001, 0.9, 0.1)), BASE, read_records(path))
    assert len(strict) == 2
    assert list(strict[-1]["waiting_on"]) == ["gradient_stability"]
    assert strict[-1]["waiting_on"]["gradient_stability"]["threshold"] == 0.9


def test_replay_without_stability_in_the_log_warns(tmp_path):
    path = tmp_path / "metrics_x.jsonl"
    live_run(path, config(exit=ExitCriteria(0.001, 0.0, 0.1)), with_stability=False)
    records = read_records(path)
    blocked = replay(config(), BASE, records)
    assert blocked[-1]["transitions"] == 0 and "no gradient_stability" in blocked[-1]["warnings"][0]
    loss_only = replay(config(exit=ExitCriteria(0.001, 0.0, 0.1)), BASE, records)
    assert loss_only[-1]["transitions"] == 2 and loss_only[-1]["warnings"] == []
    assert loss_only[-1]["matches_recorded"] is True


def test_replay_refuses_an_unordered_or_empty_log():
    recs = [{"step": 1, "loss": 0.1}, {"step": 3, "loss": 0.1}, {"step": 2, "loss": 0.1}]
    with pytest.raises(TrainerError, match="step 2 follows step 3"):
        replay(config(), BASE, recs)
    with pytest.raises(TrainerError, match="no records"):
        replay(config(), BASE, [])


def test_replay_accepts_a_bare_loss_log():
    recs = [{"step": s, "loss": 0.1 + (0.001 if s % 2 else -0.001), "gradient_stability": 0.7}
            for s in range(1000, 1500)]
    lines = replay(config(), BASE, recs)
    assert [ln["start_step"] for ln in lines[:-1]] == [1000, 1200, 1400]
    assert lines[-1]["matches_recorded"] is None  # the log names no phases


def test_replay_drives_a_validation_sourced_schedule_from_logged_val_loss(tmp_path):
    ex = ExitCriteria(0.001, 0.0, 0.0, source="validation", val_window=5, val_rate_below=0.05)
    cfg = ScheduleConfig(phases=(Phase("foundation", {"conv": 8.0}, 100, ex), Phase("emphasis", {"conv": 14.0}, 100, ex)))
    path = tmp_path / "metrics_v.jsonl"
    sched = AlphaScheduler(cfg, BASE)
    with MetricsLog(path) as log:
        for step in range(1, 601):
            rec_val = None
            if step % 10 == 0:  # validation falls until step 300, then is flat
                rec_val = 0.1 + 0.05 * max(0.0, 300 - step) / 300
                sched.observe_validation(step, rec_val)
            tr = sched.update(step, 0.1, 0.6)
            rec = _record(step, 0.1, 0.6, sched, event="transition" if tr else None, detail=tr)
            rec["val_loss"] = rec_val
            log.write(rec)
    assert len(sched.history) == 1 and sched.history[0]["step"] > 300  # not while it still fell
    lines = replay(cfg, BASE, read_records(path))
    assert lines[1]["decided_at_step"] == sched.history[0]["step"]

"""Stop advice: best-so-far with relative min_delta, patience counted only while armed, fire once per plateau."""

import json
import math

import pytest

from trainer.schedule.stop_advice import StopAdvisor, format_advice


def feed(advisor, values, start=10, every=10, armed=True):
    """Observe values at steps start, start+every, ...; return [(step, is_new_best, detail)]."""
    out = []
    for i, v in enumerate(values):
        step = start + i * every
        best, detail = advisor.observe(step, v, armed=armed(step) if callable(armed) else armed)
        out.append((step, best, detail))
    return out


def fired(results):
    return [(s, d) for s, _, d in results if d is not None]


def test_plateau_fires_once_after_patience_with_the_best_step():
    falling = [1.0 * 0.9 ** k for k in range(10)]          # steps 10..100, each a new best
    plateau = [falling[-1] * (1.0005 if k % 2 else 1.0002) for k in range(8)]  # never below the best
    results = feed(StopAdvisor(patience=4), falling + plateau)
    assert all(best for _, best, _ in results[:10])
    events = fired(results)
    assert len(events) == 1
    step, detail = events[0]
    assert step == 140  # the 4th evaluation without a new best (110, 120, 130, 140)
    assert detail["best_step"] == 100 and detail["best_val_loss"] == pytest.approx(falling[-1])
    assert detail["evaluations_without_improvement"] == 4 and detail["trend"] == "plateau"
    assert "suggest stop at step 140" in format_advice(detail) and "best step 100" in format_advice(detail)


def test_never_fires_while_the_loss_still_falls():
    results = feed(StopAdvisor(patience=2), [1.0 - 0.01 * k for k in range(60)])
    assert fired(results) == []


def test_rise_is_reported_as_rising():
    values = [1.0, 0.8, 0.7, 0.72, 0.75, 0.79, 0.84]
    events = fired(feed(StopAdvisor(patience=3), values))
    assert len(events) == 1 and events[0][1]["trend"] == "rising" and events[0][1]["best_step"] == 30


def test_min_delta_is_relative_so_tiny_gains_do_not_reset_patience():
    values = [1.0] + [1.0 - 0.001 * k for k in range(1, 6)]  # 0.1% gains
    strict = fired(feed(StopAdvisor(patience=3, min_delta=0.0), values))
    tolerant = fired(feed(StopAdvisor(patience=3, min_delta=0.01), values))
    assert strict == []
    assert [s for s, _ in tolerant] == [40] and tolerant[0][1]["best_step"] == 10


def test_patience_counts_only_while_armed_but_best_is_tracked_throughout():
    adv = StopAdvisor(patience=3)
    values = [1.0, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    # armed from step 60 on (e.g. the schedule's final phase): 60, 70, 80 are its 3 evaluations
    results = feed(adv, values, armed=lambda step: step >= 60)
    assert [s for s, _ in fired(results)] == [80]
    assert fired(results)[0][1]["best_step"] == 20


def test_a_new_best_rearms_the_advice():
    values = [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    events = fired(feed(StopAdvisor(patience=2), values))
    assert [(s, d["best_step"]) for s, d in events] == [(30, 10), (60, 40)]


def test_nonfinite_values_are_ignored():
    adv = StopAdvisor(patience=1)
    assert adv.observe(10, float("nan")) == (False, None)
    assert adv.observe(20, None) == (False, None)
    assert adv.observe(30, math.inf) == (False, None)
    assert adv.best_step is None
    assert adv.observe(40, 0.5) == (True, None)


def test_state_round_trip_gives_identical_decisions():
    values = [1.0 / (1 + k) + 0.01 * ((k * 7) % 5) for k in range(40)]
    a = StopAdvisor(patience=3, min_delta=0.01)
    head = feed(a, values[:17])
    b = StopAdvisor(patience=3, min_delta=0.01)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    ra = feed(a, values[17:], start=180)
    rb = feed(b, values[17:], start=180)
    assert ra == rb and fired(head + ra)


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"min_delta": -0.1}, {"min_delta": 1.0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        StopAdvisor(**kwargs)

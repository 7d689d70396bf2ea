"""Metrics JSONL writer (strict JSON, flush, resume truncation, rotation), tensor columns, widget payload."""

import json
import math
from datetime import datetime

import numpy as np
import pytest
import torch

from trainer.errors import TrainerError
from trainer.metrics import (COLUMNS, EVENT_CODES, EXPERT_CODES, RECORD_KEYS, MetricsLog, metrics_payload,
                             read_records, records_to_tensor)
from trainer.schedule.phases_config import Phase


def record(step, **over):
    rec = {
        "step": step, "timestamp": None, "loss": 0.1 + step * 1e-3, "loss_slope": None, "loss_r2": None,
        "loss_cv": None, "loss_samples": step, "gradient_stability": 0.6, "gradient_stability_avg": 0.55,
        "grad_norm": 1.5, "lr": 1e-4, "phase": "foundation", "phase_idx": 0, "steps_in_phase": step,
        "linear_alpha": 16.0, "conv_alpha": 8.0, "expert": None, "event": None, "event_detail": None,
    }
    rec.update(over)
    return rec


def strict_loads(line):
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token!r} in {line!r}")
    return json.loads(line, parse_constant=refuse)


def test_columns_are_the_documented_order():
    assert COLUMNS == ("step", "loss", "loss_slope", "loss_r2", "loss_cv", "gradient_stability",
                       "gradient_stability_avg", "grad_norm", "lr", "phase_idx", "steps_in_phase", "linear_alpha",
                       "conv_alpha", "expert_idx", "event_code", "val_loss")
    assert EVENT_CODES == {"transition": 1, "checkpoint": 2, "resume": 3, "interrupt": 4, "nan_skip": 5,
                           "suggest_stop": 6}
    assert EXPERT_CODES == {"high_noise": 0, "low_noise": 1}
    import trainer.metrics as m
    for i, c in enumerate(COLUMNS):  # the docstring documents each column with its index
        assert f"{i:2d} {c}" in m.__doc__


def test_log_is_strict_json_and_flushed_per_line(tmp_path):
    path = tmp_path / "metrics_x.jsonl"
    log = MetricsLog(path)
    log.write(record(1, loss=float("nan"), grad_norm=float("inf"), loss_r2=np.float64("nan"),
                     gradient_stability=torch.tensor(0.75), lr=np.float32(2e-4),
                     event="nan_skip", event_detail={"consecutive": 1, "why": float("-inf")}))
    # visible to another reader before close: flushed as written
    text = path.read_text()
    assert text.count("\n") == 1
    assert "NaN" not in text and "Infinity" not in text
    rec = strict_loads(text)
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["loss_r2"] is None
    assert rec["gradient_stability"] == 0.75 and rec["lr"] == pytest.approx(2e-4)
    assert rec["event_detail"] == {"consecutive": 1, "why": None}
    assert set(RECORD_KEYS) <= set(rec)
    assert datetime.fromisoformat(rec["timestamp"]).utcoffset().total_seconds() == 0
    log.write(record(2))
    log.close()
    assert [r["step"] for r in map(strict_loads, path.read_text().splitlines())] == [1, 2]


def test_log_refuses_incomplete_records_and_unknown_events(tmp_path):
    with MetricsLog(tmp_path / "m.jsonl") as log:
        rec = record(1)
        del rec["grad_norm"]
        with pytest.raises(ValueError, match="grad_norm"):
            log.write(rec)
        with pytest.raises(ValueError, match="explosion"):
            log.write(record(1, event="explosion"))


def test_resume_truncates_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics_x.jsonl"
    with MetricsLog(path) as log:
        for s in range(1, 11):
            log.write(record(s))
    with MetricsLog(path, resume_from_step=6) as log:
        assert [r["step"] for r in read_records(path)] == [1, 2, 3, 4, 5, 6]
        for s in range(7, 9):
            log.write(record(s, event="resume" if s == 7 else None))
    steps = [r["step"] for r in read_records(path)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics_x.jsonl"]  # no temp files, no rotation


def test_resume_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLog(path) as log:
        for s in range(1, 4):
            log.write(record(s))
    with open(path, "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # the process died mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        log = MetricsLog(path, resume_from_step=3)
    log.write(record(4))
    log.close()
    assert [r["step"] for r in read_records(path)] == [1, 2, 3, 4]


def test_fresh_start_rotates_an_old_log_instead_of_deleting_it(tmp_path):
    path = tmp_path / "metrics_x.jsonl"
    for run in range(3):
        with MetricsLog(path) as log:
            log.write(record(1, loss=float(run)))
    assert read_records(path)[0]["loss"] == 2.0
    assert read_records(tmp_path / "metrics_x.1.jsonl")[0]["loss"] == 0.0
    assert read_records(tmp_path / "metrics_x.2.jsonl")[0]["loss"] == 1.0
    assert log.rotated_to == tmp_path / "metrics_x.2.jsonl"


def test_read_records_names_file_and_line_of_a_corrupt_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(TrainerError, match=r"bad.jsonl:2"):
        read_records(path)
    with pytest.raises(TrainerError, match="not found"):
        read_records(tmp_path / "missing.jsonl")


def test_records_to_tensor_columns_and_nan():
    recs = [
        record(1),
        record(2, loss=None, loss_slope=-1e-4, loss_r2=0.25, loss_cv=0.3, expert="high_noise", event="checkpoint"),
        record(3, expert="low_noise", event=["transition", "checkpoint"], phase_idx=1, steps_in_phase=0,
               conv_alpha=14.0, lr=[3e-4, 1e-4], val_loss=0.08, gradient_stability=None),
    ]
    t = records_to_tensor(recs)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, len(COLUMNS))
    c = {name: i for i, name in enumerate(COLUMNS)}
    assert t[:, c["step"]].tolist() == [1.0, 2.0, 3.0]
    assert math.isnan(t[1, c["loss"]]) and t[0, c["loss"]].item() == pytest.approx(0.101)
    assert math.isnan(t[0, c["loss_slope"]]) and t[1, c["loss_slope"]].item() == pytest.approx(-1e-4)
    assert t[1, c["loss_r2"]].item() == 0.25 and t[1, c["loss_cv"]].item() == pytest.approx(0.3)
    assert math.isnan(t[2, c["gradient_stability"]]) and t[0, c["gradient_stability"]].item() == pytest.approx(0.6)
    assert t[2, c["lr"]].item() == pytest.approx(3e-4)  # first param group
    assert t[:, c["phase_idx"]].tolist() == [0.0, 0.0, 1.0] and t[2, c["steps_in_phase"]].item() == 0.0
    assert t[:, c["conv_alpha"]].tolist() == [8.0, 8.0, 14.0] and t[0, c["linear_alpha"]].item() == 16.0
    assert math.isnan(t[0, c["expert_idx"]]) and t[1:, c["expert_idx"]].tolist() == [0.0, 1.0]
    assert math.isnan(t[0, c["event_code"]]) and t[1:, c["event_code"]].tolist() == [2.0, 1.0]
    assert math.isnan(t[0, c["val_loss"]]) and t[2, c["val_loss"]].item() == pytest.approx(0.08)
    assert tuple(records_to_tensor([]).shape) == (0, len(COLUMNS))
    with pytest.raises(ValueError, match="transformer_1"):
        records_to_tensor([record(1, expert="transformer_1")])


def test_payload_from_records_and_from_tensor():
    recs = [record(s, loss=(float("nan") if s == 2 else 0.1)) for s in range(1, 4)]
    recs += [record(s, phase="balance", phase_idx=1, steps_in_phase=s - 3, conv_alpha=11.0 if s == 4 else 14.0)
             for s in range(4, 7)]
    recs[2]["event"], recs[2]["event_detail"] = "transition", {"slope": -1e-5, "r2": float("nan")}
    recs[5]["event"] = "checkpoint"
    phases = (Phase("foundation", {"conv": 8.0}), Phase("balance", {"conv": 14.0}))
    payload = metrics_payload(recs, phases)
    text = json.dumps(payload, allow_nan=False)  # strict JSON for the widget
    assert strict_loads(text) == payload
    assert payload["columns"] == list(COLUMNS)
    assert len(payload["rows"]) == 6 and payload["rows"][1][1] is None and payload["rows"][0][0] == 1
    assert payload["phases"] == [
        {"name": "foundation", "phase_idx": 0, "start_step": 1, "alpha": {"conv": 8.0}},
        {"name": "balance", "phase_idx": 1, "start_step": 4, "alpha": {"conv": 14.0}},
    ]
    assert payload["events"] == [{"step": 3, "event": "transition", "detail": {"slope": -1e-5, "r2": None}},
                                 {"step": 6, "event": "checkpoint", "detail": None}]
    from_tensor = metrics_payload(records_to_tensor(recs), ["foundation", "balance"])
    assert from_tensor["rows"] == payload["rows"]
    assert [p["name"] for p in from_tensor["phases"]] == ["foundation", "balance"]
    assert from_tensor["phases"][1]["alpha"] == {"linear": 16.0, "conv": 14.0}  # settled after the ramp
    assert [(e["step"], e["event"]) for e in from_tensor["events"]] == [(3, "transition"), (6, "checkpoint")]
    with pytest.raises(ValueError, match="steps"):
        metrics_payload(torch.zeros(3, 4), [])

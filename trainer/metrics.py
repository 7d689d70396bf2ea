"""The metrics of a run: one strict-JSON record per optimizer step, and the same series as a tensor.

JSONL record (``metrics_<job>.jsonl``, one line per optimizer step, flushed as written, never ``NaN`` or
``Infinity``: undefined values are ``null``). Keys:

    step, timestamp (ISO 8601 UTC), loss, loss_slope (loss per step), loss_r2, loss_cv, loss_samples,
    gradient_stability (raw sign agreement this step), gradient_stability_avg (its EMA), grad_norm, lr,
    phase (configured name), phase_idx, steps_in_phase, linear_alpha, conv_alpha,
    expert (null, "high_noise" or "low_noise"), event (null or one of EVENT_CODES' names, or a list of
    them when several happen at one step), event_detail (object or null), val_loss (optional).

    The schedule fields (phase, phase_idx, steps_in_phase, the alphas, the loss statistics) are those after
    the step's scheduler update: a transition record already names the new phase, with steps_in_phase 0,
    and its alphas are the ones the next step uses.

Tensor (``records_to_tensor``): float32 ``[steps, len(COLUMNS)]``, NaN where a value is undefined, columns in
this fixed order:

     0 step                 1 loss                 2 loss_slope           3 loss_r2
     4 loss_cv              5 gradient_stability   6 gradient_stability_avg
     7 grad_norm            8 lr                   9 phase_idx           10 steps_in_phase
    11 linear_alpha        12 conv_alpha          13 expert_idx          14 event_code
    15 val_loss

expert_idx: NaN none, 0 high_noise, 1 low_noise. event_code: NaN none, 1 transition, 2 checkpoint,
3 resume, 4 interrupt, 5 nan_skip, 6 suggest_stop (with several events at one step, the lowest code).
val_loss: NaN except at validation steps.

Optional record keys (issue 7): on validation steps ``val_loss``, ``val_loss_t`` (per fixed timestep, low u
first), ``val_rate`` and ``val_samples`` (the phase's validation trend, trainer.schedule.scheduler); on health
steps ``health`` ({grad_norm, update_ratio, delta_norm: {block group: value}, update_ratio_total,
delta_norm_total}, trainer/health.py); on every record ``nan_steps`` and ``inf_steps`` (run totals).
``suggest_stop``'s detail: {step, best_step, best_val_loss, val_loss, evaluations_without_improvement, trend}.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from trainer.errors import TrainerError

COLUMNS = (
    "step", "loss", "loss_slope", "loss_r2", "loss_cv", "gradient_stability", "gradient_stability_avg",
    "grad_norm", "lr", "phase_idx", "steps_in_phase", "linear_alpha", "conv_alpha", "expert_idx", "event_code",
    "val_loss",
)
EVENT_CODES = {"transition": 1, "checkpoint": 2, "resume": 3, "interrupt": 4, "nan_skip": 5, "suggest_stop": 6}
EXPERT_CODES = {"high_noise": 0, "low_noise": 1}
RECORD_KEYS = (
    "step", "timestamp", "loss", "loss_slope", "loss_r2", "loss_cv", "loss_samples", "gradient_stability",
    "gradient_stability_avg", "grad_norm", "lr", "phase", "phase_idx", "steps_in_phase", "linear_alpha",
    "conv_alpha", "expert", "event", "event_detail",
)
# Columns taken straight from the record key of the same name.
_DIRECT = tuple(c for c in COLUMNS if c not in ("expert_idx", "event_code"))
_INT_COLUMNS = {"step", "phase_idx", "steps_in_phase", "expert_idx", "event_code"}


def strict_json_value(value, where: str = "record"):
    """``value`` with NaN/Inf replaced by None and numpy/torch scalars turned into Python numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return strict_json_value(value.item(), where)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return strict_json_value(value.item(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-serialisable")


def _events(record: dict) -> list[str]:
    ev = record.get("event")
    if ev is None:
        return []
    return [ev] if isinstance(ev, str) else list(ev)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the log is as readable as any file we write
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rotated_name(path: Path) -> Path:
    """The first free ``<stem>.<n><suffix>`` beside ``path`` (``metrics_x.jsonl`` -> ``metrics_x.1.jsonl``)."""
    n = 1
    while True:
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        if not candidate.exists():
            return candidate
        n += 1


class MetricsLog:
    """Append-only JSONL writer for one run.

    ``resume_from_step=None``: a fresh run; an existing log is renamed to ``<stem>.<n>.jsonl`` (never deleted).
    ``resume_from_step=S``: records with step > S (written after the checkpoint being resumed) are dropped
    with an atomic rewrite, so the log never holds a step twice; the run then appends.
    """

    def __init__(self, path, resume_from_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rotated_to: Path | None = None
        if self.path.exists():
            if resume_from_step is None:
                if self.path.stat().st_size > 0:
                    self.rotated_to = rotated_name(self.path)
                    os.replace(self.path, self.rotated_to)
            else:
                kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_from_step]
                _atomic_write_text(self.path, "".join(self._line(r) for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    @staticmethod
    def _line(record: dict) -> str:
        try:  # almost every record is already strict JSON: skip the walk that maps NaN/Inf/tensors
            return json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        except (ValueError, TypeError):
            return json.dumps(strict_json_value(record), allow_nan=False, separators=(",", ":")) + "\n"

    def write(self, record: dict) -> dict:
        """Append one record. A missing/None ``timestamp`` is set (in place) to now, ISO UTC."""
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise ValueError(f"metrics record for step {record.get('step')!r} lacks keys {missing}")
        for name in _events(record):
            if name not in EVENT_CODES:
                raise ValueError(f"unknown metrics event {name!r}; known: {sorted(EVENT_CODES)}")
        if record.get("timestamp") is None:
            record["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self._file.write(self._line(record))
        self._file.flush()
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_records(path) -> list[dict]:
    """All records of a metrics log. A torn last line (a crash mid-write) is skipped with a warning;
    any other unreadable line is an error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TrainerError(f"{path}: metrics log not found") from None
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("not a record object with an integer 'step'")
        except ValueError as exc:
            if i == last:
                warnings.warn(f"{path}:{i + 1}: skipping an incomplete last line ({exc})")
                continue
            raise TrainerError(f"{path}:{i + 1}: not a metrics record ({exc}); is this a metrics_<job>.jsonl?")
        records.append(rec)
    return records


def _number(value) -> float:
    if isinstance(value, (list, tuple)):  # e.g. one lr per parameter group: plot the first
        value = value[0] if value else None
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def records_to_tensor(records) -> torch.Tensor:
    """float32 ``[len(records), len(COLUMNS)]`` in COLUMNS order, NaN where undefined."""
    rows = []
    for rec in records:
        row = [_number(rec.get(c)) for c in _DIRECT]
        expert = rec.get("expert")
        if expert is not None and expert not in EXPERT_CODES:
            raise ValueError(f"step {rec.get('step')}: unknown expert {expert!r}; known: {sorted(EXPERT_CODES)}")
        codes = [EVENT_CODES[e] for e in _events(rec) if e in EVENT_CODES]
        extra = {"expert_idx": math.nan if expert is None else float(EXPERT_CODES[expert]),
                 "event_code": float(min(codes)) if codes else math.nan}
        by_name = dict(zip(_DIRECT, row))
        by_name.update(extra)
        rows.append([by_name[c] for c in COLUMNS])
    if not rows:
        return torch.empty((0, len(COLUMNS)), dtype=torch.float32)
    return torch.tensor(rows, dtype=torch.float32)


def _cell(column: str, value: float):
    if not math.isfinite(value):
        return None
    if column in _INT_COLUMNS:
        return int(value)
    return float(f"{value:.7g}")  # float32 holds ~7 significant digits; don't print noise


def metrics_payload(records_or_tensor, phases) -> dict:
    """JSON-ready data for the metrics widget.

    ``phases``: the schedule's phases in order (``Phase`` objects or names); their names label the
    phase_idx column. Returns ``{"columns", "rows" (null for NaN), "phases": [{"name", "start_step",
    "alpha"}], "events": [{"step", "event", "detail"}]}``. Phase ``alpha`` is the phase's target alphas
    for a ``Phase``, else the alphas logged at the phase's last step (after any ramp).
    """
    if isinstance(records_or_tensor, torch.Tensor):
        tensor, records = records_or_tensor, None
    else:
        records = list(records_or_tensor)
        tensor = records_to_tensor(records)
    if tensor.dim() != 2 or tensor.shape[1] != len(COLUMNS):
        raise ValueError(f"metrics tensor must be [steps, {len(COLUMNS)}], got {list(tensor.shape)}")
    col = {c: i for i, c in enumerate(COLUMNS)}
    data = tensor.tolist()
    rows = [[_cell(c, v) for c, v in zip(COLUMNS, row)] for row in data]

    phase_list = list(phases or ())
    starts: list[dict] = []
    for i, row in enumerate(data):
        idx = row[col["phase_idx"]]
        if not math.isfinite(idx):
            continue
        idx = int(idx)
        if starts and starts[-1]["_idx"] == idx:
            starts[-1]["_last"] = i
            continue
        starts.append({"_idx": idx, "_first": i, "_last": i})
    out_phases = []
    for s in starts:
        idx = s["_idx"]
        ph = phase_list[idx] if idx < len(phase_list) else None
        name = ph if isinstance(ph, str) else getattr(ph, "name", None) or f"phase {idx}"
        if ph is not None and not isinstance(ph, str):
            alpha = {g: float(a) for g, a in ph.alphas.items()}
        else:
            last = data[s["_last"]]
            alpha = {g: _cell("alpha", last[col[f"{g}_alpha"]]) for g in ("linear", "conv")}
        out_phases.append({"name": name, "phase_idx": idx, "start_step": _cell("step", data[s["_first"]][0]),
                           "alpha": alpha})

    events = []
    if records is not None:
        for rec in records:
            for name in _events(rec):
                events.append({"step": rec.get("step"), "event": name,
                               "detail": strict_json_value(rec.get("event_detail"))})
    else:
        names = {code: name for name, code in EVENT_CODES.items()}
        for row in data:
            code = row[col["event_code"]]
            if math.isfinite(code):
                events.append({"step": _cell("step", row[0]), "event": names.get(int(code), "unknown"),
                               "detail": None})
    return {"columns": list(COLUMNS), "rows": rows, "phases": out_phases, "events": events}

"""Run an alpha schedule over a recorded metrics log: where would each phase start, and why?

Users tune exit thresholds with this without retraining. The scheduler sees exactly what it saw live:
each record's ``loss`` and ``gradient_stability`` at its ``step``; records of skipped (``nan_skip``) steps
are passed over, as the training loop never showed those steps to the scheduler. With the log's own
schedule, the replayed phase starts therefore equal the recorded ones (``matches_recorded`` says so).

Output: JSON-able dicts, one per phase start (the first phase included), then one summary line.
A phase decided at step s (``decided_at_step``) starts at ``start_step`` s + 1, the first forward with its
alpha. Log records carry the phase as it is *after* their step's scheduler update, so in a log the first
record showing a new phase is the deciding step; ``recorded_phase_starts`` lists those.
"""

from __future__ import annotations

from trainer.errors import TrainerError
from trainer.schedule.phases_config import ScheduleConfig
from trainer.schedule.scheduler import AlphaScheduler


def _events(record: dict) -> list:
    ev = record.get("event")
    return [] if ev is None else [ev] if isinstance(ev, str) else list(ev)


def _recorded_starts(records: list[dict]) -> list[dict]:
    starts, last = [], None
    for rec in records:
        name = rec.get("phase")
        if name is not None and name != last:
            starts.append({"phase": name, "first_record_step": rec["step"]})
        last = name if name is not None else last
    return starts


def replay(schedule_config: ScheduleConfig, base_alphas: dict, records: list[dict]) -> list[dict]:
    sched = AlphaScheduler(schedule_config, base_alphas)
    prev_step = None
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, int):
            raise TrainerError(f"metrics record {rec!r:.80} has no integer 'step'")
        if prev_step is not None and step <= prev_step:
            raise TrainerError(f"metrics log is not in step order: step {step} follows step {prev_step}; "
                               "replay one run's log (older runs are rotated to metrics_<job>.<n>.jsonl)")
        prev_step = step
    if not records:
        raise TrainerError("metrics log has no records to replay")

    first = records[0]["step"]
    lines = [{"phase": sched.phase.name, "phase_idx": 0, "start_step": first, "alphas": sched.alphas(),
              "reason": {"rule": "first phase"}}]
    used_losses = stability_samples = skipped = 0
    steps_per_phase = {p.name: 0 for p in schedule_config.phases}
    for rec in records:
        if "nan_skip" in _events(rec):
            skipped += 1
            continue
        loss, stab = rec.get("loss"), rec.get("gradient_stability")
        used_losses += loss is not None
        stability_samples += stab is not None
        steps_per_phase[sched.phase.name] += 1
        if rec.get("val_loss") is not None:  # the loop observes validation before the step's update
            sched.observe_validation(rec["step"], rec["val_loss"])
        tr = sched.update(rec["step"], loss, stab)
        if tr is not None:
            lines.append({
                "phase": tr["to_phase"],
                "phase_idx": tr["to_phase_idx"],
                "start_step": tr["step"] + 1,  # the new alpha applies from the next step's forward
                "decided_at_step": tr["step"],
                "alphas": tr["to_alphas"],
                "reason": {k: tr[k] for k in ("slope", "r2", "cv", "stability", "steps_in_phase", "loss_samples",
                                               "thresholds")},
            })

    warnings = []
    needs_stability = [p.name for p in schedule_config.phases[:-1] if p.exit.min_gradient_stability > 0]
    if stability_samples == 0 and needs_stability:
        warnings.append(f"the log has no gradient_stability values, so phases {needs_stability} can never end "
                        "(their min_gradient_stability > 0); set it to 0 to replay on the loss alone")
    recorded = _recorded_starts(records)
    replayed = [{"phase": ln["phase"], "first_record_step": ln.get("decided_at_step", ln["start_step"])}
                for ln in lines]
    verdict = sched.explain()
    summary = {
        "summary": True,
        "records": len(records),
        "first_step": first,
        "last_step": records[-1]["step"],
        "skipped_nan_steps": skipped,
        "losses_used": used_losses,
        "stability_samples": stability_samples,
        "transitions": len(lines) - 1,
        "final_phase": sched.phase.name,
        "steps_per_phase": steps_per_phase,
        "waiting_on": None if verdict["final"] else {
            name: {"value": c["value"], "op": c["op"], "threshold": c["threshold"]}
            for name, c in verdict["criteria"].items() if not c["ok"]},
        "recorded_phase_starts": recorded,
        "matches_recorded": (replayed == recorded) if recorded else None,
        "warnings": warnings,
    }
    return lines + [summary]

"""The alpha phase state machine: which phase is active, when it ends, and the alpha each group gets.

Per optimizer step the loop calls ``update(step, loss, gradient_stability)`` after the optimizer step and
then applies ``alphas()`` to the LoRA modules for the next forward.

Statistics belong to the phase: at a transition the loss window, the CV window and the stability EMA are
cleared, because a new alpha changes the loss level and an old window would mix two regimes.

A phase (other than the last, which never exits) ends at the first update where ALL of these hold:

- ``steps_in_phase >= min_steps``
- at least ``min_losses`` (100) losses in the phase's window (None/NaN losses count as steps, not losses)
- plateau:     ``slope >= -loss_improvement_rate_below``     (slope = OLS slope of loss vs. optimizer step over
               the last ``window`` losses, so the unit is *loss per optimizer step*: 0.001 means the loss
               still falls by 0.1 every 100 steps)
- not rising:  ``slope <= 0.05 * loss_improvement_rate_below``
- stable:      ``EMA_50(gradient sign agreement) >= min_gradient_stability``. With no stability sample at all
               in the phase this criterion fails unless ``min_gradient_stability <= 0`` (set it to 0 to ignore
               stability): "no evidence" must not count as "stable", and a stuck 0.0 must not hide as data.
- quiet:       ``CV < max_loss_cv`` (std/|mean| over the last 50 losses; undefined CV fails)
- trend fit:   ``R² >= min_loss_r2`` only when ``r2_gate`` is true. Off by default: on a plateau the loss has
               no trend, so the R² of a line through it is low by nature; gating on it would block exactly the
               case a phase is meant to end on. R² is always computed and logged.

A phase whose ``exit.source`` is "validation" ignores the training-loss rules above and ends instead at the
first update where ALL of these hold:

- ``steps_in_phase >= min_steps``
- at least ``val_window`` validation losses observed in this phase (``observe_validation``)
- val plateau: ``val_rate >= -val_rate_below``, where val_rate is the OLS slope of val_loss against step over
               the last ``val_window`` evaluations, times 1000, divided by their mean: the relative change per
               1000 steps. While the validation loss still falls faster than that, the phase continues. A
               rising validation loss also ends the phase: this alpha has nothing left to give, and whether
               to stop altogether is the stop advisor's question (trainer.schedule.stop_advice).

The validation window is the phase's, like the training statistics: cleared at a transition.

At most one transition happens per update. After a transition the scheduled alphas change according to the
config's ``transition_kind``: "ramp" moves them linearly from the values in force to the new phase's over
``ramp_steps`` optimizer steps; "jump" and "preserve" switch at once ("preserve" additionally needs the loop
to rescale the LoRA weights and optimizer moments: trainer.schedule.transitions.preserve_output).
"""

from __future__ import annotations

import math

from trainer.errors import CheckpointError
from trainer.schedule.phases_config import GROUPS, Phase, ScheduleConfig
from trainer.schedule.stats import EMA, RollingCV, WindowedRegression

STATE_VERSION = 1
RISE_TOLERANCE = 0.05  # "not rising" allows a slope up to this fraction of loss_improvement_rate_below


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _phase_signature(phases) -> list:
    return [[p["name"], {g: float(a) for g, a in sorted(p["alphas"].items())}] for p in phases]


class AlphaScheduler:
    def __init__(self, config: ScheduleConfig, base_alphas: dict[str, float]):
        if not config.phases:
            raise ValueError("an alpha schedule needs at least one phase")
        for p in config.phases:
            bad = [g for g in p.alphas if g not in GROUPS]
            if bad or not p.alphas:
                raise ValueError(f"phase {p.name!r}: alphas must name groups among {GROUPS}, got {p.alphas!r}")
        if not 1 <= config.min_losses <= config.window:
            raise ValueError(f"min_losses ({config.min_losses}) must be between 1 and window ({config.window})")
        missing = [g for g in GROUPS if g not in base_alphas and not all(g in p.alphas for p in config.phases)]
        if missing:
            raise ValueError(f"base_alphas lacks {missing}: the fixed alpha of groups some phase does not drive")
        self.config = config
        self.base_alphas = {g: float(a) for g, a in base_alphas.items() if g in GROUPS}
        self._phase_idx = 0
        self._steps_in_phase = 0
        self._last_step: int | None = None
        self._history: list[dict] = []
        self._ramp_from: dict | None = None
        self._last_stability: float | None = None
        self._new_stats()

    def _new_stats(self) -> None:
        self._loss_reg = WindowedRegression(self.config.window)
        self._loss_cv = RollingCV(self.config.cv_window)
        self._stability = EMA(self.config.stability_span)
        k = max(2, int(self.phase.exit.val_window))
        self._val_reg = WindowedRegression(window=k, min_samples=k)

    # -- read-only views ---------------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.config.phases[self._phase_idx]

    @property
    def phase_idx(self) -> int:
        return self._phase_idx

    @property
    def steps_in_phase(self) -> int:
        return self._steps_in_phase

    @property
    def is_final_phase(self) -> bool:
        return self._phase_idx == len(self.config.phases) - 1

    @property
    def history(self) -> list[dict]:
        return [dict(h) for h in self._history]

    def _target_alphas(self, idx: int) -> dict[str, float]:
        out = dict(self.base_alphas)
        out.update({g: float(a) for g, a in self.config.phases[idx].alphas.items()})
        return out

    def alphas(self) -> dict[str, float]:
        """Alpha of every group for the next forward pass, ramp included."""
        return self._alphas_at(self._steps_in_phase + 1)  # the next forward is this phase's step k

    def _alphas_at(self, k: int) -> dict[str, float]:
        """Alphas of the k-th step (1-based) of the current phase."""
        target = self._target_alphas(self._phase_idx)
        ramp = self.config.ramp_steps
        if self._ramp_from is None or ramp <= 0 or self.config.transition_kind != "ramp":
            return target
        if k >= ramp:
            return target
        f = k / ramp
        return {g: self._ramp_from.get(g, a) + (a - self._ramp_from.get(g, a)) * f for g, a in target.items()}

    def snapshot(self) -> dict:
        return {
            "loss_slope": self._loss_reg.slope,
            "loss_r2": self._loss_reg.r2,
            "loss_cv": self._loss_cv.value,
            "loss_samples": self._loss_reg.n,
            "gradient_stability_avg": self._stability.value,
        }

    def validation_snapshot(self) -> dict:
        """The current phase's validation-loss trend: relative change per 1000 steps, and how many values."""
        return {"val_rate": self._val_rate(), "val_samples": self._val_reg.n}

    def _val_rate(self) -> float | None:
        slope, mean = self._val_reg.slope, self._val_reg.mean_y
        if slope is None or mean is None or not mean > 0:
            return None
        return slope * 1000.0 / mean

    def observe_validation(self, step: int, val_loss) -> None:
        """Record a validation loss measured after optimizer step ``step`` (call before that step's update)."""
        val_loss = _finite_or_none(val_loss)
        if val_loss is not None:
            self._val_reg.add(int(step), val_loss)

    def _validation_criteria(self, crit) -> dict:
        ex = self.phase.exit
        rate = self._val_rate()
        return {
            "min_steps": crit(self._steps_in_phase >= self.phase.min_steps, self._steps_in_phase, ">=",
                              self.phase.min_steps),
            "min_val_losses": crit(self._val_reg.n >= ex.val_window, self._val_reg.n, ">=", ex.val_window),
            "val_plateau": crit(rate is not None and rate >= -ex.val_rate_below, rate, ">=", -ex.val_rate_below),
        }

    def explain(self) -> dict:
        """Each exit criterion of the current phase with its value, threshold and whether it holds now."""
        ex = self.phase.exit
        slope = self._loss_reg.slope
        r2 = self._loss_reg.r2
        cv = self._loss_cv.value
        stab = self._stability.value
        rise_limit = RISE_TOLERANCE * ex.loss_improvement_rate_below

        def crit(ok, value, op, threshold, **extra):
            return {"ok": bool(ok), "value": value, "op": op, "threshold": threshold, **extra}

        stab_ok = stab >= ex.min_gradient_stability if stab is not None else ex.min_gradient_stability <= 0
        r2_ok = (r2 is not None and r2 >= ex.min_loss_r2) if ex.r2_gate else True
        criteria = self._validation_criteria(crit) if ex.source == "validation" else {
            "min_steps": crit(self._steps_in_phase >= self.phase.min_steps, self._steps_in_phase, ">=",
                              self.phase.min_steps),
            "min_losses": crit(self._loss_reg.n >= self.config.min_losses, self._loss_reg.n, ">=",
                               self.config.min_losses),
            "plateau": crit(slope is not None and slope >= -ex.loss_improvement_rate_below, slope, ">=",
                            -ex.loss_improvement_rate_below),
            "not_rising": crit(slope is not None and slope <= rise_limit, slope, "<=", rise_limit),
            "gradient_stability": crit(stab_ok, stab, ">=", ex.min_gradient_stability),
            "loss_cv": crit(cv is not None and cv < ex.max_loss_cv, cv, "<", ex.max_loss_cv),
            "loss_r2": crit(r2_ok, r2, ">=", ex.min_loss_r2, gated=bool(ex.r2_gate)),
        }
        final = self.is_final_phase
        return {
            "phase": self.phase.name,
            "phase_idx": self._phase_idx,
            "steps_in_phase": self._steps_in_phase,
            "final": final,
            "source": ex.source,
            "ready": (not final) and all(c["ok"] for c in criteria.values()),
            "criteria": criteria,
        }

    # -- the step ----------------------------------------------------------------------------------------
    def update(self, step: int, loss, gradient_stability=None) -> dict | None:
        """Record one optimizer step. Returns the transition record if the phase changed at this step."""
        self._last_step = int(step)
        self._steps_in_phase += 1
        loss = _finite_or_none(loss)
        if loss is not None:
            self._loss_reg.add(step, loss)
            self._loss_cv.add(loss)
        stab = _finite_or_none(gradient_stability)
        if stab is not None:
            self._stability.add(stab)
            self._last_stability = stab
        if self.is_final_phase or self._steps_in_phase < self.phase.min_steps:
            return None  # cheap early exit; explain() gives the same verdict
        if self.phase.exit.source == "validation":
            if self._val_reg.n < self.phase.exit.val_window:
                return None
        elif self._loss_reg.n < self.config.min_losses:
            return None
        verdict = self.explain()
        if not verdict["ready"]:
            return None
        return self._transition(int(step), verdict)

    def _transition(self, step: int, verdict: dict) -> dict:
        snap = self.snapshot()
        from_alphas = self._alphas_at(self._steps_in_phase)  # what this step's forward ran with, mid-ramp too
        record = {
            "step": step,
            "from_phase": self.phase.name,
            "to_phase": self.config.phases[self._phase_idx + 1].name,
            "from_phase_idx": self._phase_idx,
            "to_phase_idx": self._phase_idx + 1,
            "from_alphas": from_alphas,
            "to_alphas": self._target_alphas(self._phase_idx + 1),
            "steps_in_phase": self._steps_in_phase,
            "slope": snap["loss_slope"],
            "r2": snap["loss_r2"],
            "cv": snap["loss_cv"],
            "stability": snap["gradient_stability_avg"],
            "loss_samples": snap["loss_samples"],
            "thresholds": {name: c["threshold"] for name, c in verdict["criteria"].items()},
            "source": verdict["source"],
        }
        if verdict["source"] == "validation":
            record.update(self.validation_snapshot())
        self._history.append(record)
        self._phase_idx += 1
        self._steps_in_phase = 0
        self._ramp_from = from_alphas
        self._last_stability = None
        self._new_stats()
        return dict(record)

    # -- persistence -------------------------------------------------------------------------------------
    def _phase_list(self) -> list[dict]:
        return [{"name": p.name, "alphas": {g: float(a) for g, a in p.alphas.items()}} for p in self.config.phases]

    def state_dict(self) -> dict:
        """The whole state, JSON-serialisable (strict JSON: no NaN), bit-exact on reload."""
        return {
            "version": STATE_VERSION,
            "phases": self._phase_list(),
            "phase_idx": self._phase_idx,
            "steps_in_phase": self._steps_in_phase,
            "last_step": self._last_step,
            "history": self.history,
            "ramp_from": self._ramp_from,
            "last_stability": self._last_stability,
            "loss_regression": self._loss_reg.state_dict(),
            "loss_cv": self._loss_cv.state_dict(),
            "stability_ema": self._stability.state_dict(),
            "val_regression": self._val_reg.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore a saved state. The phase list (names, alphas, order) must equal this config's.

        Thresholds, min_steps and ramp_steps may differ: tuning them on resume is legitimate.
        """
        if sd.get("version") != STATE_VERSION:
            raise CheckpointError(f"alpha scheduler state has version {sd.get('version')!r}, this trainer reads "
                                  f"version {STATE_VERSION}: start a fresh run")
        saved, ours = _phase_signature(sd["phases"]), _phase_signature(self._phase_list())
        if saved != ours:
            def fmt(sig):
                return " -> ".join(f"{n}({', '.join(f'{g}={a:g}' for g, a in al.items())})" for n, al in sig)
            raise CheckpointError(
                "the checkpoint's alpha schedule phases differ from the job's: checkpoint has "
                f"{fmt(saved)}, job has {fmt(ours)}. Resume with the same phases (names, alphas, order), "
                "or start a fresh run.")
        self._phase_idx = int(sd["phase_idx"])
        self._steps_in_phase = int(sd["steps_in_phase"])
        self._last_step = None if sd["last_step"] is None else int(sd["last_step"])
        self._history = [dict(h) for h in sd["history"]]
        self._ramp_from = None if sd["ramp_from"] is None else {g: float(a) for g, a in sd["ramp_from"].items()}
        self._last_stability = sd["last_stability"]
        self._new_stats()
        self._loss_reg.load_state_dict(sd["loss_regression"])
        self._loss_cv.load_state_dict(sd["loss_cv"])
        self._stability.load_state_dict(sd["stability_ema"])
        if sd.get("val_regression") is not None:  # absent in states written before validation existed
            self._val_reg.load_state_dict(sd["val_regression"])


def format_transition(record: dict) -> str:
    """One human line for a transition record, with the numbers that triggered it."""

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    changed = ", ".join(f"{g} {record['from_alphas'][g]:g} -> {a:g}" for g, a in record["to_alphas"].items()
                        if record["from_alphas"].get(g) != a) or "alphas unchanged"
    th = record.get("thresholds", {})
    if record.get("source") == "validation":
        return (f"step {record['step']}: phase {record['from_phase']} -> {record['to_phase']} ({changed}) after "
                f"{record['steps_in_phase']} steps; validation loss change {num(record.get('val_rate'), '+.3g')} "
                f"of its mean per 1000 steps over the last {record.get('val_samples')} evaluations "
                f"(plateau >= {num(th.get('val_plateau'), '.3g')})")
    return (f"step {record['step']}: phase {record['from_phase']} -> {record['to_phase']} ({changed}) after "
            f"{record['steps_in_phase']} steps; loss slope {num(record['slope'], '.3g')}/step "
            f"(plateau >= {num(th.get('plateau'), '.3g')}, rising <= {num(th.get('not_rising'), '.3g')}), "
            f"R2 {num(record['r2'], '.3f')}, CV {num(record['cv'], '.3f')} (< {num(th.get('loss_cv'), 'g')}), "
            f"gradient stability {num(record['stability'], '.3f')} (>= {num(th.get('gradient_stability'), 'g')})")

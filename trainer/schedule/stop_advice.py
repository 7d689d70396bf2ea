"""When to stop: best-so-far tracking and patience on the validation loss.

Each validation loss is compared with the best so far. A value counts as a new best only when it improves on
the best by more than ``min_delta`` *relative* to it (val < best * (1 - min_delta)), so that noise at the
floor does not keep resetting the count. Once ``patience`` evaluations in a row have brought no new best, the
advisor says "suggest stop" once, with the best step and value, and whether the loss is on a plateau or
rising. "rising" means a significant upward trend: the OLS slope over the last max(3, patience) values is
positive with a t statistic above 2 (a noisy floor is a plateau). A later new best re-arms it.

Patience is only counted while the advisor is *armed*: the training loop arms it in the schedule's final
phase (or from the start without a schedule). Earlier phases are meant to end on a plateau and hand over to a
higher alpha, so a plateau there is no reason to stop; the best value is still tracked throughout, so the best
weights of the whole run are known.
"""

from __future__ import annotations

import math

from trainer.schedule.stats import WindowedRegression

STATE_VERSION = 1
RISE_T = 2.0  # t statistic of the slope above which the loss counts as rising rather than on a plateau


class StopAdvisor:
    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not 0.0 <= min_delta < 1.0:
            raise ValueError(f"min_delta is relative and must be in [0, 1), got {min_delta}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best_step: int | None = None
        self.best_val_loss: float | None = None
        self.since_best = 0  # armed evaluations since the best (or since arming)
        self.fired = False
        self.advice: dict | None = None  # the last suggest_stop detail
        self._recent = WindowedRegression(window=max(3, self.patience), min_samples=3)

    def observe(self, step: int, val_loss, armed: bool = True) -> tuple[bool, dict | None]:
        """Record one validation loss. Returns (is_new_best, suggest_stop detail or None)."""
        if val_loss is None or not math.isfinite(val_loss):
            return False, None
        val_loss = float(val_loss)
        self._recent.add(int(step), val_loss)
        if self.best_val_loss is None or val_loss < self.best_val_loss * (1.0 - self.min_delta):
            self.best_step, self.best_val_loss = int(step), val_loss
            self.since_best = 0
            self.fired = False
            return True, None
        if not armed:
            return False, None
        self.since_best += 1
        if self.fired or self.since_best < self.patience:
            return False, None
        self.fired = True
        self.advice = {
            "step": int(step),
            "best_step": self.best_step,
            "best_val_loss": self.best_val_loss,
            "val_loss": val_loss,
            "evaluations_without_improvement": self.since_best,
            "trend": "rising" if self._rising() else "plateau",
        }
        return False, dict(self.advice)

    def _rising(self) -> bool:
        slope, r2, n = self._recent.slope, self._recent.r2, self._recent.n
        if slope is None or r2 is None or not slope > 0 or n < 3:
            return False
        if r2 >= 1.0:
            return True
        return math.sqrt(r2 * (n - 2) / (1.0 - r2)) > RISE_T

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "patience": self.patience, "min_delta": self.min_delta,
                "best_step": self.best_step, "best_val_loss": self.best_val_loss, "since_best": self.since_best,
                "fired": self.fired, "advice": self.advice, "recent": self._recent.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore; patience and min_delta stay as configured now (retuning them on resume is legitimate)."""
        self.best_step = sd["best_step"]
        self.best_val_loss = None if sd["best_val_loss"] is None else float(sd["best_val_loss"])
        self.since_best = int(sd["since_best"])
        self.fired = bool(sd["fired"])
        self.advice = sd["advice"]
        self._recent.load_state_dict(sd["recent"])


def format_advice(detail: dict) -> str:
    return (f"suggest stop at step {detail['step']}: validation loss {detail['trend']} for "
            f"{detail['evaluations_without_improvement']} evaluations; best step {detail['best_step']} "
            f"(val_loss {detail['best_val_loss']:.5g})")

"""The alpha-schedule configuration objects (parsed from the job file by trainer.job)."""

from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("linear", "conv")


@dataclass(frozen=True)
class ExitCriteria:
    # Units: loss per optimizer step (the OLS slope of loss against step over the phase's window).
    loss_improvement_rate_below: float = 0.001
    min_gradient_stability: float = 0.55
    min_loss_r2: float = 0.1
    max_loss_cv: float = 0.5
    r2_gate: bool = False


@dataclass(frozen=True)
class Phase:
    name: str
    # alpha per scheduled group: {"conv": 8.0}, {"linear": 16.0} or both. Groups absent here keep their fixed alpha.
    alphas: dict
    min_steps: int = 500
    exit: ExitCriteria = field(default_factory=ExitCriteria)


@dataclass(frozen=True)
class ScheduleConfig:
    phases: tuple  # tuple[Phase, ...], in order; the last never exits
    ramp_steps: int = 0
    window: int = 200
    cv_window: int = 50
    stability_span: int = 50
    min_losses: int = 100

    @property
    def groups(self) -> tuple:
        return tuple(g for g in GROUPS if any(g in p.alphas for p in self.phases))

"""The alpha-schedule configuration objects (parsed from the job file by trainer.job)."""

from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("linear", "conv")
SOURCES = ("train", "validation")
TRANSITIONS = ("jump", "ramp", "preserve")


@dataclass(frozen=True)
class ExitCriteria:
    # Units: loss per optimizer step (the OLS slope of loss against step over the phase's window).
    loss_improvement_rate_below: float = 0.001
    min_gradient_stability: float = 0.55
    min_loss_r2: float = 0.1
    max_loss_cv: float = 0.5
    r2_gate: bool = False
    # What decides the phase's end. "train": the rules above on the training loss. "validation": a plateau of
    # the fixed-noise validation loss over the last ``val_window`` evaluations (the train-loss rules are then
    # not consulted). ``val_rate_below`` is relative: the fitted change of val_loss per 1000 optimizer steps
    # divided by its mean over the window; the phase may end once that is >= -val_rate_below (no longer
    # falling faster than that fraction per 1000 steps).
    source: str = "train"
    val_window: int = 5
    val_rate_below: float = 0.05


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
    # How alphas change at a transition: "jump" (at once), "ramp" (linearly over ramp_steps) or "preserve"
    # (at once, with each LoRA up-projection and its optimizer moments rescaled so that the model's output is
    # unchanged; see trainer.schedule.transitions). None: "ramp" when ramp_steps > 0, else "jump".
    transition: str | None = None

    @property
    def transition_kind(self) -> str:
        if self.transition is not None:
            return self.transition
        return "ramp" if self.ramp_steps > 0 else "jump"

    @property
    def uses_validation(self) -> bool:
        return any(p.exit.source == "validation" for p in self.phases[:-1])

    @property
    def groups(self) -> tuple:
        return tuple(g for g in GROUPS if any(g in p.alphas for p in self.phases))

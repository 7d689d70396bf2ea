"""The seed's shipped alpha schedules: thresholds per use case and the 3-phase foundation/balance/emphasis form.

Threshold units are those of ExitCriteria: ``loss_improvement_rate_below`` in loss per optimizer step.
"""

from __future__ import annotations

from trainer.errors import JobError
from trainer.schedule.phases_config import GROUPS, ExitCriteria, Phase

# (loss_improvement_rate_below, min_gradient_stability, min_loss_r2), as the seed shipped them.
PRESETS = {
    "video": ExitCriteria(0.005, 0.50, 0.01),
    "image": ExitCriteria(0.001, 0.55, 0.1),
}

PHASE_NAMES = ("foundation", "balance", "emphasis")


def preset_phases(name: str, group: str = "conv", alphas=(8, 14, 20), min_steps=(2000, 3000, 2000)) -> tuple:
    """foundation -> balance -> emphasis with the preset's exit criteria on every phase.

    ``group`` is the module group the schedule drives: "conv" (the seed's UNet schedule), "linear"
    (transformers such as Wan, which have no conv layers in their blocks) or "both".
    """
    if name not in PRESETS:
        raise JobError("alpha_schedule.preset", f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if group not in (*GROUPS, "both"):
        raise JobError("alpha_schedule.group", f"unknown group {group!r}; choose one of {[*GROUPS, 'both']}")
    alphas, min_steps = tuple(alphas), tuple(min_steps)
    for field, values in (("alphas", alphas), ("min_steps", min_steps)):
        if len(values) != len(PHASE_NAMES):
            raise JobError(f"alpha_schedule.{field}",
                           f"needs {len(PHASE_NAMES)} values (for {', '.join(PHASE_NAMES)}), got {list(values)}")
    if any(not a > 0 for a in alphas):
        raise JobError("alpha_schedule.alphas", f"alphas must be > 0, got {list(alphas)}")
    if any(int(m) != m or m < 0 for m in min_steps):
        raise JobError("alpha_schedule.min_steps", f"min_steps must be whole numbers >= 0, got {list(min_steps)}")
    groups = GROUPS if group == "both" else (group,)
    criteria = PRESETS[name]
    return tuple(Phase(name=n, alphas={g: float(a) for g in groups}, min_steps=int(m), exit=criteria)
                 for n, a, m in zip(PHASE_NAMES, alphas, min_steps))

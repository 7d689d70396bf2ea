"""Alpha schedules: one Alpha Phase node per phase, chained left to right, or the seed's preset in one node."""

from __future__ import annotations

from comfy_api.latest import io

from trainer.comfy_bridge import GROUP_CHOICES, alpha_phase, exit_criteria, preset_schedule
from trainer.schedule.phases_config import ExitCriteria
from trainer.schedule.presets import PRESETS

from .common import CATEGORY, PREFIX, PTSchedule

_GROUP_TIP = ("Which LoRA modules the schedule moves: auto = conv when the model has conv layers in the LoRA and "
              "conv rank > 0 (SD 1.5), else linear (Wan); both = every module")


def _schedule_wide_inputs() -> list:
    return [
        io.Int.Input("ramp_steps", default=0, min=0, max=100000, optional=True,
                     tooltip="Steps over which alpha moves to a new phase's value (0: at once). Applies to every "
                             "transition; the node that feeds the Train node sets it."),
        io.Int.Input("window", default=200, min=20, max=100000, optional=True,
                     tooltip="Steps of loss history the exit statistics use (slope, R²)"),
    ]


class AlphaPhase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = ExitCriteria()
        return io.Schema(
            node_id=f"{PREFIX}AlphaPhase",
            display_name="Alpha Phase",
            category=CATEGORY,
            description="One phase of an alpha schedule. Chain phases through 'previous' (left to right = in "
                        "order). A phase ends after min_steps once the loss has plateaued (slope below the rate) "
                        "and the gradients agree (stability); the last phase runs to the end.",
            inputs=[
                PTSchedule.Input("previous", optional=True, tooltip="The phases before this one"),
                io.String.Input("name", default="foundation"),
                io.Float.Input("alpha", default=8.0, min=0.01, max=4096.0, step=0.5),
                io.Combo.Input("group", options=list(GROUP_CHOICES), default="auto", tooltip=_GROUP_TIP),
                io.Int.Input("min_steps", default=500, min=0, max=10_000_000),
                io.Float.Input("loss_improvement_rate_below", default=d.loss_improvement_rate_below, min=0.0,
                               max=10.0, step=0.0001,
                               tooltip="Plateau: the loss falls by less than this per step (OLS slope)"),
                io.Float.Input("min_gradient_stability", default=d.min_gradient_stability, min=0.0, max=1.0,
                               step=0.01, tooltip="Share of gradient signs that agree step to step"),
                io.Float.Input("min_loss_r2", default=d.min_loss_r2, min=0.0, max=1.0, step=0.01,
                               tooltip="R² of the loss trend (with r2_gate: required before a transition)"),
                io.Float.Input("max_loss_cv", default=d.max_loss_cv, min=0.0001, max=100.0, step=0.01,
                               tooltip="Loss coefficient of variation above which the phase is too noisy to end"),
                io.Boolean.Input("r2_gate", default=d.r2_gate),
                *_schedule_wide_inputs(),
            ],
            outputs=[PTSchedule.Output(display_name="schedule")],
        )

    @classmethod
    def execute(cls, name: str, alpha: float, group: str, min_steps: int, loss_improvement_rate_below: float,
                min_gradient_stability: float, min_loss_r2: float, max_loss_cv: float, r2_gate: bool,
                previous=None, ramp_steps: int = 0, window: int = 200) -> io.NodeOutput:
        exit_ = exit_criteria(loss_improvement_rate_below=loss_improvement_rate_below,
                              min_gradient_stability=min_gradient_stability, min_loss_r2=min_loss_r2,
                              max_loss_cv=max_loss_cv, r2_gate=r2_gate)
        return io.NodeOutput(alpha_phase(previous, name=name, alpha=alpha, group=group, min_steps=min_steps,
                                         exit=exit_, ramp_steps=ramp_steps, window=window))


class AlphaSchedulePreset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}AlphaSchedulePreset",
            display_name="Alpha Schedule Preset",
            category=CATEGORY,
            description="The seed's schedule: foundation -> balance -> emphasis, with the video or image exit "
                        "thresholds.",
            inputs=[
                io.Combo.Input("preset", options=sorted(PRESETS), default="image"),
                io.Combo.Input("group", options=list(GROUP_CHOICES), default="auto", tooltip=_GROUP_TIP),
                io.Float.Input("foundation_alpha", default=8.0, min=0.01, max=4096.0, step=0.5),
                io.Int.Input("foundation_min_steps", default=2000, min=0, max=10_000_000),
                io.Float.Input("balance_alpha", default=14.0, min=0.01, max=4096.0, step=0.5),
                io.Int.Input("balance_min_steps", default=3000, min=0, max=10_000_000),
                io.Float.Input("emphasis_alpha", default=20.0, min=0.01, max=4096.0, step=0.5),
                io.Int.Input("emphasis_min_steps", default=2000, min=0, max=10_000_000),
                *_schedule_wide_inputs(),
            ],
            outputs=[PTSchedule.Output(display_name="schedule")],
        )

    @classmethod
    def execute(cls, preset: str, group: str, foundation_alpha: float, foundation_min_steps: int,
                balance_alpha: float, balance_min_steps: int, emphasis_alpha: float, emphasis_min_steps: int,
                ramp_steps: int = 0, window: int = 200) -> io.NodeOutput:
        return io.NodeOutput(preset_schedule(
            preset, group=group, alphas=(foundation_alpha, balance_alpha, emphasis_alpha),
            min_steps=(foundation_min_steps, balance_min_steps, emphasis_min_steps), ramp_steps=ramp_steps,
            window=window))

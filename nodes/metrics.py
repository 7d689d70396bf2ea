"""Plot Metrics: a run's metrics as an IMAGE (the widget's chart, rendered server-side) to save or share."""

from __future__ import annotations

import numpy as np
from comfy_api.latest import io

from trainer.comfy_bridge import own_details, payload_from_metrics, png_to_image, render_phases
from trainer.plot import render_png

from .common import CATEGORY, PREFIX, PTMetrics
from .train import UI_KEY


class PlotMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"{PREFIX}PlotMetrics",
            display_name="Plot Metrics",
            category=CATEGORY,
            description="Loss (raw and smoothed), alpha, phase bands and transitions, the validation loss and "
                        "the stop advice, and the exit statistics, as an image (connect Save Image to keep it).",
            inputs=[
                PTMetrics.Input("metrics"),
                io.String.Input("title", default="", optional=True, tooltip="Empty: the job name"),
                io.Int.Input("width", default=1000, min=200, max=4096, step=10, optional=True),
                io.Int.Input("height", default=600, min=150, max=4096, step=10, optional=True),
            ],
            outputs=[io.Image.Output(display_name="image")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, metrics, title: str = "", width: int = 1000, height: int = 600) -> io.NodeOutput:
        payload = payload_from_metrics(metrics)
        data = metrics["tensor"].detach().cpu().numpy().astype(np.float64)
        # The run's events with their details give the stop advice's best step; without them (an older
        # PT_METRICS) render_png finds it from the val_loss column.
        events = own_details(metrics["events"]) if metrics.get("events") is not None else None
        png = render_png(data, render_phases(payload["phases"]), title or metrics.get("job") or "", width=width,
                         height=height, events=events)
        return io.NodeOutput(png_to_image(png), ui={UI_KEY: [payload]})

"""What every Phase Trainer node shares: the custom socket types, the category, logging."""

from __future__ import annotations

import logging

from comfy_api.latest import io

CATEGORY = "Phase Trainer"
PREFIX = "PhaseTrainer"

# The pack's own socket types. LORA_MODEL and LOSS_MAP are ComfyUI's native ones (its stock training nodes').
PTModel = io.Custom("PT_MODEL")
PTDataset = io.Custom("PT_DATASET")
PTNetwork = io.Custom("PT_NETWORK")
PTSchedule = io.Custom("PT_SCHEDULE")
PTMetrics = io.Custom("PT_METRICS")
LoraModel = io.Custom("LORA_MODEL")
LossMap = io.Custom("LOSS_MAP")

log = logging.getLogger("phase_trainer")


def log_line(message: str) -> None:
    log.info("[Phase Trainer] %s", message)

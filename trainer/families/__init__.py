"""Model families by name. Classes are imported on first use so that naming a family costs no diffusers import."""

from __future__ import annotations

import importlib

from ..errors import JobError
from .base import ModelFamily

# name -> "module:Class", relative to this package.
FAMILIES: dict[str, str] = {
    "sd15": "sd15:SD15",
    "wan21": "wan21:Wan21",
    "wan21_i2v": "wan21_i2v:Wan21I2V",
    "wan22_5b": "wan22_5b:Wan22TI2V",
    "wan22_14b": "wan22_14b:Wan22A14B",
    "wan22_14b_i2v": "wan22_14b:Wan22A14BI2V",
    "sdxl": "sdxl:SDXL",
    "flux": "flux:Flux",
}


def get_family(name: str) -> type[ModelFamily]:
    """The family class registered as `name`; a JobError on `model.family` for anything else."""
    target = FAMILIES.get(name) if isinstance(name, str) else None
    if target is None:
        raise JobError("model.family", f"unknown family {name!r}; use one of {', '.join(sorted(FAMILIES))}")
    module_name, class_name = target.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)

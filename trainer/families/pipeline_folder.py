"""Reading a diffusers pipeline's configs (local folder or hub id) before loading any weights.

Families check these configs first so that a wrong folder fails in a second with a message naming the folder and
what is missing, instead of deep inside from_pretrained after minutes of loading.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import ModelError

# Pipeline class -> the family that trains it, to point users at the right one.
FAMILY_OF_PIPELINE = {
    "StableDiffusionPipeline": "sd15",
    "WanPipeline": "wan21",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    return not Path(path).exists() and bool(_HUB_ID.match(path))


def check_location(path: str) -> None:
    """A local path must be an existing folder; anything else must look like a hub id ("org/name")."""
    local = Path(path).expanduser()
    if local.is_file():
        raise ModelError(
            f"{path}: is a file; give the diffusers pipeline folder (the one holding model_index.json)"
        )
    if local.is_dir() or is_hub_id(path):
        return
    raise ModelError(f"{path}: no such folder (and not a hub id of the form 'org/name')")


def read_model_index(path: str) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    check_location(path)
    hub = is_hub_id(path)
    try:
        return dict(DiffusionPipeline.load_config(path if hub else str(Path(path).expanduser())))
    except Exception as e:  # diffusers raises EnvironmentError / OSError / ValueError variants
        if hub:
            raise ModelError(
                f"{path}: not a local folder, and model_index.json could not be fetched from the Hugging Face hub "
                f"({_first_line(e)}); check the id and the network, or give a local diffusers folder"
            ) from e
        raise ModelError(
            f"{path}: cannot read model_index.json ({_first_line(e)}); give a diffusers pipeline folder"
        ) from e


def read_component_config(path: str, subfolder: str, config_cls) -> dict[str, Any]:
    """The config of one component, read with its class's `load_config` (diffusers) or config class (transformers)."""
    location = path if is_hub_id(path) else str(Path(path).expanduser())
    try:
        if hasattr(config_cls, "load_config"):
            return dict(config_cls.load_config(location, subfolder=subfolder))
        return config_cls.from_pretrained(location, subfolder=subfolder).to_dict()
    except Exception as e:
        raise ModelError(f"{path}: cannot read the {subfolder}/ config ({_first_line(e)})") from e


def require_components(path: str, index: dict[str, Any], names: list[str], pipeline: str) -> None:
    """Every component the family loads must be listed in model_index.json (null entries count as missing)."""
    missing = [n for n in names if not (isinstance(index.get(n), (list, tuple)) and index[n][0] and index[n][1])]
    if missing:
        raise ModelError(
            f"{path}: model_index.json lists no {', '.join(missing)}; a {pipeline} folder needs {', '.join(names)}"
        )


def require_pipeline(path: str, index: dict[str, Any], expected: str, family: str) -> None:
    found = index.get("_class_name")
    if found == expected:
        return
    hint = ""
    other = FAMILY_OF_PIPELINE.get(found)
    if other and other != family:
        hint = f" (that is model.family '{other}')"
    raise ModelError(
        f"{path}: model_index.json says _class_name {found!r}{hint}; the {family} family needs a {expected} folder"
    )


def denoiser_device(module) -> "torch.device":
    """The device a (possibly wrapped, e.g. DistributedDataParallel) model's weights are on."""
    return next(module.parameters()).device


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

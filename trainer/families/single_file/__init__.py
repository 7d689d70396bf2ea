"""Training on the single files ComfyUI users already have (models/diffusion_models, models/checkpoints,
models/vae), with no download and no network.

Every loader follows the same three steps:

1. read only the safetensors header (shapes), so a wrong file fails in a second, before gigabytes load;
2. detect the variant by comparing the shape facts with the shipped configs in ``trainer/configs/`` (small JSON
   files with the architecture facts of each released variant, so nothing is fetched from a hub). A file that
   matches none raises a ModelError listing what it found and what each known variant has; a non-standard size
   can still be loaded by giving its diffusers ``config``;
3. convert the keys with diffusers' own single-file conversion and load them strictly into the family's
   diffusers model class (every key used, every parameter filled).

One module per file format: ``wan.py`` (Wan transformer files and the Wan VAE; ``wan22.py``: Wan 2.2 A14B expert
pairs and the Wan 2.2 VAE), ``sd.py`` (original-format SD 1.5 / SDXL checkpoints). This module only tells them
apart and dispatches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ModelError
from .common import CONFIG_DIR, SCALED_FP8_MARKERS, Variant, load_config_argument, read_shapes  # noqa: F401
from .flux import (  # noqa: F401
    FLUX_CONFIG_DIR,
    convert_flux_file,
    detect_flux,
    flux_facts_from_config,
    flux_facts_from_shapes,
    is_flux_file,
    known_flux_variants,
    load_flux_file,
    load_flux_transformer,
    load_flux_vae_file,
)
from .sd import (  # noqa: F401
    SD15_CONFIG_DIR,
    SDXL_CONFIG_DIR,
    _sd_meta_model_dict,
    _sd_meta_models,
    convert_sd15_checkpoint,
    convert_sd_checkpoint,
    detect_sd,
    detect_sd15,
    find_clip_tokenizer,
    has_clip_tokenizer,
    is_ldm_checkpoint,
    load_sd15_checkpoint,
    load_sd15_configs,
    load_sd15_vae_file,
    load_sd_checkpoint,
    load_sd_configs,
    sd_facts_from_configs,
    sd_facts_from_shapes,
)
from .wan import (  # noqa: F401
    WAN_PREFIXES,
    detect_wan,
    is_wan_file,
    known_variants,
    load_wan_file,
    load_wan_transformer,
    load_wan_vae_file,
    strip_wan_prefix,
    wan_facts_from_config,
    wan_facts_from_shapes,
)
from .wan22 import EXPERT_FAMILIES, convert_wan22_vae_to_diffusers, expert_named, load_wan22_vae_file  # noqa: F401

WHAT_LOADS = ("a Wan diffusion model from models/diffusion_models such as wan2.1_t2v_1.3B_fp16.safetensors, or "
              "a FLUX.1 dev / schnell diffusion model such as flux1-dev.safetensors (double_blocks.*, "
              "single_blocks.*), or "
              "a full SD 1.5 / SDXL checkpoint from models/checkpoints (model.diffusion_model.* with "
              "first_stage_model.* and cond_stage_model.* or conditioner.embedders.*)")


def detect_variant(path: str | Path, config: str | Path | dict | None = None,
                   shapes: dict | None = None, family: str | None = None) -> Variant:
    """The variant of a single .safetensors model file, from its header alone (see the module docstring).
    `family` picks between variants of identical shapes (a Wan 2.2 A14B T2V expert is Wan 2.1 T2V 14B)."""
    shapes = read_shapes(path) if shapes is None else shapes
    if is_ldm_checkpoint(shapes):
        return detect_sd(path, config=config, shapes=shapes)
    if is_wan_file(shapes):
        return detect_wan(path, config=config, shapes=shapes, family=family)
    if is_flux_file(shapes):
        return detect_flux(path, config=config, shapes=shapes)
    raise ModelError(f"{path}: not a model file the trainer knows (its {len(shapes)} tensors, e.g. "
                     f"{', '.join(sorted(shapes)[:4])}, are none of: {WHAT_LOADS})")


def load_single_file(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                     config: str | Path | dict | None = None, encoders_from: str | Path | None = None,
                     vae_file: str | Path | None = None, encoders=None, family: str | None = None,
                     max_sequence_length: int | None = None, tokenizer_from: str | Path | None = None,
                     low_noise_path: str | Path | None = None, text_encoder_file: str | Path | None = None,
                     image_encoder_file: str | Path | None = None):
    """A loaded ModelFamily from a single model file. `family`, when given, must be the detected one.

    `encoders` (a trainer.comfy_encoders.ExternalEncoders, e.g. ComfyUI's CLIP and VAE) replaces the family's own
    text encoder and VAE; otherwise they come from the file itself (SD checkpoints), from `encoders_from` (a
    diffusers folder of the family, only its encoders are read), `vae_file` (a VAE file), or `tokenizer_from`
    (SD: a CLIP tokenizer folder, which the ComfyUI node layer points at ComfyUI's own). Wan 2.2 A14B is two
    files: `path` the high-noise expert, `low_noise_path` the low-noise one. Wan only: `text_encoder_file`
    (ComfyUI's umt5 file) and `image_encoder_file` (clip_vision_h, Wan 2.1 I2V), see encoder_files.py."""
    path = Path(path).expanduser()
    shapes = read_shapes(path)
    if (text_encoder_file is not None or image_encoder_file is not None) and (is_ldm_checkpoint(shapes)
                                                                              or is_flux_file(shapes)):
        field = "text_encoder_file" if text_encoder_file is not None else "image_encoder_file"
        raise ModelError(f"{path}: model.{field} is for Wan models (umt5 / CLIP vision files); this file is an "
                         "SD / Flux model")
    if is_ldm_checkpoint(shapes):
        variant = detect_sd(path, config=config, shapes=shapes)  # SD 2 / refiner files: "not supported"
        _check_family(path, variant, family)
        return load_sd_checkpoint(path, dtype, device, config=config, encoders_from=encoders_from,
                                  tokenizer_from=tokenizer_from, vae_file=vae_file, variant=variant,
                                  encoders=encoders)
    if is_flux_file(shapes):
        return load_flux_file(path, dtype, device, config=config, encoders_from=encoders_from, vae_file=vae_file,
                              encoders=encoders, family=family, max_sequence_length=max_sequence_length)
    detect_variant(path, config=config, shapes=shapes)  # the clear error for a file that is none of these
    return load_wan_file(path, dtype, device, config=config, encoders_from=encoders_from, vae_file=vae_file,
                         encoders=encoders, family=family, max_sequence_length=max_sequence_length,
                         low_noise_path=low_noise_path, text_encoder_file=text_encoder_file,
                         image_encoder_file=image_encoder_file)


def _check_family(path: Path, variant: Variant, family: str | None) -> None:
    if family is not None and family != variant.family:
        raise ModelError(f"{path}: is {variant.description}, trained by model.family '{variant.family}', "
                         f"not '{family}'")


def check_encoder_files(model, variant: Variant) -> None:
    """The headers of a job's encoder files (model.text_encoder_file / image_encoder_file) against the detected
    variant: the run's cheap checks call this so a wrong file fails before the dataset scan and any loading."""
    from .encoder_files import check_image_encoder_file, check_text_encoder_file

    if getattr(model, "text_encoder_file", None):
        check_text_encoder_file(model.text_encoder_file, text_dim=variant.config.get("text_dim"),
                                tokenizer_from=getattr(model, "encoders_from", None))
    if getattr(model, "image_encoder_file", None):
        check_image_encoder_file(model.image_encoder_file, image_dim=variant.config.get("image_dim"))

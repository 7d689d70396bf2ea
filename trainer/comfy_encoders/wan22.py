"""ComfyUI's umt5 CLIP and Wan VAE as a Wan 2.2 family's encoders.

- Text: every Wan 2.2 model uses Wan 2.1's umt5 and WanPipeline's prompt handling unchanged, so the Wan 2.1
  conversion (`comfy_wan_encoders`) is used as it is.
- Pixels, A14B (wan22_14b, wan22_14b_i2v): the Wan 2.1 VAE, so the Wan 2.1 adapter as it is; the I2V family's
  first-frame latents go through the same `encode_pixels`.
- Pixels, TI2V-5B (wan22_5b): the Wan 2.2 VAE. ComfyUI's VAE.encode returns its raw posterior mean
  [1, 48, F', H/16, W/16] (ComfyUI normalizes only when sampling, in latent_formats.Wan22.process_in:
  (z - mean) * 1.0 / std); WanPipeline normalizes (z - latents_mean) / latents_std with the Wan 2.2 VAE's
  48 statistics. So the adapter normalizes with those (the shipped configs/wan22_vae/config.json, the released
  vae/config.json) and reports the 16x spatial factor.
- No Wan 2.2 model has a CLIP image branch: a CLIP vision input is refused.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from . import ExternalEncoders
from .wan import comfy_wan_encoders, normalize_wan_latents, wan_pixels_to_comfy

WAN22_VAE_CONFIG_FILE = Path(__file__).resolve().parent.parent / "configs" / "wan22_vae" / "config.json"


@lru_cache(maxsize=1)
def wan22_latent_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(latents_mean, latents_std) of the Wan 2.2 VAE, 48 values each."""
    config = json.loads(WAN22_VAE_CONFIG_FILE.read_text(encoding="utf-8"))
    return tuple(config["latents_mean"]), tuple(config["latents_std"])


def _check_inputs(model: str, vae: Any, clip_vision: Any, channels: int, vae_name: str) -> None:
    if clip_vision is not None:
        raise ValueError(f"{model} has no CLIP image encoder (its image conditioning is VAE latents): disconnect "
                         "the CLIP vision input")
    found = getattr(vae, "latent_channels", None)
    if vae is not None and found is not None and found != channels:
        raise ValueError(f"the VAE input has {found} latent channels; {model} needs {vae_name} ({channels})")


def comfy_wan22_5b_encoders(clip: Any = None, vae: Any = None, *, clip_vision: Any = None) -> ExternalEncoders:
    """ExternalEncoders for Wan 2.2 TI2V-5B: ComfyUI's umt5 `clip` and Wan 2.2 `vae` (VAELoader of
    wan2.2_vae.safetensors). Either may be None."""
    _check_inputs("Wan 2.2 TI2V-5B", vae, clip_vision, 48, "the Wan 2.2 VAE (wan2.2_vae.safetensors)")
    encoders = comfy_wan_encoders(clip, vae)  # the text part is Wan 2.1's; the pixels are normalized below
    mean, std = wan22_latent_stats()

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        latents = [vae.encode(frames) for frames in wan_pixels_to_comfy(pixels.cpu())]
        return normalize_wan_latents(torch.cat([z.float().cpu() for z in latents]), mean, std)

    encoders.encode_pixels = encode_pixels if vae is not None else None
    encoders.identity = "wan22_vae:" + encoders.identity
    encoders.spatial_factor = 16
    return encoders


def comfy_wan22_a14b_encoders(clip: Any = None, vae: Any = None, *, clip_vision: Any = None) -> ExternalEncoders:
    """ExternalEncoders for Wan 2.2 A14B (T2V and I2V): ComfyUI's umt5 `clip` and Wan 2.1 `vae`."""
    _check_inputs("Wan 2.2 A14B", vae, clip_vision, 16, "the Wan 2.1 VAE (wan_2.1_vae.safetensors)")
    return comfy_wan_encoders(clip, vae)

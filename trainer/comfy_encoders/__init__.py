"""Encoders supplied from outside the family (ComfyUI's CLIP and VAE), without importing ComfyUI.

A family normally encodes captions and pixels with the diffusers text encoder and VAE it loaded. When the
caller already has encoders loaded (a ComfyUI graph holds a CLIP and a VAE for sampling), it hands the family an
`ExternalEncoders` instead (in ``loaded.extra["external_encoders"]``); the family calls it and must receive
exactly what its own diffusers pipeline would feed the denoiser. The conversions from ComfyUI's conventions to
the pipeline's are the pure functions below (tested in CI); `comfy_wan_encoders` wires them to duck-typed
ComfyUI objects (anything with CLIP's ``tokenize`` / ``encode_from_tokens`` and VAE's ``encode``).

One module per family's conventions (``wan.py``, ...); `for_family` picks the adapter for a family.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

@dataclass
class ExternalEncoders:
    """What a family needs from outside encoders.

    encode_prompts(captions, max_length) -> one {"encoder_hidden_states": [max_length, d]} per caption (captions
    already cleaned by the family); encode_pixels(pixels [B, 3, F, H, W] in [-1, 1]) -> the family's latents.
    `identity` names the encoders for the latent cache key; `release()` drops the references so the caller's
    encoders can be unloaded once everything is cached.
    encode_image(images: [H, W, 3] uint8 arrays, each item's first frame as the pipeline's PIL image) ->
    [B, tokens, d] float32 image embeddings, as WanImageToVideoPipeline.encode_image (Wan 2.1 I2V only)."""

    encode_prompts: Callable[[list, int], list] | None
    encode_pixels: Callable[[torch.Tensor], torch.Tensor] | None
    identity: str
    spatial_factor: int = 8
    temporal_factor: int = 4
    objects: list = field(default_factory=list)
    on_release: Callable[[], None] | None = None  # e.g. the node unloading ComfyUI's models from the GPU
    encode_image: Callable[[list], torch.Tensor] | None = None

    def release(self) -> None:
        self.encode_prompts = None
        self.encode_pixels = None
        self.encode_image = None
        self.objects.clear()
        if self.on_release is not None:
            self.on_release()


def module_fingerprint(*modules) -> str:
    """A short hash of modules' classes, parameter names, shapes and a sample of values: names the encoders in
    the latent cache key, so latents cached with one VAE are never reused with another."""
    h = hashlib.sha256()
    for module in modules:
        if module is None:
            h.update(b"none")
            continue
        h.update(type(module).__name__.encode())
        params = list(module.state_dict().items())
        for name, value in params[:: max(1, len(params) // 16)]:
            h.update(f"{name}{tuple(value.shape)}{float(value.detach().double().sum()):.6e}".encode())
    return h.hexdigest()[:16]



# family -> (module, builder): each builder takes (clip, vae, clip_vision) as ComfyUI hands them over.
ADAPTERS = {
    "wan21": ("wan", "comfy_wan_encoders"),
    "wan22_5b": ("wan22", "comfy_wan22_5b_encoders"),
    "wan22_14b": ("wan22", "comfy_wan22_a14b_encoders"),
    "wan22_14b_i2v": ("wan22", "comfy_wan22_a14b_encoders"),
    "flux": ("flux", "comfy_flux_encoders"),
    "wan21_i2v": ("wan_image", "comfy_wan_image_encoders"),
    "sd15": ("sd", "comfy_sd15_encoders"),
    "sdxl": ("sd", "comfy_sdxl_encoders"),
}


def for_family(family: str, clip: Any = None, vae: Any = None, clip_vision: Any = None) -> ExternalEncoders | None:
    """The ExternalEncoders adapting ComfyUI's `clip` / `vae` / `clip_vision` to `family`'s conventions, or None
    when none is given. ValueError naming the family when it cannot take ComfyUI encoders (the node turns it
    into a clear message before any model loads)."""
    if clip is None and vae is None and clip_vision is None:
        return None
    if family not in ADAPTERS:
        raise ValueError(f"the {family} family cannot use ComfyUI's CLIP/VAE/CLIP vision inputs yet (they work "
                         f"for {', '.join(sorted(ADAPTERS))}); disconnect them so the family encodes with its own")
    import importlib

    module, builder = ADAPTERS[family]
    return getattr(importlib.import_module(f"{__name__}.{module}"), builder)(clip, vae, clip_vision=clip_vision)


from .conversions import escape_comfy_weights, truncate_comfy_tokens  # noqa: E402,F401
from .wan import (  # noqa: E402,F401  (re-exported: the Wan conversions predate the package)
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    comfy_wan_encoders,
    normalize_wan_latents,
    wan_pixels_to_comfy,
    wan_text_from_comfy,
)

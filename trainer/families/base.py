"""The one small interface every model family implements.

A family knows how to load its diffusers components, turn captions and pixels into the tensors its denoiser
wants, draw noise and timesteps for its objective, run the denoiser, say which modules a LoRA may target,
and name those modules the way ComfyUI's LoraLoader expects them in an exported file.

Shapes used throughout:
- pixels: float tensor ``[C=3, F, H, W]`` in ``[-1, 1]`` (images are ``F = 1``).
- latents: whatever ``encode_pixels`` returns for one item, without a batch dimension; batches are stacked.
- conditioning: a dict of tensors for one caption, without a batch dimension; batches are stacked per key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TargetModule:
    name: str          # diffusers module path relative to the denoiser, e.g. "blocks.0.attn1.to_q"
    module: nn.Module  # nn.Linear, nn.Conv2d or nn.Conv3d
    group: str         # "linear" (Linear and 1x1 convs) or "conv" (convs with a kernel > 1)


@dataclass
class NoisyBatch:
    model_input: torch.Tensor   # what the denoiser receives as its sample
    timesteps: torch.Tensor     # what the denoiser receives as its timestep, shape [B]
    target: torch.Tensor        # what the prediction is compared with (MSE)


@dataclass
class LoadedModel:
    """Everything a family loaded. Encoders may be set to None once their outputs are cached."""

    denoiser: nn.Module
    vae: nn.Module | None = None
    text_encoders: list = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # family specifics: scheduler config, shift, prediction type, ...


class ModelFamily:
    """Subclass once per family; instances are cheap and hold the loaded components."""

    name: str = ""
    # Pixel sizes must be multiples of this (VAE downscale x patch size).
    resolution_factor: int = 8
    # True when the family trains on clips; then num_frames must satisfy `valid_num_frames`.
    video: bool = False

    def __init__(self, loaded: LoadedModel | None = None):
        self.loaded = loaded

    # ---- static facts, usable before loading (job validation) ----
    @classmethod
    def valid_num_frames(cls, n: int) -> bool:
        return n == 1

    @classmethod
    def num_frames_rule(cls) -> str:
        return "1 (this family trains on still images)"

    @classmethod
    def has_conv_targets(cls, conv_rank: int) -> bool:
        """Whether a LoRA with this conv rank targets any conv layer (kernel > 1) of this family."""
        return conv_rank > 0

    # ---- loading ----
    @classmethod
    def load(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> "ModelFamily":
        """Load from a diffusers folder or hub id; raise ModelError naming the path if it is not this family."""
        raise NotImplementedError

    @property
    def denoiser(self) -> nn.Module:
        return self.loaded.denoiser

    # ---- encoding (run once per caption / item, then cached) ----
    def encode_prompts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, F, H, W] in [-1, 1] -> latents [B, ...] already scaled/normalized for the denoiser."""
        raise NotImplementedError

    @property
    def external_encoders(self):
        """Encoders handed in from outside (a trainer.comfy_encoders.ExternalEncoders, e.g. ComfyUI's CLIP and
        VAE), or None. A family's encode_* use its callables instead of their own encoders when they are set,
        and must get exactly the tensors their own encoders would give."""
        return self.loaded.extra.get("external_encoders") if self.loaded is not None else None

    def cache_identity(self) -> str:
        """What makes this family's latents what they are, for the disk latent cache key: the VAE's config,
        a fingerprint of its weights (a fine-tuned VAE with the same config must not reuse stale latents),
        and the family's own normalisation (in `extra`)."""
        external = self.external_encoders
        if external is not None and external.encode_pixels is not None:
            return f"{self.name}:{external.identity}"  # no diffusers VAE to fingerprint: the adapter names its own
        vae = self.loaded.vae if self.loaded is not None else None
        if vae is None:
            return self.name
        with torch.no_grad():
            fingerprint = [round(float(p.double().sum()), 6) for p in list(vae.parameters())[:: max(1, len(list(vae.parameters())) // 8)]]
        blob = json.dumps([self.name, dict(getattr(vae, "config", {})), fingerprint,
                           {k: v for k, v in self.loaded.extra.items() if isinstance(v, (int, float, str, bool))}],
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def release_encoders(self) -> None:
        """Drop the text encoders and the VAE once everything is cached."""
        self.loaded.vae = None
        self.loaded.text_encoders = []
        self.loaded.tokenizers = []
        external = self.loaded.extra.pop("external_encoders", None)
        if external is not None:
            external.release()

    # ---- objective ----
    def sample_timesteps(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """Uniform numbers u in [0, 1), one per item; `add_noise` maps them to the family's timestep."""
        return torch.rand(n, generator=generator)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> NoisyBatch:
        raise NotImplementedError

    def predict(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss_mask(self, cond: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor | None:
        """Where the loss counts, broadcastable to a prediction of `shape` (1 = counted, 0 = not), or None for
        everywhere. Positions the model is given rather than asked for (e.g. an image-to-video first frame)
        must not dilute the mean."""
        return None


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               per_item: bool = False) -> torch.Tensor:
    """The MSE over the positions `mask` counts (all when None), as one number or one per item."""
    if mask is None:
        if per_item:
            return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
        return F.mse_loss(pred, target)
    mask = mask.to(pred.device, pred.dtype).expand_as(pred)
    squared = (pred - target).square() * mask
    if per_item:
        return squared.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return squared.sum() / mask.sum().clamp_min(1)

    # ---- LoRA targets and export names ----
    def target_modules(self, linear_rank: int, conv_rank: int) -> list[TargetModule]:
        raise NotImplementedError

    @classmethod
    def export_prefix(cls, module_name: str) -> str:
        """ComfyUI key prefix for a diffusers module name; '<prefix>.lora_up.weight' etc. are written."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Metadata recorded in the exported file."""
        return {"family": self.name}


def module_group(module: nn.Module) -> str | None:
    """'linear' for Linear and 1x1 convs (kohya's convention: they take the linear rank), 'conv' for real
    convolutions, None for anything a LoRA cannot wrap."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return "linear" if all(k == 1 for k in module.kernel_size) else "conv"
    return None

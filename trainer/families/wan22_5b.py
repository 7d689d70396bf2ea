"""Wan 2.2 TI2V-5B: one Wan transformer on the Wan 2.2 VAE, text-to-video and (per dataset) image-to-video.

What differs from Wan 2.1, each as diffusers' WanPipeline / WanImageToVideoPipeline do it when the folder's
`expand_timesteps` is set:
- The 2.2 VAE: z_dim 48, patchify 2 inside the VAE, 16x spatial / 4x temporal; with the transformer's
  (1, 2, 2) patches pixel sizes are multiples of 32. Latents are normalized with its own 48-value mean / std,
  by the same formula as Wan 2.1 (inherited `encode_pixels`).
- Per-token timesteps: the transformer gets a [B, tokens] timestep (`mask[:, :, ::p_t, ::p_h, ::p_w] * t`,
  flattened), not [B].
- Image-to-video (`do_i2v: true`): no extra channels. The first frame, VAE-encoded alone (the pipeline's
  `latent_condition`), *replaces* latent frame 0 of the noisy input, and the tokens of that frame get timestep
  0. The pipeline overwrites that frame's prediction with the condition at every step, so its prediction is
  never used: `predict` returns the target there, which takes those positions out of the loss (and their
  gradient) without changing the loop. The loss is then still a mean over all positions, so an I2V sample
  weighs (F_lat - 1) / F_lat of a T2V one.
- Flow shift from the scheduler config (5.0 in the released folder).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelError
from .base import NoisyBatch
from .wan21 import Wan21
from .wan21_i2v import read_wan_folder, run_wan_transformer


class Wan22TI2V(Wan21):
    name = "wan22_5b"
    # VAE 16 x patch 2; the loaded instance recomputes it from the configs.
    resolution_factor = 32
    supports_i2v = True
    item_cond_keys = ("first_frame_latents", "i2v")

    @classmethod
    def check_folder(cls, path: str) -> dict[str, Any]:
        configs = read_wan_folder(path, cls.name)
        transformer, vae, index = configs["transformer"], configs["vae"], configs["index"]
        problems = []
        if not index.get("expand_timesteps"):
            problems.append("model_index.json does not set expand_timesteps (per-token timesteps)")
        if not vae.get("patch_size"):
            problems.append("the VAE does not patchify (not the Wan 2.2 VAE)")
        if transformer.get("in_channels") != vae.get("z_dim"):
            problems.append(f"transformer in_channels {transformer.get('in_channels')} != vae z_dim "
                            f"{vae.get('z_dim')}")
        if transformer.get("image_dim") is not None:
            problems.append("the transformer has CLIP image conditioning")
        if problems:
            raise ModelError(f"{path}: not a Wan 2.2 TI2V-5B pipeline: " + "; ".join(problems))
        return configs["scheduler"]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, i2v: bool = False) -> dict[str, torch.Tensor]:
        """[B, 3, F, H, W] -> {"latents" [B, 48, F_lat, H/16, W/16], "first_frame_latents" [B, 48, 1, h, w],
        "i2v" [B]}: the first frame encoded alone and normalized when `i2v`, zeros (unused) otherwise."""
        latents = super().encode_pixels(pixels)
        batch = latents.shape[0]
        if i2v:
            first = super().encode_pixels(pixels[:, :, :1])
        else:
            first = latents.new_zeros(batch, latents.shape[1], 1, *latents.shape[3:])
        return {"latents": latents, "first_frame_latents": first,
                "i2v": torch.full((batch,), 1.0 if i2v else 0.0)}

    def noise_mask(self, cond: dict[str, torch.Tensor], shape: torch.Size, device, dtype) -> torch.Tensor:
        """The pipeline's first_frame_mask per item: 0 on latent frame 0 of I2V items, 1 elsewhere; [B, 1, F, h, w]."""
        mask = torch.ones(shape[0], 1, *shape[2:], device=device, dtype=dtype)
        mask[:, :, 0] = 1.0 - cond["i2v"].to(device, dtype).view(-1, 1, 1, 1)
        return mask

    def loss_mask(self, cond: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """The noise mask: an I2V item's first latent frame is given, not predicted, so it has no loss."""
        return self.noise_mask(cond, shape, cond["i2v"].device, torch.float32)

    def token_timesteps(self, mask: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """[B] timesteps -> [B, tokens]: the mask sampled at each patch's corner, times t (the pipeline's
        `first_frame_mask[0][0][:, ::2, ::2] * t`, flattened)."""
        p_t, p_h, p_w = self.denoiser.config.patch_size
        per_token = mask[:, 0, ::p_t, ::p_h, ::p_w].flatten(1)
        return per_token * timesteps.to(mask.device, mask.dtype).view(-1, 1)

    def predict(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        x = noisy.model_input
        mask = self.noise_mask(cond, x.shape, x.device, x.dtype)
        first = cond["first_frame_latents"].to(x.device, x.dtype)
        hidden = (1 - mask) * first + mask * x
        # Timesteps as float32 like the pipeline's scheduler timesteps, whatever the weights' dtype.
        timestep = self.token_timesteps(mask.float(), noisy.timesteps.float())
        pred = run_wan_transformer(self.denoiser, hidden, timestep, cond, self.loaded.extra["dtype"])
        keep = mask.to(pred.device).bool()
        return torch.where(keep, pred, noisy.target.to(pred.device, torch.float32))

"""Stable Diffusion XL: UNet2DConditionModel (text_time) + AutoencoderKL + two CLIP text encoders, DDPM noise.

Everything SD 1.5 does the same way is inherited from `SD15` (the DDPM objective with the folder's betas and
prediction type, uniform integer timesteps, kohya's LoRA target selection, the `lora_unet_...` export names);
this module adds what SDXL changes:

- Text: exactly StableDiffusionXLPipeline.encode_prompt (no clip_skip): each caption goes through both
  tokenizers (max_length padding, truncation); the penultimate hidden state of each encoder is taken and the
  two are concatenated on the feature axis -> `encoder_hidden_states` [77, hidden_1 + hidden_2]; the pooled
  embedding is encoder 2's projected output (CLIPTextModelWithProjection's `text_embeds`) -> `text_embeds`.
- Size conditioning (time ids): SDXL is told (original_size, crop top-left, target_size). Our items are resized
  and centre-cropped into their bucket *before* the VAE sees them, so the image the model learns from is a
  whole, uncropped image of exactly the bucket size: original_size = target_size = bucket (latent H, W x the
  VAE's downscale) and crop = (0, 0) -- what the pipeline passes when generating at that size. (kohya and
  ai-toolkit instead record the pre-resize size and the crop offset; with our resize-then-cache design the
  bucket is the honest value and it costs no per-item bookkeeping.) Computed in `predict` from the latent shape.
- Latents: the posterior mean, scaled as the pipeline's decode expects: z * scaling_factor (0.13025 for SDXL),
  or (z - latents_mean) * scaling_factor / latents_std when the VAE config has latents_mean/std (as the
  pipeline's decode branch supports). The VAE runs in float32 (SDXL's VAE overflows in fp16).
- LoRA targets: `sd15_target_modules` unchanged -- kohya's selection reads structure only, and on the full
  SDXL UNet it gives kohya's familiar 722 linear modules (70 transformer blocks x 10 + 11 x proj_in/out).
- Export: kohya `lora_unet_<diffusers module path, . -> _>`; ComfyUI maps these for SDXL UNets through
  unet_to_diffusers, while PEFT-style `unet.<path>.to_q` names are silently ignored for attention.
- Single files: `SDXL.from_single_file` (inherited) loads an original-format SDXL base checkpoint
  (ComfyUI models/checkpoints) through trainer/families/single_file/sd.py (load_sd_checkpoint, configs in
  trainer/configs/sdxl/).
- ComfyUI's CLIP / VAE (the Train node's inputs) replace the text encoders / VAE through `external_encoders`
  (trainer/comfy_encoders/sd.py gives the same tensors as above); the checkpoint's own are then not loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelError
from .base import LoadedModel
from .pipeline_folder import denoiser_device, read_component_config, read_model_index, require_components, require_pipeline
from .sd15 import CLIP_MAX_LENGTH, SD15, freeze_on, prediction_type_problems, unet_in_channels_problems

COMPONENTS = ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
# original_size (h, w) + crop top-left (y, x) + target_size (h, w): six numbers, each embedded separately.
TIME_ID_COUNT = 6


class SDXL(SD15):
    name = "sdxl"
    resolution_factor = 8
    video = False

    # ---- loading ----
    @classmethod
    def check_folder(cls, path: str) -> dict[str, Any]:
        """Read and check the configs only; returns the scheduler config. Raises ModelError naming `path`."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig

        index = read_model_index(path)
        require_pipeline(path, index, "StableDiffusionXLPipeline", cls.name)
        require_components(path, index, COMPONENTS, "StableDiffusionXLPipeline")
        unet = read_component_config(path, "unet", UNet2DConditionModel)
        vae = read_component_config(path, "vae", AutoencoderKL)
        text_1 = read_component_config(path, "text_encoder", CLIPTextConfig)
        text_2 = read_component_config(path, "text_encoder_2", CLIPTextConfig)
        scheduler = read_component_config(path, "scheduler", DDPMScheduler)

        problems = []
        if unet.get("_class_name") != "UNet2DConditionModel":
            problems.append(f"unet/config.json _class_name is {unet.get('_class_name')!r}, not UNet2DConditionModel")
        if unet.get("addition_embed_type") != "text_time":
            problems.append(f"unet addition_embed_type is {unet.get('addition_embed_type')!r}, not 'text_time' "
                            "(not an SDXL UNet)")
        problems += unet_in_channels_problems(unet, vae)
        hidden = (text_1.get("hidden_size") or 0) + (text_2.get("hidden_size") or 0)
        if unet.get("cross_attention_dim") != hidden:
            problems.append(
                f"unet cross_attention_dim {unet.get('cross_attention_dim')} != text_encoder hidden_size "
                f"{text_1.get('hidden_size')} + text_encoder_2 hidden_size {text_2.get('hidden_size')}"
            )
        time_dim = unet.get("addition_time_embed_dim")
        expected = TIME_ID_COUNT * (time_dim or 0) + (text_2.get("projection_dim") or 0)
        if unet.get("addition_embed_type") == "text_time" and unet.get("projection_class_embeddings_input_dim") != expected:
            problems.append(
                f"unet projection_class_embeddings_input_dim {unet.get('projection_class_embeddings_input_dim')} != "
                f"6 x addition_time_embed_dim {time_dim} + text_encoder_2 projection_dim {text_2.get('projection_dim')}"
            )
        problems += prediction_type_problems(scheduler)
        if problems:
            raise ModelError(f"{path}: not an SDXL pipeline: " + "; ".join(problems))
        return scheduler

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> "SDXL":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        scheduler_config = cls.check_folder(path)
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
            # float32: SDXL's VAE overflows in fp16, and it only runs once per item before the latents are cached
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                         torch_dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the SDXL components: {e}") from e
        scheduler = DDPMScheduler.from_config(scheduler_config)
        freeze_on(device, unet, vae, text_encoder, text_encoder_2)
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        loaded = LoadedModel(
            denoiser=unet, vae=vae, text_encoders=[text_encoder, text_encoder_2], tokenizers=[tokenizer, tokenizer_2],
            extra={
                "scheduler": scheduler, "prediction_type": scheduler.config.prediction_type, "dtype": dtype,
                "path": str(path), "vae_scale_factor": vae_scale,
            },
        )
        family = cls(loaded)
        family.resolution_factor = vae_scale
        return family

    @property
    def vae_scale_factor(self) -> int:
        return self.loaded.extra["vae_scale_factor"]

    # ---- encoding ----
    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders concatenated
        ([77, h1 + h2]) and encoder 2's projected pooled output ([projection_dim])."""
        external = self.external_encoders
        if external is not None and external.encode_prompts is not None:  # e.g. ComfyUI's CLIP: the same tensors as below
            return external.encode_prompts(list(captions), CLIP_MAX_LENGTH)
        hidden_states, pooled = [], None
        for tokenizer, text_encoder in zip(self.loaded.tokenizers, self.loaded.text_encoders):
            # the pipeline pads to model_max_length; min() only guards a tokenizer that claims more than CLIP has
            max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
            tokens = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="pt")
            out = text_encoder(tokens.input_ids.to(text_encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds come first
                pooled = out[0]
            hidden_states.append(out.hidden_states[-2])
        if pooled is None:
            raise ModelError("sdxl: text_encoder_2 gave no pooled projection (it must be CLIPTextModelWithProjection)")
        hidden = torch.cat(hidden_states, dim=-1)
        return [{"encoder_hidden_states": h, "text_embeds": p} for h, p in zip(hidden, pooled)]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1, H, W] in [-1, 1] -> [B, 4, H/8, W/8] float32 latents, normalized as the pipeline decodes."""
        self.check_still_pixels(pixels)
        external = self.external_encoders
        if external is not None and external.encode_pixels is not None:  # e.g. ComfyUI's VAE, scaled by the adapter as below
            return external.encode_pixels(pixels).float()
        vae = self.loaded.vae
        latents = vae.encode(pixels[:, :, 0].to(vae.device, vae.dtype)).latent_dist.mode()
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(shape)
            std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(shape)
            return ((latents - mean) * config.scaling_factor / std).float()
        return (latents * config.scaling_factor).float()

    # ---- objective (add_noise, timesteps: SD15's DDPM) ----
    def add_time_ids(self, latent_height: int, latent_width: int) -> torch.Tensor:
        """[6]: (original h, w, crop top, left, target h, w) for a whole bucket-sized image (see module doc)."""
        height, width = latent_height * self.vae_scale_factor, latent_width * self.vae_scale_factor
        return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)

    def predict(self, noisy, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's output in float32, with the pooled text embedding and the bucket's size conditioning."""
        unet = self.denoiser
        device, dtype = denoiser_device(unet), self.loaded.extra["dtype"]
        sample = noisy.model_input.to(device, dtype)
        time_ids = self.add_time_ids(*sample.shape[-2:]).to(device, dtype).repeat(sample.shape[0], 1)
        out = unet(
            sample,
            noisy.timesteps.to(device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
            added_cond_kwargs={"text_embeds": cond["text_embeds"].to(device, dtype), "time_ids": time_ids},
            return_dict=False,
        )[0]
        return out.float()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "size_conditioning": "bucket, crop (0, 0)"}

"""Stable Diffusion 1.5: UNet2DConditionModel + AutoencoderKL + CLIP text encoder, DDPM noise.

- Objective: DDPM forward process with the betas of the folder's scheduler config; the prediction type
  (epsilon or v_prediction) is the one that config names, so v-prediction fine-tunes train as such.
- Timesteps: u in [0, 1) -> floor(u * num_train_timesteps), the uniform integer sampling of diffusers' and
  kohya's training scripts.
- Latents: the VAE posterior's mean (mode) times scaling_factor. Latents are cached per item, and a cached
  `sample()` would freeze one random draw of the posterior forever: no augmentation left, only a fixed
  perturbation, and a cache that depends on an RNG. The mean is deterministic (cached == uncached) and SD's
  posterior std is tiny next to the latent scale, so nothing is lost.
- LoRA targets follow kohya's naming and selection: Linear and 1x1 convs inside Transformer2DModel blocks are
  "linear"; with conv_rank > 0, the kernel > 1 convs of ResnetBlock2D, Downsample2D and Upsample2D are "conv".
  (kohya's LoCon also gives the resnet's 1x1 shortcut and time-embedding Linear the linear rank; we keep the
  linear group identical whether or not conv LoRA is on, so a conv rank never changes the linear layers.)
- Export: `lora_unet_<diffusers module path with . -> _>` (kohya), which ComfyUI maps for SD 1.5 UNets.
- ComfyUI's CLIP / VAE (the Train node's inputs) replace the text encoder / VAE through `external_encoders`
  (trainer/comfy_encoders/sd.py gives the same tensors as encode_prompts / encode_pixels below).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .base import LoadedModel, ModelFamily, NoisyBatch, TargetModule, module_group
from .pipeline_folder import denoiser_device, read_component_config, read_model_index, require_components, require_pipeline

COMPONENTS = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
CLIP_MAX_LENGTH = 77  # the pipelines' tokenizer model_max_length = CLIP's positions
PREDICTION_TYPES = ("epsilon", "v_prediction")


class SD15(ModelFamily):
    name = "sd15"
    resolution_factor = 8
    video = False

    # ---- loading ----
    @classmethod
    def check_folder(cls, path: str) -> dict[str, Any]:
        """Read and check the configs only; returns the scheduler config. Raises ModelError naming `path`."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig

        index = read_model_index(path)
        require_pipeline(path, index, "StableDiffusionPipeline", cls.name)
        require_components(path, index, COMPONENTS, "StableDiffusionPipeline")
        unet = read_component_config(path, "unet", UNet2DConditionModel)
        vae = read_component_config(path, "vae", AutoencoderKL)
        text = read_component_config(path, "text_encoder", CLIPTextConfig)
        scheduler = read_component_config(path, "scheduler", DDPMScheduler)

        problems = []
        if unet.get("_class_name") != "UNet2DConditionModel":
            problems.append(f"unet/config.json _class_name is {unet.get('_class_name')!r}, not UNet2DConditionModel")
        if unet.get("addition_embed_type") is not None:
            problems.append(f"unet has addition_embed_type {unet['addition_embed_type']!r} (an SDXL-style UNet)")
        problems += unet_in_channels_problems(unet, vae)
        if unet.get("cross_attention_dim") != text.get("hidden_size"):
            problems.append(
                f"unet cross_attention_dim {unet.get('cross_attention_dim')} != text_encoder hidden_size "
                f"{text.get('hidden_size')}"
            )
        problems += prediction_type_problems(scheduler)
        if problems:
            raise ModelError(f"{path}: not an SD 1.5-style pipeline: " + "; ".join(problems))
        return scheduler

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> "SD15":
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        scheduler_config = cls.check_folder(path)
        # The VAE runs in float32: SD's VAE overflows in fp16 (NaN latents), and it runs once per item before
        # the latents are cached, so full precision costs little.
        vae_dtype = torch.float32
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the SD 1.5 components: {e}") from e
        # DDPM training noise with the folder's betas, whatever sampler class the folder ships (often PNDM).
        scheduler = DDPMScheduler.from_config(scheduler_config)
        freeze_on(device, unet, vae, text_encoder)
        loaded = LoadedModel(
            denoiser=unet, vae=vae, text_encoders=[text_encoder], tokenizers=[tokenizer],
            extra={
                "scheduler": scheduler, "prediction_type": scheduler.config.prediction_type, "dtype": dtype,
                "path": str(path),
            },
        )
        family = cls(loaded)
        family.resolution_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return family

    @classmethod
    def from_single_file(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu",
                         **kwargs) -> "SD15":
        """An original-format (ldm / ComfyUI models/checkpoints) SD 1.5 checkpoint: see
        trainer/families/single_file/sd.py (load_sd15_checkpoint)."""
        from .single_file import load_single_file

        return load_single_file(path, dtype, device, family=cls.name, **kwargs)

    @property
    def scheduler(self):
        return self.loaded.extra["scheduler"]

    @property
    def prediction_type(self) -> str:
        return self.loaded.extra["prediction_type"]

    # ---- encoding ----
    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """CLIP's last hidden state over max_length padding, as StableDiffusionPipeline encodes prompts."""
        external = self.external_encoders
        if external is not None and external.encode_prompts is not None:  # e.g. ComfyUI's CLIP: the same tensors as below
            return external.encode_prompts(list(captions), CLIP_MAX_LENGTH)
        tokenizer = self.loaded.tokenizers[0]
        text_encoder = self.loaded.text_encoders[0]
        max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
        tokens = tokenizer(
            list(captions), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        device = text_encoder.device
        mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return [{"encoder_hidden_states": h} for h in hidden]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1, H, W] in [-1, 1] -> [B, 4, H/8, W/8] float32, posterior mean x scaling_factor."""
        self.check_still_pixels(pixels)
        external = self.external_encoders
        if external is not None and external.encode_pixels is not None:  # e.g. ComfyUI's VAE, scaled by the adapter as below
            return external.encode_pixels(pixels).float()
        vae = self.loaded.vae
        images = pixels[:, :, 0].to(vae.device, vae.dtype)
        latents = vae.encode(images).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def check_still_pixels(self, pixels: torch.Tensor) -> None:
        """ValueError (naming this family) unless `pixels` is one still frame [B, 3, 1, H, W] of a size the VAE
        divides."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"{self.name}: pixels must be [B, 3, F, H, W], got {list(pixels.shape)}")
        if pixels.shape[2] != 1:
            raise ValueError(f"{self.name}: trains on still images (F = 1), got F = {pixels.shape[2]}")
        height, width = pixels.shape[-2:]
        if height % self.resolution_factor or width % self.resolution_factor:
            raise ValueError(
                f"{self.name}: pixel size {height}x{width} is not a multiple of {self.resolution_factor}")

    # ---- objective ----
    def timesteps_from_u(self, u: torch.Tensor) -> torch.Tensor:
        steps = self.scheduler.config.num_train_timesteps
        return (u * steps).floor().long().clamp_(0, steps - 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> NoisyBatch:
        timesteps = self.timesteps_from_u(u.to(latents.device))
        model_input = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return NoisyBatch(model_input=model_input, timesteps=timesteps, target=target)

    def predict(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's output in float32 (the loss is taken in float32 whatever the weights' dtype)."""
        unet = self.denoiser
        device, dtype = denoiser_device(unet), self.loaded.extra["dtype"]
        out = unet(
            noisy.model_input.to(device, dtype),
            noisy.timesteps.to(device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
            return_dict=False,
        )[0]
        return out.float()

    # ---- LoRA targets and export names ----
    def target_modules(self, linear_rank: int, conv_rank: int) -> list[TargetModule]:
        return sd15_target_modules(self.denoiser, linear_rank, conv_rank)

    @classmethod
    def export_prefix(cls, module_name: str) -> str:
        return "lora_unet_" + module_name.replace(".", "_")

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "prediction_type": self.prediction_type,
            "num_train_timesteps": int(self.scheduler.config.num_train_timesteps),
        }


def unet_in_channels_problems(unet: dict[str, Any], vae: dict[str, Any]) -> list[str]:
    """The UNet must take exactly the VAE's latents (inpainting and other variants take more channels)."""
    if unet.get("in_channels") != vae.get("latent_channels", 4):
        return [
            f"unet in_channels {unet.get('in_channels')} != vae latent_channels {vae.get('latent_channels', 4)}"
            " (an inpainting or other variant UNet)"
        ]
    return []


def prediction_type_problems(scheduler: dict[str, Any]) -> list[str]:
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        return [f"scheduler prediction_type {prediction!r} is not one of {', '.join(PREDICTION_TYPES)}"]
    return []


def freeze_on(device: torch.device | str, *modules: nn.Module) -> None:
    """Frozen, in eval mode and on `device`: the base model's parts never train."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()
        module.to(device)


def sd15_target_modules(unet: nn.Module, linear_rank: int, conv_rank: int) -> list[TargetModule]:
    """kohya's selection on a diffusers UNet (works on a meta-device model too: it only reads structure)."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    wanted: dict[str, TargetModule] = {}
    for parent_name, parent in unet.named_modules():
        if isinstance(parent, Transformer2DModel):
            group = "linear" if linear_rank > 0 else None
        elif isinstance(parent, (ResnetBlock2D, Downsample2D, Upsample2D)):
            group = "conv" if conv_rank > 0 else None
        else:
            continue
        if group is None:
            continue
        for child_name, child in parent.named_modules():
            if child_name and module_group(child) == group:
                name = f"{parent_name}.{child_name}"
                wanted.setdefault(name, TargetModule(name=name, module=child, group=group))
    return list(wanted.values())

"""FLUX.1 dev / schnell: FluxTransformer2DModel + 16-channel AutoencoderKL + CLIP (pooled) and T5 text encoders.

- Objective (rectified flow, as FluxPipeline samples): model input (1 - sigma) * x0 + sigma * noise, target
  noise - x0, and the transformer's timestep is sigma itself (FluxPipeline passes t / 1000 with t = sigma * 1000).
- Sigma from u ~ U[0, 1), the same mapping FlowMatchEulerDiscreteScheduler.set_timesteps applies to its sigmas
  at inference, read from the folder's scheduler config:
    * use_dynamic_shifting (FLUX.1-dev): mu = calculate_shift(image_seq_len, base_image_seq_len,
      max_image_seq_len, base_shift, max_shift) = image_seq_len * m + b with
      m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len), b = base_shift - m * base_image_seq_len;
      image_seq_len = (H/2) * (W/2), the number of packed tokens of the batch's latents. Then
      time_shift_type "exponential": sigma = e^mu / (e^mu + (1/u - 1)), written as e^mu u / (1 + (e^mu - 1) u)
      (the same value, and finite at u = 0); "linear": sigma = mu / (mu + (1/u - 1)) = mu u / (1 + (mu - 1) u).
      FLUX.1-dev at 1024x1024 (4096 tokens): mu = 1.15, e^mu = 3.158; at 512x512 (1024 tokens) mu = 0.63.
    * otherwise (FLUX.1-schnell): the static shift, sigma = shift u / (1 + (shift - 1) u) (shift 1.0: sigma = u).
- Guidance (dev, guidance_embeds=True): the guidance embedding gets `guidance_scale`, 1.0 by default (common
  practice for LoRA training on dev; `load(..., guidance_scale=)` changes it). schnell has no guidance input.
- Single files (ComfyUI's flux1-dev / flux1-schnell): `from_single_file`, see single_file/flux.py. Encoders
  handed in from outside (`self.external_encoders`, e.g. ComfyUI's CLIP and VAE through
  trainer/comfy_encoders/flux.py) replace the CLIP/T5 and VAE below and must give the same tensors.
- Text: exactly FluxPipeline.encode_prompt: CLIP's pooler_output over 77-token max_length padding
  (`pooled_projections`), and T5's last hidden state over max_sequence_length padding with no attention mask
  (`encoder_hidden_states`); 512 = the pipeline's default (`load(..., max_sequence_length=)` lowers it, e.g. to
  the 256 schnell's model card uses). txt_ids are zeros, as the pipeline builds them.
- Latents: the VAE posterior mean, (z - shift_factor) * scaling_factor (the inverse of the pipeline's decode),
  cached as [16, H/8, W/8]. `predict` packs them 2x2 into [B, (H/16)(W/16), 64] tokens exactly as
  FluxPipeline._pack_latents, builds img_ids as _prepare_latent_image_ids (row, column in channels 1, 2), and
  unpacks the prediction back to [B, 16, H/8, W/8] as _unpack_latents, so the loss is taken on latents.
- LoRA targets (ai-toolkit's default for FLUX.1: every Linear inside the transformer blocks): in each of
  `transformer_blocks.*` the attention q/k/v/out (to_q, to_k, to_v, to_out.0), the text stream's add_q/k/v_proj
  and to_add_out, ff and ff_context (net.0.proj, net.2) and the two modulation linears (norm1.linear,
  norm1_context.linear): 14 per block; in each of `single_transformer_blocks.*` to_q/k/v, proj_mlp, proj_out and
  norm.linear: 6 per block. FLUX.1 (19 + 38 blocks): 494 modules. The embedders, norm_out and the final
  proj_out stay frozen. Flux has no convolutions, so there is no conv group.
- Export: `transformer.<diffusers module path>`, which ComfyUI's Flux LoRA map (comfy.utils.flux_to_diffusers)
  translates to its native weights, putting q/k/v (and proj_mlp in single blocks) into slices of its fused
  qkv / linear1 weights. Names outside that map raise instead of being silently ignored by ComfyUI.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .base import LoadedModel, ModelFamily, NoisyBatch, TargetModule, module_group
from .pipeline_folder import (
    denoiser_device,
    read_component_config,
    read_model_index,
    require_components,
    require_pipeline,
)

COMPONENTS = ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
DEFAULT_GUIDANCE_SCALE = 1.0
DEFAULT_MAX_SEQUENCE_LENGTH = 512
# FlowMatchEulerDiscreteScheduler's defaults, which FluxPipeline also falls back to when the config lacks them.
SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
# Scheduler options that change the inference sigmas after the shift; training could not mirror them.
UNSUPPORTED_SCHEDULER_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                                 "shift_terminal", "stochastic_sampling")

# Module paths (relative to a block) that ComfyUI's flux_to_diffusers maps for LoRA keys.
DOUBLE_BLOCK_LINEARS = (
    "norm1.linear", "norm1_context.linear",
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
SINGLE_BLOCK_LINEARS = ("norm.linear", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
# Top-level Linear layers the same map knows (not LoRA targets by default; ComfyUI swaps the scale/shift halves
# of a norm_out.linear delta itself, as it does for the weight).
TOP_LEVEL_LINEARS = (
    "x_embedder", "context_embedder", "proj_out", "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
)
_DOUBLE = re.compile(r"^transformer_blocks\.\d+\.(.+)$")
_SINGLE = re.compile(r"^single_transformer_blocks\.\d+\.(.+)$")


class Flux(ModelFamily):
    name = "flux"
    # VAE 8x downscale x the 2x2 packing.
    resolution_factor = 16
    video = False

    @classmethod
    def has_conv_targets(cls, conv_rank: int) -> bool:
        return False

    # ---- loading ----
    @classmethod
    def check_folder(cls, path: str) -> dict[str, Any]:
        """Read and check the configs only; returns the scheduler config. Raises ModelError naming `path`."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextConfig, T5Config

        index = read_model_index(path)
        require_pipeline(path, index, "FluxPipeline", cls.name)
        require_components(path, index, COMPONENTS, "FluxPipeline")
        transformer = read_component_config(path, "transformer", FluxTransformer2DModel)
        vae = read_component_config(path, "vae", AutoencoderKL)
        clip = read_component_config(path, "text_encoder", CLIPTextConfig)
        t5 = read_component_config(path, "text_encoder_2", T5Config)
        scheduler = read_component_config(path, "scheduler", FlowMatchEulerDiscreteScheduler)

        problems = []
        if transformer.get("_class_name") != "FluxTransformer2DModel":
            problems.append(
                f"transformer/config.json _class_name is {transformer.get('_class_name')!r}, not FluxTransformer2DModel"
            )
        latent_channels = vae.get("latent_channels", 4)
        if transformer.get("patch_size", 1) != 1 or transformer.get("in_channels") != 4 * latent_channels:
            problems.append(
                f"transformer in_channels {transformer.get('in_channels')} (patch_size {transformer.get('patch_size', 1)})"
                f" is not 4 x vae latent_channels {latent_channels} (a Fill/Depth/Canny or other variant)"
            )
        if transformer.get("joint_attention_dim") != t5.get("d_model"):
            problems.append(f"transformer joint_attention_dim {transformer.get('joint_attention_dim')} != "
                            f"text_encoder_2 d_model {t5.get('d_model')}")
        if transformer.get("pooled_projection_dim") != clip.get("hidden_size"):
            problems.append(f"transformer pooled_projection_dim {transformer.get('pooled_projection_dim')} != "
                            f"text_encoder hidden_size {clip.get('hidden_size')}")
        if scheduler.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            problems.append(f"scheduler is {scheduler.get('_class_name')!r}, not FlowMatchEulerDiscreteScheduler")
        for option in UNSUPPORTED_SCHEDULER_OPTIONS:
            if scheduler.get(option):
                problems.append(f"scheduler option {option}={scheduler[option]!r} is not supported")
        if scheduler.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            problems.append(f"scheduler time_shift_type {scheduler['time_shift_type']!r} is unknown")
        if problems:
            raise ModelError(f"{path}: not a FLUX.1 pipeline: " + "; ".join(problems))
        return scheduler

    @classmethod
    def load(
        cls,
        path: str,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> "Flux":
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        scheduler_config = cls.check_folder(path)
        if not (isinstance(max_sequence_length, int) and max_sequence_length > 0):
            raise ModelError(f"{path}: max_sequence_length must be a positive integer, not {max_sequence_length!r}")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ModelError(f"{path}: guidance_scale must be a finite number >= 0, not {guidance_scale!r}")
        try:
            transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
            # float32: it runs once per item before the latents are cached, so precision costs little
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
            text_encoder_2 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the FLUX.1 components: {e}") from e
        for module in (transformer, vae, text_encoder, text_encoder_2):
            module.requires_grad_(False)
            module.eval()
            module.to(device)
        shift = shift_settings(scheduler_config)
        loaded = LoadedModel(
            denoiser=transformer, vae=vae, text_encoders=[text_encoder, text_encoder_2],
            tokenizers=[tokenizer, tokenizer_2],
            extra={
                "shift": shift,
                "guidance_scale": float(guidance_scale),
                "max_sequence_length": max_sequence_length,
                "dtype": dtype,
                "path": str(path),
            },
        )
        family = cls(loaded)
        family.resolution_factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2
        return family

    @classmethod
    def from_single_file(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu", **kwargs) -> "Flux":
        """A ComfyUI-format FLUX.1 file (models/diffusion_models): see trainer/families/single_file/flux.py."""
        from .single_file import load_single_file

        return load_single_file(path, dtype, device, family=cls.name, **kwargs)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embeds else "schnell"

    @property
    def max_sequence_length(self) -> int:
        return self.loaded.extra["max_sequence_length"]

    # ---- encoding ----
    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """FluxPipeline.encode_prompt: T5 hidden states [max_sequence_length, d_model], CLIP pooled [hidden]."""
        external = self.external_encoders
        if external is not None and external.encode_prompts is not None:  # e.g. ComfyUI's CLIP: the same tensors as below
            return external.encode_prompts(list(captions), self.max_sequence_length)
        clip_tokenizer, t5_tokenizer = self.loaded.tokenizers
        clip, t5 = self.loaded.text_encoders
        captions = list(captions)
        clip_tokens = clip_tokenizer(captions, padding="max_length", max_length=clip_tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt")
        pooled = clip(clip_tokens.input_ids.to(clip.device), output_hidden_states=False).pooler_output
        t5_tokens = t5_tokenizer(captions, padding="max_length", max_length=self.max_sequence_length,
                                 truncation=True, return_tensors="pt")
        hidden = t5(t5_tokens.input_ids.to(t5.device), output_hidden_states=False)[0]
        return [{"encoder_hidden_states": h, "pooled_projections": p} for h, p in zip(hidden, pooled)]

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1, H, W] in [-1, 1] -> [B, 16, H/8, W/8] float32, (posterior mean - shift) x scaling."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"flux: pixels must be [B, 3, F, H, W], got {list(pixels.shape)}")
        if pixels.shape[2] != 1:
            raise ValueError(f"flux: trains on still images (F = 1), got F = {pixels.shape[2]}")
        height, width = pixels.shape[-2:]
        if height % self.resolution_factor or width % self.resolution_factor:
            raise ValueError(f"flux: pixel size {height}x{width} is not a multiple of {self.resolution_factor}")
        external = self.external_encoders
        if external is not None and external.encode_pixels is not None:  # e.g. ComfyUI's VAE, shifted and scaled as below
            return external.encode_pixels(pixels).float()
        vae = self.loaded.vae
        latents = vae.encode(pixels[:, :, 0].to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    # ---- objective ----
    def mu(self, image_seq_len: int) -> float:
        """FluxPipeline's calculate_shift with the folder's scheduler config."""
        s = self.loaded.extra["shift"]
        m = (s["max_shift"] - s["base_shift"]) / (s["max_image_seq_len"] - s["base_image_seq_len"])
        b = s["base_shift"] - m * s["base_image_seq_len"]
        return image_seq_len * m + b

    def sigmas_from_u(self, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """The scheduler's shift of u (see the module doc), in the rational form that is finite at u = 0."""
        s = self.loaded.extra["shift"]
        if not s["dynamic"]:
            factor = s["shift"]
        elif s["time_shift_type"] == "linear":
            factor = self.mu(image_seq_len)
        else:
            factor = math.exp(self.mu(image_seq_len))
        return factor * u / (1 + (factor - 1) * u)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> NoisyBatch:
        height, width = latents.shape[-2:]
        sigmas = self.sigmas_from_u(u.to(latents.device, torch.float32), (height // 2) * (width // 2))
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        model_input = (1 - s) * latents + s * noise
        return NoisyBatch(model_input=model_input, timesteps=sigmas, target=noise - latents)

    def predict(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pack, run the transformer as FluxPipeline does, unpack: a float32 velocity [B, 16, H/8, W/8]."""
        transformer = self.denoiser
        device, dtype = denoiser_device(transformer), self.loaded.extra["dtype"]
        latents = noisy.model_input.to(device, dtype)
        batch, channels, height, width = latents.shape
        if height % 2 or width % 2:
            raise ValueError(f"flux: latent size {height}x{width} must be even to pack 2x2 patches")
        text = cond["encoder_hidden_states"].to(device, dtype)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((batch,), self.loaded.extra["guidance_scale"], device=device, dtype=torch.float32)
        out = transformer(
            hidden_states=pack_latents(latents),
            timestep=noisy.timesteps.to(device, dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(device, dtype),
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            img_ids=latent_image_ids(height // 2, width // 2).to(device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width).float()

    # ---- LoRA targets and export names ----
    def target_modules(self, linear_rank: int, conv_rank: int) -> list[TargetModule]:
        return flux_target_modules(self.denoiser, linear_rank)

    @classmethod
    def export_prefix(cls, module_name: str) -> str:
        double, single = _DOUBLE.match(module_name), _SINGLE.match(module_name)
        known = (
            (double is not None and double.group(1) in DOUBLE_BLOCK_LINEARS)
            or (single is not None and single.group(1) in SINGLE_BLOCK_LINEARS)
            or module_name in TOP_LEVEL_LINEARS
        )
        if not known:
            raise ModelError(
                f"flux: ComfyUI's Flux LoRA map has no key for the module {module_name!r}; "
                "exclude it from the LoRA (network.ignore_if_contains) or extend trainer/families/flux.py"
            )
        return "transformer." + module_name

    def describe(self) -> dict[str, Any]:
        s = self.loaded.extra["shift"]
        return {
            "family": self.name,
            "variant": self.variant,
            "guidance_scale": self.loaded.extra["guidance_scale"] if self.guidance_embeds else None,
            "shift": (f"dynamic {s['time_shift_type']} mu({s['base_image_seq_len']:g}..{s['max_image_seq_len']:g} "
                      f"tokens -> {s['base_shift']:g}..{s['max_shift']:g})") if s["dynamic"] else s["shift"],
            "max_sequence_length": self.max_sequence_length,
        }


def shift_settings(scheduler_config: dict) -> dict[str, Any]:
    """The sigma shift a FlowMatchEulerDiscreteScheduler config implies (see the module doc), with its defaults."""
    shift = {key: float(scheduler_config.get(key) if scheduler_config.get(key) is not None else default)
             for key, default in SHIFT_DEFAULTS.items()}
    shift.update(
        dynamic=bool(scheduler_config.get("use_dynamic_shifting", False)),
        time_shift_type=scheduler_config.get("time_shift_type", "exponential"),
        shift=float(scheduler_config.get("shift", 1.0)),
    )
    return shift


def flux_target_modules(transformer: nn.Module, linear_rank: int) -> list[TargetModule]:
    """Every Linear in transformer_blocks.* and single_transformer_blocks.* (reads structure only)."""
    if linear_rank <= 0:
        return []
    return [
        TargetModule(name=name, module=module, group="linear")
        for name, module in transformer.named_modules()
        if module_group(module) == "linear" and (_DOUBLE.match(name) or _SINGLE.match(name))
    ]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: FluxPipeline._pack_latents (2x2 patches, row-major tokens)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] for latent H, W: the inverse of `pack_latents`."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)


def latent_image_ids(rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 3]: (0, row, column) per packed token, FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(cols, dtype=torch.float32)[None, :]
    return ids.reshape(rows * cols, 3)

"""Wan 2.1 text-to-video: WanTransformer3DModel + AutoencoderKLWan + UMT5 encoder, rectified-flow objective.

- Objective (flow matching, as Wan was trained): sigma = shift*u / (1 + (shift-1)*u) for u ~ U[0, 1);
  model input (1 - sigma)*x0 + sigma*noise; target noise - x0 (the velocity); timestep sigma*1000.
  `shift` is the folder's scheduler `flow_shift` (UniPC, what the Wan-AI diffusers repos ship) or `shift`
  (FlowMatchEuler); without either we use 3.0, the value diffusers documents for Wan 2.1 at 480p.
- Text: exactly WanPipeline._get_t5_prompt_embeds: prompt_clean, max_length padding with truncation, the
  encoder's last hidden state trimmed to the attention mask and zero-padded back to max_sequence_length
  (512, WanPipeline.__call__'s default; `load(..., max_sequence_length=)` can lower it).
- Latents: the VAE posterior mean (deterministic, so a cache equals a fresh encode; WanImageToVideoPipeline
  also takes the mode), normalized as WanPipeline does: (z - latents_mean) / latents_std from vae.config.
  Clips are [B, 16, (F-1)/4+1, H/8, W/8]; a still image is a 1-frame clip.
- LoRA targets: every Linear inside `blocks.*` ("linear"); with conv_rank > 0 also `patch_embedding`
  (Conv3d, kernel (1, 2, 2): "conv"). Wan's blocks have no convolutions, so conv phases only reach that layer.
- Export: `diffusion_model.<native Wan path>`; ComfyUI silently ignores diffusers names for Wan, so the mapping
  below is explicit and raises on any name it does not know.
"""

from __future__ import annotations

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

COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
DEFAULT_FLOW_SHIFT = 3.0
DEFAULT_MAX_SEQUENCE_LENGTH = 512
TIMESTEP_SCALE = 1000.0


class Wan21(ModelFamily):
    name = "wan21"
    # VAE spatial 8 x transformer patch 2; the loaded instance recomputes it from the configs.
    resolution_factor = 16
    video = True

    @classmethod
    def valid_num_frames(cls, n: int) -> bool:
        return isinstance(n, int) and n >= 1 and (n - 1) % 4 == 0

    @classmethod
    def num_frames_rule(cls) -> str:
        return "4k+1 (1, 5, 9, ..., 33, ..., 81): Wan's VAE compresses 4 frames after the first into one latent"

    @classmethod
    def has_conv_targets(cls, conv_rank: int) -> bool:
        # The only convolution a Wan LoRA can reach is the patch embedding.
        return conv_rank > 0

    # ---- loading ----
    @classmethod
    def check_folder(cls, path: str) -> dict[str, Any]:
        """Read and check the configs only; returns the scheduler config. Raises ModelError naming `path`."""
        from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
        from transformers import UMT5Config

        index = read_model_index(path)
        require_pipeline(path, index, "WanPipeline", cls.name)
        if isinstance(index.get("transformer_2"), (list, tuple)) and index["transformer_2"][0]:
            raise ModelError(
                f"{path}: has two transformers (a Wan 2.2 A14B expert pair); the wan21 family trains one"
            )
        if index.get("expand_timesteps"):
            raise ModelError(f"{path}: expand_timesteps is set (Wan 2.2 TI2V); the wan21 family is Wan 2.1 T2V")
        require_components(path, index, COMPONENTS, "WanPipeline")
        transformer = read_component_config(path, "transformer", WanTransformer3DModel)
        vae = read_component_config(path, "vae", AutoencoderKLWan)
        text = read_component_config(path, "text_encoder", UMT5Config)
        scheduler = read_component_config(path, "scheduler", FlowMatchEulerDiscreteScheduler)

        problems = []
        if transformer.get("_class_name") != "WanTransformer3DModel":
            problems.append(
                f"transformer/config.json _class_name is {transformer.get('_class_name')!r}, not WanTransformer3DModel"
            )
        if transformer.get("image_dim") is not None:
            problems.append("the transformer has image conditioning (an image-to-video model)")
        if transformer.get("in_channels") != vae.get("z_dim", 16):
            problems.append(
                f"transformer in_channels {transformer.get('in_channels')} != vae z_dim {vae.get('z_dim', 16)}"
            )
        if transformer.get("text_dim") != text.get("d_model"):
            problems.append(
                f"transformer text_dim {transformer.get('text_dim')} != text_encoder d_model {text.get('d_model')}"
            )
        if vae.get("patch_size"):
            problems.append("the VAE patchifies (a Wan 2.2 VAE)")
        if problems:
            raise ModelError(f"{path}: not a Wan 2.1 T2V pipeline: " + "; ".join(problems))
        return scheduler

    @classmethod
    def load(
        cls,
        path: str,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> "Wan21":
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        scheduler_config = cls.check_folder(path)
        if not (isinstance(max_sequence_length, int) and max_sequence_length > 0):
            raise ModelError(f"{path}: max_sequence_length must be a positive integer, not {max_sequence_length!r}")
        try:
            transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
            # The Wan VAE is run in float32 as diffusers' Wan examples do; it only runs once per item (cached).
            vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
            text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the Wan 2.1 components: {e}") from e
        for module in (transformer, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()
            module.to(device)
        shift = scheduler_config.get("flow_shift", scheduler_config.get("shift"))
        loaded = LoadedModel(
            denoiser=transformer, vae=vae, text_encoders=[text_encoder], tokenizers=[tokenizer],
            extra={
                "flow_shift": float(shift) if shift is not None else DEFAULT_FLOW_SHIFT,
                "max_sequence_length": max_sequence_length,
                "dtype": dtype,
                "path": str(path),
            },
        )
        family = cls(loaded)
        patch = transformer.config.patch_size
        family.resolution_factor = int(vae.config.scale_factor_spatial) * int(patch[1])
        family.temporal_factor = int(vae.config.scale_factor_temporal)
        return family

    @classmethod
    def from_single_file(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu",
                         **kwargs) -> "Wan21":
        """A ComfyUI-format Wan file (models/diffusion_models): see trainer/families/single_file/."""
        from .single_file import load_single_file

        return load_single_file(path, dtype, device, family=cls.name, **kwargs)

    @property
    def flow_shift(self) -> float:
        return self.loaded.extra["flow_shift"]

    @property
    def max_sequence_length(self) -> int:
        return self.loaded.extra["max_sequence_length"]

    # ---- encoding ----
    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """UMT5 embeddings exactly as WanPipeline._get_t5_prompt_embeds: [max_sequence_length, d_model] each."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        external = self.external_encoders
        if external is not None and external.encode_prompts is not None:  # e.g. ComfyUI's CLIP: the same tensors as below
            return external.encode_prompts([prompt_clean(c) for c in captions], self.max_sequence_length)
        tokenizer = self.loaded.tokenizers[0]
        text_encoder = self.loaded.text_encoders[0]
        length = self.max_sequence_length
        tokens = tokenizer(
            [prompt_clean(c) for c in captions], padding="max_length", max_length=length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        seq_lens = tokens.attention_mask.gt(0).sum(dim=1).long()
        device = text_encoder.device
        hidden = text_encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        out = []
        for h, n in zip(hidden, seq_lens):
            # Padding positions are zeros, not the encoder's output for pad tokens, as in WanPipeline.
            out.append({"encoder_hidden_states": torch.cat([h[:n], h.new_zeros(length - n, h.shape[-1])])})
        return out

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1], F = 4k+1 -> normalized latents [B, 16, (F-1)/4+1, H/8, W/8] float32."""
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"wan21: pixels must be [B, 3, F, H, W], got {list(pixels.shape)}")
        frames, height, width = pixels.shape[2:]
        if not self.valid_num_frames(frames):
            raise ValueError(f"wan21: {frames} frames; the frame count must be {self.num_frames_rule()}")
        if height % self.resolution_factor or width % self.resolution_factor:
            raise ValueError(f"wan21: pixel size {height}x{width} is not a multiple of {self.resolution_factor}")
        external = self.external_encoders
        if external is not None and external.encode_pixels is not None:  # e.g. ComfyUI's VAE, normalized by the adapter as below
            return external.encode_pixels(pixels).float()
        vae = self.loaded.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return ((latents - mean) / std).float()

    # ---- objective ----
    def sigmas_from_u(self, u: torch.Tensor) -> torch.Tensor:
        shift = self.flow_shift
        return shift * u / (1 + (shift - 1) * u)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor) -> NoisyBatch:
        sigmas = self.sigmas_from_u(u.to(latents.device, torch.float32))
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        model_input = (1 - s) * latents + s * noise
        return NoisyBatch(model_input=model_input, timesteps=sigmas * TIMESTEP_SCALE, target=noise - latents)

    def predict(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's velocity prediction in float32 (the loss is taken in float32)."""
        transformer = self.denoiser
        device, dtype = denoiser_device(transformer), self.loaded.extra["dtype"]
        out = transformer(
            hidden_states=noisy.model_input.to(device, dtype),
            timestep=noisy.timesteps.to(device),
            encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
            return_dict=False,
        )[0]
        return out.float()

    # ---- LoRA targets and export names ----
    def target_modules(self, linear_rank: int, conv_rank: int) -> list[TargetModule]:
        return wan_target_modules(self.denoiser, linear_rank, conv_rank)

    @classmethod
    def export_prefix(cls, module_name: str) -> str:
        return "diffusion_model." + native_wan_name(module_name)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "flow_shift": self.flow_shift,
            "max_sequence_length": self.max_sequence_length,
        }


def wan_target_modules(transformer: nn.Module, linear_rank: int, conv_rank: int) -> list[TargetModule]:
    """Linear layers in `blocks.*`, plus the patch embedding when conv LoRA is on (reads structure only)."""
    targets = []
    for name, module in transformer.named_modules():
        group = module_group(module)
        if group is None:
            continue
        if name.startswith("blocks.") and group == "linear" and linear_rank > 0:
            targets.append(TargetModule(name=name, module=module, group=group))
        elif name == "patch_embedding" and conv_rank > 0:
            targets.append(TargetModule(name=name, module=module, group=group))
    return targets


# diffusers name -> Wan's original (ComfyUI-native) name: the inverse of diffusers'
# convert_wan_transformer_to_diffusers. Every weight-carrying module of a Wan 2.1 T2V / I2V transformer is here.
_BLOCK_RENAMES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    # diffusers swapped these two: its norm2 is the cross-attention norm, Wan's norm3.
    "norm2": "norm3",
    "norm3": "norm2",
    "norm1": "norm1",
}
_TOP_RENAMES = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def native_wan_name(module_name: str) -> str:
    """diffusers module path of a WanTransformer3DModel -> Wan's native path; ModelError for unknown names."""
    if module_name in _TOP_RENAMES:
        return _TOP_RENAMES[module_name]
    match = _BLOCK.match(module_name)
    if match and match.group(2) in _BLOCK_RENAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_RENAMES[match.group(2)]}"
    raise ModelError(
        f"wan21: no ComfyUI (native Wan) name is known for the module {module_name!r}; "
        "exclude it from the LoRA (network.ignore_if_contains) or extend trainer/families/wan21.py"
    )

"""Wan 2.1 image-to-video (WanImageToVideoPipeline): the Wan 2.1 family plus first-frame conditioning.

Everything the T2V family does (text, latents, flow-matching objective, targets, export names) is inherited;
what changes is what the transformer receives besides the noisy latents. That conditioning belongs to the
training *item* (the clip's first frame), not to its caption, so `encode_pixels` returns it beside the latents
and the training set caches it per sample:

- ``image_condition`` [4 + z, F_lat, h, w], exactly WanImageToVideoPipeline.prepare_latents' `condition`:
  a mask (the VAE's temporal factor = 4 channels; 1 on latent frame 0, which holds the first frame, 0 after)
  followed by the VAE encoding (mode) of [first frame, F-1 zero frames], normalized (z - mean) / std. The
  transformer's input is cat([noisy latents, image_condition], channels): in_channels 36 = 16 + 4 + 16.
- ``image_embeds`` [257, 1280] (real model): the CLIP vision tower's penultimate hidden states of the first
  frame, as WanImageToVideoPipeline.encode_image, passed as `encoder_hidden_states_image`. Only for
  transformers with `image_dim` (Wan 2.1 I2V); Wan 2.2 A14B I2V has no image encoder. The tower is the
  folder's image_encoder, or ComfyUI's CLIP vision through the external encoders' `encode_image`
  (trainer/comfy_encoders/wan_image.py: the same preprocessing, the same layer).

The first frame is the sample's first frame at its bucket size: what a user hands the pipeline as `image`.
For CLIP it is quantized to 8-bit, like the PIL image the pipeline's image processor is given. The loss covers
every latent frame (the pipeline keeps the whole prediction; latent frame 0 is noised like the others).

diffusers' attention takes the image tokens as `context[:, :len - 512]`, so the text length is fixed at 512.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelError
from .base import NoisyBatch
from .pipeline_folder import (
    denoiser_device,
    read_component_config,
    read_model_index,
    require_components,
    require_pipeline,
)
from .wan21 import DEFAULT_MAX_SEQUENCE_LENGTH, TIMESTEP_SCALE, Wan21

WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
TEXT_COMPONENTS = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
# diffusers' WanAttnProcessor splits image tokens from text tokens at a hard-coded text length of 512.
I2V_TEXT_LENGTH = 512

# What each Wan family's folder is, for checks and for pointing users at the right family.
WAN_VARIANTS = {
    "wan21": "Wan 2.1 text-to-video (one transformer, no image conditioning)",
    "wan21_i2v": "Wan 2.1 image-to-video (one transformer with CLIP image conditioning)",
    "wan22_5b": "Wan 2.2 TI2V-5B (one transformer, the 2.2 VAE, per-token timesteps)",
    "wan22_14b": "Wan 2.2 A14B text-to-video (two expert transformers)",
    "wan22_14b_i2v": "Wan 2.2 A14B image-to-video (two expert transformers with first-frame conditioning)",
}


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and bool(entry[0]) and bool(entry[1])


def wan_variant(index: dict, transformer: dict, vae: dict) -> str:
    """Which Wan family a folder is, from its model_index, transformer and VAE configs."""
    z_dim = vae.get("z_dim", 16)
    first_frame_channels = transformer.get("in_channels") == 2 * z_dim + vae.get("scale_factor_temporal", 4)
    if _present(index, "transformer_2"):
        return "wan22_14b_i2v" if first_frame_channels else "wan22_14b"
    if index.get("expand_timesteps") or vae.get("patch_size"):
        return "wan22_5b"
    if first_frame_channels or transformer.get("image_dim") is not None:
        return "wan21_i2v"
    return "wan21"


def read_wan_folder(path: str, family: str, extra_components: list[str] = ()) -> dict[str, Any]:
    """model_index and component configs of a Wan folder that must be `family`; ModelError naming `path` else.

    Returns {"index", "transformer", "vae", "text", "scheduler"} (plain dicts)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config

    index = read_model_index(path)
    if index.get("_class_name") not in WAN_PIPELINES:
        require_pipeline(path, index, WAN_PIPELINES[0], family)  # raises, naming the family it is
    transformer_name = "transformer" if _present(index, "transformer") else "transformer_2"
    require_components(path, index, [c for c in TEXT_COMPONENTS if c != "transformer"] + [transformer_name],
                       index.get("_class_name"))
    configs = {
        "index": index,
        "transformer": read_component_config(path, transformer_name, WanTransformer3DModel),
        "vae": read_component_config(path, "vae", AutoencoderKLWan),
        "text": read_component_config(path, "text_encoder", UMT5Config),
        "scheduler": read_component_config(path, "scheduler", FlowMatchEulerDiscreteScheduler),
    }
    found = wan_variant(index, configs["transformer"], configs["vae"])
    if found != family:
        raise ModelError(f"{path}: this is a {WAN_VARIANTS[found]} folder, which is model.family '{found}'; the "
                         f"{family} family needs a {WAN_VARIANTS[family]} folder")
    require_components(path, index, list(extra_components), index["_class_name"])
    transformer, vae, text = configs["transformer"], configs["vae"], configs["text"]
    problems = []
    if transformer.get("text_dim") != text.get("d_model"):
        problems.append(f"transformer text_dim {transformer.get('text_dim')} != text_encoder d_model "
                        f"{text.get('d_model')}")
    if transformer.get("out_channels") != vae.get("z_dim", 16):
        problems.append(f"transformer out_channels {transformer.get('out_channels')} != vae z_dim "
                        f"{vae.get('z_dim', 16)}")
    if transformer.get("pos_embed_seq_len") is not None:
        problems.append("the transformer takes two images (first-last-frame FLF2V), which is not supported")
    if configs["scheduler"].get("num_train_timesteps", 1000) != TIMESTEP_SCALE:
        problems.append(f"scheduler num_train_timesteps {configs['scheduler'].get('num_train_timesteps')} "
                        f"is not {TIMESTEP_SCALE:g}")
    if problems:
        raise ModelError(f"{path}: not a consistent {WAN_VARIANTS[family]} pipeline: " + "; ".join(problems))
    return configs


def scheduler_shift(scheduler: dict) -> float | None:
    shift = scheduler.get("flow_shift", scheduler.get("shift"))
    return float(shift) if shift is not None else None


def run_wan_transformer(transformer, hidden_states: torch.Tensor, timestep: torch.Tensor,
                        cond: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """One forward of a WanTransformer3DModel in `dtype` on its own device; the output in float32."""
    device = denoiser_device(transformer)
    image = cond.get("image_embeds")
    out = transformer(
        hidden_states=hidden_states.to(device, dtype),
        timestep=timestep.to(device),
        encoder_hidden_states=cond["encoder_hidden_states"].to(device, dtype),
        encoder_hidden_states_image=image.to(device, dtype) if image is not None else None,
        return_dict=False,
    )[0]
    return out.float()


class FirstFrameConditioning:
    """Mixin for a Wan family whose transformer takes cat([noisy latents, mask, first-frame latents]).

    Put it before the Wan family class in the bases. It needs `loaded.vae`, `temporal_factor` and, when the
    transformer has `image_dim`, `loaded.extra["image_encoder"]` / `["image_processor"]`."""

    # Image-to-video families always condition on the first frame; do_i2v is accepted and changes nothing.
    supports_i2v = True
    item_cond_keys: tuple[str, ...] = ("image_condition",)

    @property
    def uses_clip(self) -> bool:
        external = self.external_encoders
        return "image_encoder" in self.loaded.extra or getattr(external, "encode_image", None) is not None

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, i2v: bool = True) -> dict[str, torch.Tensor]:
        """[B, 3, F, H, W] -> {"latents", "image_condition"[, "image_embeds"]}, each with a batch dimension."""
        out = {"latents": super().encode_pixels(pixels), "image_condition": self.first_frame_condition(pixels)}
        if self.uses_clip:
            out["image_embeds"] = self.encode_first_frame_clip(pixels)
        return out

    @torch.no_grad()
    def first_frame_condition(self, pixels: torch.Tensor) -> torch.Tensor:
        """The mask and the normalized latents of [first frame, zeros...]: [B, t + z, F_lat, h, w] float32."""
        batch, _, frames, height, width = pixels.shape
        video = torch.cat([pixels[:, :, :1], pixels.new_zeros(batch, 3, frames - 1, height, width)], dim=2)
        # Wan21.encode_pixels: posterior mode, normalized as the pipeline does.
        latents = super().encode_pixels(video)
        mask = latents.new_zeros(batch, self.temporal_factor, *latents.shape[2:])
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latents], dim=1)

    @torch.no_grad()
    def encode_first_frame_clip(self, pixels: torch.Tensor) -> torch.Tensor:
        """WanImageToVideoPipeline.encode_image of each item's first frame: [B, tokens, image_dim] float32."""
        images = first_frame_images(pixels)
        external = self.external_encoders
        if getattr(external, "encode_image", None) is not None:  # ComfyUI's CLIP vision: the same tensors
            embeds = external.encode_image(images).float()
            image_dim = getattr(self.denoiser.config, "image_dim", None)
            if image_dim is not None and embeds.shape[-1] != image_dim:
                raise ModelError(f"the CLIP vision model gives {embeds.shape[-1]}-wide image embeddings; the "
                                 f"transformer's image_dim is {image_dim}: connect the CLIP vision model this "
                                 "Wan I2V model was trained with (clip_vision_h.safetensors)")
            return embeds
        encoder = self.loaded.extra["image_encoder"]
        processor = self.loaded.extra["image_processor"]
        inputs = processor(images=images, return_tensors="pt").to(encoder.device)
        return encoder(**inputs, output_hidden_states=True).hidden_states[-2].float()

    def transformer_input(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        condition = cond["image_condition"].to(noisy.model_input.device, noisy.model_input.dtype)
        return torch.cat([noisy.model_input, condition], dim=1)

    def release_encoders(self) -> None:
        super().release_encoders()
        self.loaded.extra.pop("image_encoder", None)
        self.loaded.extra.pop("image_processor", None)


def first_frame_images(pixels: torch.Tensor) -> list:
    """Each item's first frame of [B, 3, F, H, W] in [-1, 1] as an [H, W, 3] uint8 array: the 8-bit image a
    user hands the pipeline (what its image processor, or ComfyUI's CLIP vision adapter, starts from)."""
    frames = ((pixels[:, :, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [frame.permute(1, 2, 0).cpu().numpy() for frame in frames]


def clip_image_processor_class():
    """The PIL CLIPImageProcessor whatever is installed. transformers 5 picks a torchvision backend when
    torchvision is there (ComfyUI's environment) and PIL otherwise; their resizes differ by up to 0.05 in the
    image embedding, so the same clip would train on different embeddings in ComfyUI and on the CLI."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def load_image_encoder(path: str, family) -> None:
    """The CLIP vision tower (float32: it runs once per item, then is cached) and its image processor."""
    from transformers import CLIPVisionModel

    try:
        encoder = CLIPVisionModel.from_pretrained(path, subfolder="image_encoder", torch_dtype=torch.float32)
        processor = clip_image_processor_class().from_pretrained(path, subfolder="image_processor")
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the image encoder / image processor: {e}") from e
    encoder.requires_grad_(False)
    encoder.eval()
    encoder.to(family.denoiser.device)
    family.loaded.extra["image_encoder"] = encoder
    family.loaded.extra["image_processor"] = processor


class Wan21I2V(FirstFrameConditioning, Wan21):
    name = "wan21_i2v"
    item_cond_keys = ("image_condition", "image_embeds")

    @classmethod
    def check_folder(cls, path: str) -> dict[str, Any]:
        from transformers import CLIPVisionConfig

        configs = read_wan_folder(path, cls.name, extra_components=["image_encoder", "image_processor"])
        transformer, vae = configs["transformer"], configs["vae"]
        clip = read_component_config(path, "image_encoder", CLIPVisionConfig)
        problems = []
        if transformer.get("image_dim") is None:
            problems.append("the transformer has no image_dim (no CLIP image conditioning)")
        elif transformer["image_dim"] != clip.get("hidden_size"):
            problems.append(f"transformer image_dim {transformer['image_dim']} != image_encoder hidden_size "
                            f"{clip.get('hidden_size')}")
        expected_in = 2 * vae.get("z_dim", 16) + vae.get("scale_factor_temporal", 4)
        if transformer.get("in_channels") != expected_in:
            problems.append(f"transformer in_channels {transformer.get('in_channels')} != {expected_in} "
                            "(noisy latents + mask + first-frame latents)")
        if problems:
            raise ModelError(f"{path}: not a Wan 2.1 I2V pipeline: " + "; ".join(problems))
        return configs["scheduler"]

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu",
             max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> "Wan21I2V":
        if max_sequence_length != I2V_TEXT_LENGTH:
            raise ModelError(f"{path}: max_sequence_length must be {I2V_TEXT_LENGTH} for Wan I2V (diffusers' "
                             f"attention splits image from text tokens at {I2V_TEXT_LENGTH}), not "
                             f"{max_sequence_length!r}")
        family = super().load(path, dtype, device, max_sequence_length=max_sequence_length)
        load_image_encoder(path, family)
        return family

    def cache_identity(self) -> str:
        identity = super().cache_identity()
        external = self.external_encoders
        if getattr(external, "encode_image", None) is not None and external.encode_pixels is None:
            # the cached items hold image embeddings too: name the CLIP vision model that made them
            identity = f"{identity}:{external.identity}"
        return identity

    def predict(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return run_wan_transformer(self.denoiser, self.transformer_input(noisy, cond), noisy.timesteps, cond,
                                   self.loaded.extra["dtype"])

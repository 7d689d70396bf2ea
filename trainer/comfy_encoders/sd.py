"""ComfyUI's SD 1.5 / SDXL CLIP and VAE (from CheckpointLoaderSimple) as the sd15 / sdxl families' encoders.

What the pipelines feed the UNet, and how ComfyUI differs (ComfyUI v0.8.0, comfy/sd1_clip.py, sdxl_clip.py):

- SD 1.5 text (StableDiffusionPipeline, no clip_skip): CLIP-L tokenized with truncation to 77 tokens
  (<start> + 75 + <end>, padded with <end>), last hidden state after the final layer norm -> [77, 768].
  ComfyUI's SD1 CLIP: layer "last" = the final-layer-normed output, the same tensor.
- SDXL text (StableDiffusionXLPipeline): both towers' penultimate hidden states (no final layer norm)
  concatenated -> [77, 768 + 1280]; tower 1 pads with <end>, tower 2 with "!" (id 0); the pooled embedding is
  tower 2's projected output at the first <end> -> text_embeds [1280]. ComfyUI's SDXL CLIP: clip_l and clip_g
  at layer -2 without the layer norm (clip_l padded with <end>, clip_g with 0), concatenated l + g, pooled =
  clip_g's projected pooled output at the first <end>: the same tensors. (add_time_ids are the family's own,
  computed from the latent size in SDXL.predict.)
- Tokenizing: ComfyUI's tokenizer reads "(word:1.2)" as a weight and "\\(" as a literal bracket, splits a
  caption into 77-token chunks (encoding every chunk and concatenating them: 154 tokens for a long caption) and
  reads "embedding:<name>" as a textual-inversion file. So the caption's brackets are escaped
  (`escape_comfy_weights`), the chunks are joined and cut to the first 75 tokens exactly as the diffusers
  tokenizer truncates (`clip_tokens_for_pipeline`), and a caption with a word starting "embedding:" is refused.
- The layer: CLIPSetLastLayer changes which layer ComfyUI's CLIP returns. The pipelines (and the families' own
  encoders) use one fixed layer and have no clip_skip, so a CLIP set to another layer is refused with an
  error rather than silently trained on different conditioning than the family's (`check_clip_layer`).
- Pixels: diffusers' VAE takes [B, 3, H, W] in [-1, 1]; ComfyUI's takes [B, H, W, 3] in [0, 1] (maps it back
  to [-1, 1] itself) and returns the posterior mean (DiagonalGaussianRegularizer with sample=False), unscaled:
  ComfyUI applies the latent format's scale factor when sampling. The families' latents are that mean times
  the VAE's scaling_factor, which is ComfyUI's latent_formats scale factor (SD15 0.18215, SDXL 0.13025).
- Precision: ComfyUI's CLIP computes in float32 from its fp16 weights (the family's text encoders compute in the
  training dtype). Its VAE runs in float32 on a CPU but in bfloat16 on most GPUs (ComfyUI's --fp32-vae forces
  float32), and the latents then agree with the family's float32 VAE within bfloat16 rounding only.
"""

from __future__ import annotations

from typing import Any

import torch

from . import ExternalEncoders, module_fingerprint
from .conversions import (
    CLIP_END,
    CLIP_MAX_LENGTH,
    clip_tokens_for_pipeline,
    escape_comfy_weights,
    still_images_to_comfy,
)

# ComfyUI's token key -> the pad id its tokenizer (and the matching diffusers tokenizer) pads with
SD15_TOWERS = {"l": CLIP_END}
SDXL_TOWERS = {"g": 0, "l": CLIP_END}  # SDXL's tokenizer_2 / ComfyUI's clip_g pad with "!" (id 0)
# The layer ComfyUI's CLIP must return for the family's pipeline: CLIPSetLastLayer values giving it (None =
# never set). SD 1.5: -1 is the last layer, layer-normed like ComfyUI's default "last"; SDXL: -2 is its default.
PIPELINE_CLIP_LAYERS = {"sd15": (None, -1), "sdxl": (None, -2)}
LATENT_SCALE = {"sd15": 0.18215, "sdxl": 0.13025}  # the VAE configs' scaling_factor = comfy latent_formats


# ---------------------------------------------------------------------------------------------- pure conversions


def check_clip_layer(family: str, layer_idx: int | None) -> None:
    """ValueError unless ComfyUI's CLIP returns the layer the family's pipeline uses (see the module doc)."""
    allowed = PIPELINE_CLIP_LAYERS[family]
    if layer_idx not in allowed:
        wanted = " or ".join(str(v) for v in allowed if v is not None)
        raise ValueError(f"the CLIP is set to stop at layer {layer_idx} (CLIPSetLastLayer); the {family} family trains "
                         f"on the conditioning of its pipeline, layer {wanted}, and has no clip skip: connect the "
                         f"CLIP before CLIPSetLastLayer (or set it to {wanted})")


def sd_text_from_comfy(cond: torch.Tensor, pooled: torch.Tensor | None, family: str) -> dict[str, torch.Tensor]:
    """ComfyUI's encode_from_tokens(..., return_pooled=True) output for one 77-token chunk -> the family's
    conditioning: {"encoder_hidden_states": [77, d]} (+ "text_embeds": [d_proj] for SDXL)."""
    hidden = cond[0] if cond.ndim == 3 else cond
    if hidden.shape[0] != CLIP_MAX_LENGTH:
        raise ValueError(f"ComfyUI's CLIP gave {hidden.shape[0]} positions for one {CLIP_MAX_LENGTH}-token chunk")
    out = {"encoder_hidden_states": hidden.float().cpu()}
    if family == "sdxl":
        if pooled is None:
            raise ValueError("ComfyUI's CLIP gave no pooled output; SDXL needs clip_g's projected pooled embedding")
        out["text_embeds"] = (pooled[0] if pooled.ndim == 2 else pooled).float().cpu()
    return out


def scale_sd_latents(raw: torch.Tensor, family: str) -> torch.Tensor:
    """ComfyUI VAE.encode's posterior mean [B, 4, h, w] -> the family's latents: mean x scaling_factor."""
    return raw.float() * LATENT_SCALE[family]


# ---------------------------------------------------------------------------------------------- the adapters


def comfy_sd_encoders(family: str, clip: Any = None, vae: Any = None, *, clip_vision: Any = None,
                      identity: str = "") -> ExternalEncoders:
    """ExternalEncoders for the sd15 / sdxl family from ComfyUI objects: `clip` (comfy.sd.CLIP: .tokenize,
    .encode_from_tokens, .layer_idx) and `vae` (comfy.sd.VAE: .encode, .latent_channels). Either may be None
    (the family then loads its own encoder for that part). The CLIP's layer setting and the VAE's latent
    channels are checked now, before any model loads."""
    if family not in LATENT_SCALE:
        raise ValueError(f"comfy_sd_encoders: family must be sd15 or sdxl, not {family!r}")
    if clip_vision is not None:
        raise ValueError(f"an {family} model has no image encoder: disconnect the CLIP vision input")
    towers = SD15_TOWERS if family == "sd15" else SDXL_TOWERS
    if clip is not None:
        check_clip_layer(family, getattr(clip, "layer_idx", None))
    if vae is not None:
        channels = getattr(vae, "latent_channels", 4)
        if channels != 4 or getattr(vae, "latent_dim", 2) != 2:
            raise ValueError(f"the VAE makes {channels}-channel latents (dims {getattr(vae, 'latent_dim', '?')}); "
                             f"the {family} family needs an SD 4-channel image VAE: connect the checkpoint's VAE")

    def encode_prompts(captions: list, max_length: int = CLIP_MAX_LENGTH) -> list:
        check_clip_layer(family, getattr(clip, "layer_idx", None))
        out = []
        for caption in captions:
            tokens = clip_tokens_for_pipeline(clip.tokenize(escape_comfy_weights(caption)), towers, max_length)
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            out.append(sd_text_from_comfy(cond, pooled, family))
        return out

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        return scale_sd_latents(vae.encode(still_images_to_comfy(pixels.cpu())).cpu(), family)

    name = identity or f"comfy-{family}-" + module_fingerprint(getattr(clip, "cond_stage_model", None),
                                                                getattr(vae, "first_stage_model", None))
    return ExternalEncoders(encode_prompts=encode_prompts if clip is not None else None,
                            encode_pixels=encode_pixels if vae is not None else None,
                            identity=name, temporal_factor=1, objects=[o for o in (clip, vae) if o is not None])


def comfy_sd15_encoders(clip: Any = None, vae: Any = None, *, clip_vision: Any = None) -> ExternalEncoders:
    return comfy_sd_encoders("sd15", clip, vae, clip_vision=clip_vision)


def comfy_sdxl_encoders(clip: Any = None, vae: Any = None, *, clip_vision: Any = None) -> ExternalEncoders:
    return comfy_sd_encoders("sdxl", clip, vae, clip_vision=clip_vision)

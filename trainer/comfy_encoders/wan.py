"""ComfyUI's umt5 CLIP and Wan VAE as a Wan family's encoders.

Wan 2.1 (what WanPipeline does, and how ComfyUI differs):
- text: diffusers cleans the prompt, tokenizes with truncation to 512 tokens (the last kept token is </s>),
  runs UMT5 with the attention mask and keeps the hidden states of the real tokens, zero-padded to 512.
  ComfyUI's umt5 tokenizer parses "(word:1.2)" weights, never truncates and pads to at least 512 with pad id 0;
  its encoder uses the attention mask and zeroes padded positions. So: escape the caption's brackets and
  (`escape_comfy_weights`), truncate the tokens to 511 + </s> (`truncate_comfy_tokens`), encode,
  and keep the first 512 rows (`wan_text_from_comfy`).
- pixels: diffusers' VAE takes [B, 3, F, H, W] in [-1, 1]; ComfyUI's takes frames as a batch [F, H, W, 3] in
  [0, 1] (`wan_pixels_to_comfy`) and returns the raw posterior mean [1, 16, F', h, w]; WanPipeline then
  normalizes (z - latents_mean) / latents_std (`normalize_wan_latents`, with the Wan 2.1 VAE's statistics).
"""

from __future__ import annotations

from typing import Any

import torch

from . import ExternalEncoders, module_fingerprint
from .conversions import escape_comfy_weights, truncate_comfy_tokens

# AutoencoderKLWan's (and ComfyUI's latent_formats.Wan21) per-channel statistics of the Wan 2.1 VAE.
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# ---------------------------------------------------------------------------------------------- pure conversions


def wan_text_from_comfy(cond: torch.Tensor, num_tokens: int, max_length: int) -> torch.Tensor:
    """ComfyUI's umt5 output [1, n, d] (or [n, d]) -> WanPipeline's [max_length, d]: the real tokens' hidden
    states, zeros after them (ComfyUI already zeroes masked positions; this makes it hold for any input)."""
    h = cond[0] if cond.ndim == 3 else cond
    if num_tokens > max_length:
        raise ValueError(f"{num_tokens} tokens do not fit max_length {max_length}; truncate the tokens first")
    out = h.new_zeros(max_length, h.shape[-1])
    out[:num_tokens] = h[:num_tokens]
    return out


def wan_pixels_to_comfy(pixels: torch.Tensor) -> list[torch.Tensor]:
    """[B, 3, F, H, W] in [-1, 1] -> per item the frames as ComfyUI's IMAGE batch [F, H, W, 3] in [0, 1]."""
    if pixels.ndim != 5 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, F, H, W], got {list(pixels.shape)}")
    images = ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return [item.permute(1, 2, 3, 0).contiguous() for item in images]


def normalize_wan_latents(raw: torch.Tensor, mean=WAN21_LATENTS_MEAN, std=WAN21_LATENTS_STD) -> torch.Tensor:
    """Raw Wan VAE latents [B, z, F', h, w] -> (z - mean) / std per channel, as WanPipeline feeds them."""
    shape = (1, raw.shape[1]) + (1,) * (raw.ndim - 2)
    m = torch.tensor(mean, dtype=torch.float32, device=raw.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=raw.device).view(shape)
    return (raw.float() - m) / s


def comfy_wan_encoders(clip: Any = None, vae: Any = None, *, clip_vision: Any = None,
                       identity: str = "") -> ExternalEncoders:
    """ExternalEncoders for a Wan 2.1 family from ComfyUI objects: `clip` (comfy.sd.CLIP of a umt5 text
    encoder: .tokenize / .encode_from_tokens) and `vae` (comfy.sd.VAE of the Wan 2.1 VAE: .encode).
    Either may be None (the family then needs its own encoder for that part). A text-to-video model has no use
    for `clip_vision`."""
    if clip_vision is not None:
        raise ValueError("a Wan text-to-video model has no image encoder: disconnect the CLIP vision input")

    def encode_prompts(captions: list, max_length: int) -> list:
        out = []
        for caption in captions:
            tokens, count = truncate_comfy_tokens(clip.tokenize(escape_comfy_weights(caption)), max_length)
            cond = clip.encode_from_tokens(tokens)
            cond = cond[0] if isinstance(cond, (tuple, list)) else cond
            out.append({"encoder_hidden_states": wan_text_from_comfy(cond.float().cpu(), count, max_length)})
        return out

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        latents = [vae.encode(frames) for frames in wan_pixels_to_comfy(pixels.cpu())]
        return normalize_wan_latents(torch.cat([z.float().cpu() for z in latents]))

    name = identity or module_fingerprint(getattr(clip, "cond_stage_model", None),
                                          getattr(vae, "first_stage_model", None))
    return ExternalEncoders(encode_prompts=encode_prompts if clip is not None else None,
                            encode_pixels=encode_pixels if vae is not None else None,
                            identity=name, objects=[o for o in (clip, vae) if o is not None])

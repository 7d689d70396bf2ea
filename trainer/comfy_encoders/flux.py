"""ComfyUI's Flux CLIP (DualCLIPLoader type flux: clip_l + t5xxl) and the FLUX.1 VAE as the Flux family's encoders.

What FluxPipeline feeds the transformer, and how ComfyUI (v0.8.0) differs:
- CLIP-L, pooled output only: the caption tokenized to 77 tokens (<|startoftext|>, at most 75 tokens,
  <|endoftext|>, padded with <|endoftext|>), run without an attention mask; the pooled output is the final
  hidden state (after the final layer norm, not projected) at the first <|endoftext|>. ComfyUI's clip_l pads the
  same way and pools at the same position, but splits a long caption into several 77-token chunks (at word
  boundaries for short words) and takes the pool of the first chunk. So the chunks are joined and cut back to one
  sequence of the pipeline's 75 real tokens (`clip_tokens_for_pipeline`).
- T5-XXL: tokenized to max_sequence_length (at most max_sequence_length - 1 tokens then </s>, padded with
  <pad> = 0), run with no attention mask, last hidden state of every position (padding included). ComfyUI's
  t5xxl tokenizer never truncates and pads to at least 256; its encoder also runs without a mask (Flux's
  T5XXLModel has attention_mask=False) and returns every position. So the tokens are cut and padded to exactly
  max_sequence_length (`truncate_comfy_tokens`, as for Wan) and the output is kept whole.
- Both tokenizers parse "(word:1.2)" weights; the caption's brackets are escaped so it is read literally
  (`escape_comfy_weights`).
- pixels: ComfyUI's VAE.encode takes images [B, H, W, 3] in [0, 1] and returns the posterior mode [B, 16, h, w]
  (its DiagonalGaussianRegularizer does not sample); the shift and scale of comfy.latent_formats.Flux
  (0.1159, 0.3611) are applied by the model at sampling time, not by the VAE. The pipeline's latents are
  (z - shift) * scale (`flux_latents_from_comfy`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import ExternalEncoders, module_fingerprint
from .conversions import (
    CLIP_END,
    CLIP_MAX_LENGTH,
    CLIP_START,
    T5_END_TOKEN,
    T5_PAD_TOKEN,
    clip_tokens_for_pipeline,
    escape_comfy_weights,
    still_images_to_comfy,
    truncate_comfy_tokens,
)

# comfy.latent_formats.Flux, and the FLUX.1 VAE config's shift_factor / scaling_factor.
FLUX_LATENT_SHIFT = 0.1159
FLUX_LATENT_SCALE = 0.3611
FLUX_LATENT_CHANNELS = 16
COMFY_FLUX_TOKEN_KEYS = ("l", "t5xxl")


# ---------------------------------------------------------------------------------------------- pure conversions


def flux_tokens_like_pipeline(tokens: dict, max_sequence_length: int, clip_ids: tuple | None = None) -> dict:
    """ComfyUI's Flux tokens {"l": chunks, "t5xxl": chunks} cut and padded to the pipeline's lengths: clip_l to one
    77-token sequence, t5xxl to exactly max_sequence_length. `clip_ids`: (start, end, pad) of the CLIP tokenizer
    (ComfyUI's defaults when None)."""
    missing = [k for k in COMFY_FLUX_TOKEN_KEYS if k not in tokens]
    if missing:
        raise ValueError(f"the CLIP gives tokens for {sorted(tokens)}, not Flux's clip_l + t5xxl; load it with "
                         "DualCLIPLoader type flux (clip_l and t5xxl files)")
    start, end, pad = clip_ids or (CLIP_START, CLIP_END, CLIP_END)
    t5, _ = truncate_comfy_tokens({"t5xxl": tokens["t5xxl"]}, max_sequence_length, T5_END_TOKEN, T5_PAD_TOKEN)
    clip = clip_tokens_for_pipeline({"l": tokens["l"]}, {"l": pad}, CLIP_MAX_LENGTH, start, end)
    return {"l": clip["l"], "t5xxl": t5["t5xxl"]}


def flux_text_from_comfy(cond: torch.Tensor, pooled: torch.Tensor, max_sequence_length: int) -> dict:
    """ComfyUI's (cond [1, n, d], pooled [1, p]) for one caption -> the family's {"encoder_hidden_states":
    [max_sequence_length, d], "pooled_projections": [p]}."""
    hidden = cond[0] if cond.ndim == 3 else cond
    if hidden.shape[0] != max_sequence_length:
        raise ValueError(f"the T5 output has {hidden.shape[0]} positions, not max_sequence_length "
                         f"{max_sequence_length}; cut the tokens with flux_tokens_like_pipeline first")
    if pooled is None:
        raise ValueError("the CLIP gave no pooled output: Flux needs clip_l's (DualCLIPLoader type flux)")
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled.reshape(-1)}


def flux_latents_from_comfy(raw: torch.Tensor) -> torch.Tensor:
    """ComfyUI's raw FLUX.1 VAE latents [B, 16, h, w] -> (z - shift) * scale, as FluxPipeline's latents."""
    return (raw.float() - FLUX_LATENT_SHIFT) * FLUX_LATENT_SCALE


# ---------------------------------------------------------------------------------------------- ComfyUI objects


def _clip_ids(clip: Any) -> tuple | None:
    """(start, end, pad) of the CLIP-L tokenizer inside a ComfyUI Flux CLIP, when it exposes them."""
    tokenizer = getattr(getattr(clip, "tokenizer", None), "clip_l", None)
    ids = tuple(getattr(tokenizer, name, None) for name in ("start_token", "end_token", "pad_token"))
    return ids if all(isinstance(i, int) for i in ids) else None


def comfy_flux_encoders(clip: Any = None, vae: Any = None, *, clip_vision: Any = None,
                        identity: str = "") -> ExternalEncoders:
    """ExternalEncoders for the Flux family from ComfyUI objects: `clip` (comfy.sd.CLIP of DualCLIPLoader type
    flux: .tokenize / .encode_from_tokens) and `vae` (comfy.sd.VAE of ae.safetensors: .encode). Either may be
    None (the family then needs its own encoder for that part). ValueError for what cannot give Flux's tensors."""
    if clip_vision is not None:
        raise ValueError("FLUX.1 has no image encoder: disconnect the CLIP vision input")
    if clip is not None:
        if getattr(clip, "layer_idx", None) is not None:
            raise ValueError("the CLIP has a 'CLIP Set Last Layer' setting, which changes T5's output; FluxPipeline "
                             "uses the last layer: connect the CLIP without it")
        positions = getattr(getattr(getattr(clip, "tokenizer", None), "clip_l", None), "max_length", CLIP_MAX_LENGTH)
        if positions != CLIP_MAX_LENGTH:
            raise ValueError(f"the CLIP's clip_l takes {positions} tokens (a long-CLIP file); FLUX.1 uses the "
                             f"{CLIP_MAX_LENGTH}-token CLIP-L (clip_l.safetensors)")
        found = clip.tokenize("")
        if not all(k in found for k in COMFY_FLUX_TOKEN_KEYS):
            raise ValueError(f"the CLIP gives tokens for {sorted(found)}, not Flux's clip_l + t5xxl; load it with "
                             "DualCLIPLoader type flux (clip_l and t5xxl files)")
    if vae is not None:
        channels = getattr(vae, "latent_channels", FLUX_LATENT_CHANNELS)
        if channels != FLUX_LATENT_CHANNELS or getattr(vae, "latent_dim", 2) != 2:
            raise ValueError(f"the VAE has {channels} latent channels{' (a video VAE)' if getattr(vae, 'latent_dim', 2) != 2 else ''}; "
                             "FLUX.1 needs its 16-channel image VAE (ae.safetensors)")
    clip_ids = _clip_ids(clip) if clip is not None else None

    def encode_prompts(captions: list, max_length: int) -> list:
        out = []
        for caption in captions:
            tokens = flux_tokens_like_pipeline(clip.tokenize(escape_comfy_weights(caption)), max_length, clip_ids)
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            item = flux_text_from_comfy(cond.float().cpu(), pooled.float().cpu() if pooled is not None else None,
                                        max_length)
            out.append(item)
        return out

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        raw = vae.encode(still_images_to_comfy(pixels.cpu()))
        return flux_latents_from_comfy(raw.float().cpu())

    name = identity or module_fingerprint(getattr(clip, "cond_stage_model", None),
                                          getattr(vae, "first_stage_model", None))
    return ExternalEncoders(encode_prompts=encode_prompts if clip is not None else None,
                            encode_pixels=encode_pixels if vae is not None else None,
                            identity=name, spatial_factor=8, temporal_factor=1,
                            objects=[o for o in (clip, vae) if o is not None])

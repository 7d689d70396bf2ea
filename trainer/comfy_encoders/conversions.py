"""ComfyUI's text and pixel conventions turned into the diffusers pipelines', shared by every adapter.

- Captions: ComfyUI's tokenizers read "(word:1.2)" as a weight and "embedding:name" as a textual-inversion file.
  The pipelines read captions literally, so every bracket is escaped (`escape_comfy_weights`); ComfyUI turns
  '\\(' and '\\)' back into brackets before parsing and leaves every other backslash alone, so escaping the
  brackets alone is exact (doubling backslashes would reach the tokenizer as two of them). "embedding:" cannot
  be escaped: such a caption is refused.
- CLIP tokens: ComfyUI splits a long caption into 77-token chunks (start, 75 tokens, end, padding) and encodes
  them all; the pipelines truncate to one chunk (`clip_tokens_for_pipeline`).
- T5 / umt5 tokens: ComfyUI never truncates and pads to its own minimum; the pipelines truncate to
  max_length - 1 tokens plus the end token and pad to max_length (`truncate_comfy_tokens`).
- Pixels: the families hold [B, 3, F, H, W] in [-1, 1]; ComfyUI's IMAGE is [B, H, W, 3] in [0, 1]
  (`still_images_to_comfy`; video frames: trainer/comfy_encoders/wan.py).
"""

from __future__ import annotations

import re

import torch

CLIP_START = 49406
CLIP_END = 49407
CLIP_MAX_LENGTH = 77
T5_END_TOKEN = 1
T5_PAD_TOKEN = 0
_EMBEDDING_WORD = re.compile(r"(?:^|[ \n])embedding:")


def escape_comfy_weights(text: str) -> str:
    """`text` escaped so ComfyUI's tokenizers read it literally (see the module doc). ValueError for a word
    starting 'embedding:', which ComfyUI would replace by an embedding file."""
    if _EMBEDDING_WORD.search(text):
        raise ValueError(f"caption {text[:80]!r} has a word starting 'embedding:', which ComfyUI's tokenizer reads "
                         "as a textual-inversion embedding file; reword that caption or disconnect the CLIP input")
    return text.replace("(", "\\(").replace(")", "\\)")


def truncate_comfy_tokens(tokens: dict, max_length: int, end_token: int = T5_END_TOKEN,
                          pad_token: int = T5_PAD_TOKEN) -> tuple[dict, int]:
    """ComfyUI tokens ({name: [[(id, weight[, word_id]), ...]]}, one sequence) truncated the way
    `tokenizer(..., max_length, truncation=True)` truncates: at most max_length - 1 real tokens, then the end
    token, padded with pad tokens to max_length. Returns (tokens, number of real tokens including the end)."""
    out: dict = {}
    kept = None
    for name, batches in tokens.items():
        flat = [t for batch in batches for t in batch]
        ids = [t[0] for t in flat]
        if end_token in ids:
            real = flat[:ids.index(end_token)]
        else:
            real = [t for t in flat if t[0] != pad_token]
        real = real[: max_length - 1]
        weight_tail = tuple(flat[0][2:]) if flat and len(flat[0]) > 2 else ()
        seq = list(real) + [(end_token, 1.0) + weight_tail]
        seq += [(pad_token, 1.0) + weight_tail] * (max_length - len(seq))
        out[name] = [seq]
        kept = len(real) + 1 if kept is None else kept
    return out, int(kept or 0)


def clip_tokens_for_pipeline(tokens: dict, towers: dict[str, int], max_length: int = CLIP_MAX_LENGTH,
                             start: int = CLIP_START, end: int = CLIP_END) -> dict:
    """ComfyUI's tokens ({key: [chunk, ...]}, each chunk [(id, weight[, word id]), ...] = <start> real... <end>
    pad...) -> one chunk per key as the diffusers tokenizer gives with padding="max_length", truncation=True:
    <start>, the caption's first max_length - 2 tokens, <end>, padded with that tower's pad id to max_length.

    `towers`: {key: pad id} the family's CLIP must have (ValueError naming the keys otherwise: another model's
    CLIP). ValueError for a weight other than 1.0 or an embedding tensor (the caption must come through
    `escape_comfy_weights`)."""
    if set(tokens) != set(towers):
        raise ValueError(f"the CLIP gives token streams {sorted(tokens)}, this family's text encoders are "
                         f"{sorted(towers)}: connect the CLIP of the same model")
    out = {}
    for key, pad in towers.items():
        real = []
        for chunk in tokens[key]:
            ids = list(chunk)
            if ids and _token_id(ids[0]) == start:
                ids = ids[1:]
            for item in ids:
                if _token_id(item) == end:
                    break  # the rest of the chunk is padding
                if len(item) > 1 and float(item[1]) != 1.0:
                    raise ValueError(f"token weight {item[1]} in the {key} tokens: the caption was read as weight "
                                     "syntax; escape it with escape_comfy_weights")
                real.append(_token_id(item))
        seq = [start] + real[: max_length - 2] + [end]
        seq += [pad] * (max_length - len(seq))
        out[key] = [[(t, 1.0) for t in seq]]
    return out


def _token_id(item) -> int:
    token = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(token, torch.Tensor) and token.numel() != 1 or not isinstance(token, (int, torch.Tensor)):
        raise ValueError("the tokens hold an embedding vector, not token ids; the caption must not name embeddings")
    return int(token)


def still_images_to_comfy(pixels: torch.Tensor, family: str = "this family") -> torch.Tensor:
    """[B, 3, 1, H, W] (or [B, 3, H, W]) in [-1, 1] -> ComfyUI's IMAGE [B, H, W, 3] in [0, 1]."""
    if pixels.ndim == 5:
        if pixels.shape[2] != 1:
            raise ValueError(f"{family} trains on still images (F = 1), got pixels {list(pixels.shape)}")
        pixels = pixels[:, :, 0]
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, 1, H, W], got {list(pixels.shape)}")
    return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()

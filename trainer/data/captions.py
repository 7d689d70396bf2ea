"""Captions: reading caption files, the trigger word, and caption dropout.

The trigger word follows ai-toolkit's convention: ``[trigger]`` in a caption is replaced by the dataset's
``trigger_word``, and a caption that does not contain the trigger word gets it prepended (``"ohwx, rest"``),
so every training caption carries the word the LoRA should bind to.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from trainer.errors import DatasetError

TRIGGER_PLACEHOLDER = "[trigger]"


def read_caption(path: Path) -> str:
    """The caption text of `path`, stripped. UTF-8 only (a UTF-8 byte-order mark is accepted)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(path, f"cannot read the caption file ({exc.strerror or exc}); check its permissions") from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            path,
            f"the caption is not valid UTF-8 (bad byte at offset {exc.start}); open it in a text editor and "
            "save it as UTF-8",
        ) from exc
    return text.strip()


def _tidy(text: str) -> str:
    """Collapse the whitespace and empty comma slots left behind when a placeholder is removed."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"\s+,", ",", text)
    return text.strip().strip(",").strip()


def _contains_word(text: str, word: str) -> bool:
    # Word boundaries that also work for triggers made of non-word characters such as "<sks>".
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def apply_trigger(caption: str, trigger_word: str | None) -> str:
    """Replace ``[trigger]`` with `trigger_word` and prepend the word when the caption lacks it.

    Without a trigger word, ``[trigger]`` placeholders are removed (ai-toolkit does the same).
    """
    trigger = (trigger_word or "").strip()
    if not trigger:
        return _tidy(caption.replace(TRIGGER_PLACEHOLDER, "")) if TRIGGER_PLACEHOLDER in caption else caption.strip()
    caption = caption.replace(TRIGGER_PLACEHOLDER, trigger).strip()
    if not caption:
        return trigger
    if _contains_word(caption, trigger):
        return caption
    return f"{trigger}, {caption}"


def dropout_mask(rates: list[float], generator: torch.Generator | None) -> list[bool]:
    """One uniform draw per item (always, so the generator advances the same way whatever the rates):
    True where the item's caption is dropped for this step."""
    if not rates:
        return []
    draws = torch.rand(len(rates), generator=generator)
    return [bool(u < rate) for u, rate in zip(draws.tolist(), rates)]


def apply_dropout(captions: list[str], rates: list[float], generator: torch.Generator | None) -> list[str]:
    """Captions with each one replaced by "" with its own probability (caption_dropout_rate)."""
    return ["" if drop else caption for caption, drop in zip(captions, dropout_mask(rates, generator))]

"""Small helpers the family tests share."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def stack(conds: list[dict]) -> dict:
    """Per-caption conditioning dicts -> one batch dict."""
    return {k: torch.stack([c[k] for c in conds]) for k in conds[0]}


def edit_json(path: Path, **changes) -> None:
    """Change keys of a JSON config file in place; a None value removes the key."""
    path = Path(path)
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))

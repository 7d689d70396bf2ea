"""Latent and text-embedding caches.

Latents are computed once per (media, bucket) and kept on CPU; with ``cache_latents_to_disk`` they are also
written as safetensors files so the next run skips the VAE. A disk entry's name is the sha256 of everything
that changes the latent: the media content (sha256 of the file bytes, or of the pixels for in-memory
items), the bucket size, the frame indices, num_frames, the family name, the family's `cache_identity()`
(which should change with the VAE weights or its normalization) and this pipeline's version.
Text embeddings are computed once per distinct caption, on CPU, in memory only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# Bump when loading, resizing or cropping changes, so old disk entries stop matching.
PIPELINE_VERSION = 1
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def family_identity(family) -> dict:
    identity = getattr(family, "cache_identity", None)
    return {"family": getattr(family, "name", type(family).__name__),
            "family_identity": str(identity()) if callable(identity) else ""}


def latent_cache_key(content_sha256: str, *, bucket: tuple[int, int], frame_indices: list[int], num_frames: int,
                     family) -> str:
    settings = {
        "content": content_sha256,
        "bucket": [int(bucket[0]), int(bucket[1])],
        "frame_indices": [int(i) for i in frame_indices],
        "num_frames": int(num_frames),
        "pipeline": PIPELINE_VERSION,
        **family_identity(family),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


class DiskLatentCache:
    """safetensors files named ``<key>.safetensors`` in one directory, written atomically."""

    def __init__(self, directory: Path, log: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.log = log
        self.usable = True

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["latent"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            # A cache entry is disposable: report it and recompute (it is overwritten on save).
            self.log(f"warning: ignoring unreadable cache file {path} ({exc})")
            return None

    def save(self, key: str, latent: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
        if not self.usable:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.directory)
            os.close(handle)
        except OSError as exc:
            self.usable = False
            self.log(f"warning: cannot write the latent cache in {self.directory} ({exc.strerror or exc}); "
                     "latents stay in memory only")
            return
        try:
            save_file({"latent": latent.detach().to("cpu").contiguous()}, temp_name, metadata=metadata or {})
            os.replace(temp_name, self.path_for(key))
        finally:
            if os.path.exists(temp_name):
                os.remove(temp_name)


def encode_captions(family, captions: list[str], batch_size: int = 8) -> dict[str, dict[str, torch.Tensor]]:
    """``{caption: {key: tensor on CPU}}``, each distinct caption encoded exactly once, `batch_size` at a time."""
    distinct = list(dict.fromkeys(captions))
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            outputs = family.encode_prompts(chunk)
            if len(outputs) != len(chunk):
                raise RuntimeError(f"{type(family).__name__}.encode_prompts returned {len(outputs)} results for "
                                   f"{len(chunk)} captions")
            for caption, cond in zip(chunk, outputs):
                encoded[caption] = {key: value.detach().to("cpu") for key, value in cond.items()}
    return encoded

"""Aspect-ratio buckets that never upscale, and the resize + center crop into a bucket.

A bucket is a ``(width, height)`` pixel size, both multiples of the family's resolution factor. For a
resolution R the bucket has an area of about R*R and the source's aspect ratio; when the source is smaller
than that bucket, the bucket is the largest multiple-of-factor size that fits inside the source, so pixels
are only ever scaled down (upscaling invents detail the LoRA would learn as blur).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def native_bucket(width: int, height: int, factor: int) -> tuple[int, int]:
    """The largest multiple-of-`factor` size that fits inside a `width` x `height` source."""
    if width < factor or height < factor:
        raise ValueError(f"{width}x{height} is smaller than the model's size step of {factor} pixels")
    return (width // factor * factor, height // factor * factor)


def bucket_size(width: int, height: int, resolution: int | None, factor: int) -> tuple[int, int]:
    """The ``(width, height)`` bucket of a `width` x `height` source for `resolution`.

    ``resolution=None`` means the source's own size (rounded down to the factor), used for in-memory images
    that were generated at the size they should train at.
    """
    if resolution is None:
        return native_bucket(width, height, factor)
    if resolution < factor:
        raise ValueError(f"resolution {resolution} is smaller than the model's size step of {factor} pixels")
    ratio_root = math.sqrt(width / height)
    bucket_w = round(resolution * ratio_root / factor) * factor
    bucket_h = round(resolution / ratio_root / factor) * factor
    # An extreme aspect ratio can round the short side to nothing: give it one step and keep the area.
    area_steps = round(resolution * resolution / (factor * factor))
    if bucket_w < factor:
        bucket_w, bucket_h = factor, max(1, area_steps) * factor
    elif bucket_h < factor:
        bucket_w, bucket_h = max(1, area_steps) * factor, factor
    if bucket_w > width or bucket_h > height:
        return native_bucket(width, height, factor)
    return (bucket_w, bucket_h)


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size a `width` x `height` source is resized to so it covers `bucket` with its aspect kept."""
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    return (max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale)))


def resize_and_crop(frames: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
    """Resize float `frames` ``[N, C, H, W]`` (antialiased bicubic) so they cover `bucket`, then center-crop.

    Values are clamped to the input's range afterwards, because bicubic filters overshoot at edges.
    Returns ``[N, C, bucket_h, bucket_w]``.
    """
    if frames.ndim != 4:
        raise ValueError(f"expected frames [N, C, H, W], got shape {tuple(frames.shape)}")
    height, width = frames.shape[-2:]
    bucket_w, bucket_h = bucket
    if bucket_w > width or bucket_h > height:
        raise ValueError(f"bucket {bucket_w}x{bucket_h} is larger than the {width}x{height} source (no upscaling)")
    new_w, new_h = cover_size(width, height, bucket)
    if (new_w, new_h) != (width, height):
        low, high = frames.amin(), frames.amax()
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        frames = frames.clamp(low, high)
    top = (new_h - bucket_h) // 2
    left = (new_w - bucket_w) // 2
    return frames[:, :, top : top + bucket_h, left : left + bucket_w].contiguous()

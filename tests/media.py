"""Tiny real media files for tests: images through Pillow, encoded videos through PyAV.

Video frames can carry their own index in their pixels (`index_frame` / `frame_index_of`), so a test can
check that a reader returned exactly the frames it should have, after real lossy encoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import av
import numpy as np
from PIL import Image

# Codec per container: what a user's files most likely hold.
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}


def write_image(path, width: int = 64, height: int = 48, *, color=None, array=None, seed: int = 0,
                exif_orientation: int | None = None) -> Path:
    """Write a real PNG/JPEG/WebP (format from the suffix).

    Content: `array` (uint8 [H, W, 3]) if given, else a solid `color` (r, g, b), else seeded noise.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        if color is not None:
            array = np.empty((height, width, 3), np.uint8)
            array[:] = np.asarray(color, np.uint8)
        else:
            array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), "RGB")
    kwargs = {}
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = 95
    if path.suffix.lower() == ".webp":
        kwargs["lossless"] = True
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    image.save(path, **kwargs)
    return path


def write_caption(media_path, text: str | bytes, ext: str = "txt", encoding: str = "utf-8") -> Path:
    """Write the same-stem caption file next to `media_path`."""
    path = Path(media_path).with_suffix("." + ext.lstrip("."))
    path.write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
    return path


# ---- frames that carry their index ----
# Two horizontal bands; each holds 5 bits of the index as a flat gray level 8*k + 4, which survives lossy
# encoding and the limited-range YUV round trip (error < 4). Up to 1024 frames. For index < 32 the bottom
# band is gray 4 and the top band 8*index + 4: close to the "solid gray = index * 8" picture.
def index_frame(index: int, width: int, height: int) -> np.ndarray:
    if not 0 <= index < 1024:
        raise ValueError("index_frame encodes 0..1023")
    frame = np.empty((height, width, 3), np.uint8)
    frame[: height // 2] = (index % 32) * 8 + 4
    frame[height // 2 :] = (index // 32) * 8 + 4
    return frame


def frame_index_of(frame: np.ndarray) -> int:
    """Read back the index an `index_frame` was made from (after encoding, decoding, even resizing)."""
    frame = np.asarray(frame, np.float64)
    height = frame.shape[0]
    margin = max(1, height // 8)
    low = frame[: height // 2 - margin].mean()
    high = frame[height // 2 + margin :].mean()
    return int(round((high - 4) / 8)) * 32 + int(round((low - 4) / 8))


def textured_frames(count: int, width: int, height: int, seed: int = 0) -> Iterable[np.ndarray]:
    """A moving random texture: frames with realistic decode cost (unlike flat frames), for benchmarks."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (height + count, width + count, 3), dtype=np.uint8)
    for i in range(count):
        yield texture[i : i + height, i : i + width]


def write_video(path, frames: Iterable[np.ndarray] | None = None, *, num_frames: int = 16, width: int = 64,
                height: int = 48, fps: int = 24, gop: int = 8, codec: str | None = None, crf: int = 18,
                rotation: int = 0) -> Path:
    """Encode a real video (container from the suffix) with a keyframe exactly every `gop` frames.

    `rotation`: counter-clockwise display rotation written as a display matrix (as phones do).

    `frames` (uint8 [H, W, 3] each) default to `index_frame(i)` for i < num_frames.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or VIDEO_CODECS[path.suffix.lower()]
    if frames is None:
        frames = (index_frame(i, width, height) for i in range(num_frames))
    container = av.open(str(path), "w")
    try:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        if codec == "libx264":
            # Fixed GOPs: no scene-cut keyframes (every index frame looks like a scene cut).
            stream.options = {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0", "crf": str(crf),
                              "preset": "veryfast"}
        elif codec.startswith("libvpx"):
            stream.options = {"keyint_min": str(gop), "crf": str(crf), "b": "0", "deadline": "realtime",
                              "cpu-used": "8"}
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def keyframe_indices(path) -> list[int]:
    """Frame indices (presentation order) of the keyframes, from the demuxer's packet flags."""
    container = av.open(str(path))
    try:
        stream = container.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size]
    finally:
        container.close()
    order = sorted(pts for pts, _ in packets)
    return sorted(order.index(pts) for pts, key in packets if key)


# ---- a fake model family, so data tests do not depend on the real families ----
import hashlib  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.families.base import ModelFamily  # noqa: E402


class FakeImageFamily(ModelFamily):
    """encode_pixels = 8x8 average pooling; encode_prompts = sha256-derived vectors; counts every call."""

    name = "fake_image"
    resolution_factor = 8
    video = False

    def __init__(self, identity: str = "v1"):
        super().__init__(None)
        self.identity = identity
        self.pixel_calls: list[tuple] = []
        self.prompt_calls: list[list[str]] = []

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.ndim == 5 and pixels.shape[1] == 3, pixels.shape
        self.pixel_calls.append(tuple(pixels.shape))
        return F.avg_pool3d(pixels, (1, 8, 8))

    def encode_prompts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        self.prompt_calls.append(list(captions))
        return [{"prompt_embeds": caption_vector(c)} for c in captions]

    def cache_identity(self) -> str:
        return self.identity


class FakeVideoFamily(FakeImageFamily):
    name = "fake_video"
    video = True

    @classmethod
    def valid_num_frames(cls, n: int) -> bool:
        return isinstance(n, int) and n >= 1 and (n - 1) % 4 == 0

    @classmethod
    def num_frames_rule(cls) -> str:
        return "4k+1 frames (1, 5, 9, ...)"


def caption_vector(caption: str) -> torch.Tensor:
    digest = hashlib.sha256(caption.encode()).digest()
    return torch.tensor(list(digest[:16]), dtype=torch.float32).view(2, 8) / 255.0

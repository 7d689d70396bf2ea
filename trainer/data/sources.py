"""Where training media come from: folders on disk, or in-memory ComfyUI IMAGE batches.

Both produce `MediaItem`s: one image or clip with its final caption and the dataset settings that apply to
it. Scanning a folder checks every file cheaply (Pillow's verify, a PyAV demux and one decoded frame) so a
bad file is reported, naming it, before any model work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.data.buckets import resize_and_crop
from trainer.data.captions import apply_trigger, read_caption
from trainer.data.video import VideoInfo, probe_video, read_frames
from trainer.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv")
CACHE_DIRNAME = ".phase_trainer_cache"
# EXIF orientations that swap width and height (90 / 270 degree rotations).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


@dataclass
class MediaItem:
    """One image or clip, with its final caption and the settings of the dataset it came from."""

    kind: str                              # "image" or "video"
    caption: str                           # trigger word applied; dropout happens per step, later
    width: int                             # as displayed (EXIF rotation applied)
    height: int
    path: Path | None = None               # the file; None for in-memory items
    pixels: torch.Tensor | None = None     # in-memory items: float [F, H, W, 3] in 0..1 (ComfyUI layout)
    video_info: VideoInfo | None = None    # videos on disk
    frame_count: int = 1                   # frames in the source
    num_frames: int = 1                    # frames per training sample (1 for images)
    source: str = ""                       # the folder, or "tensors"
    dataset_index: int = 0
    resolutions: tuple = (None,)           # pixel resolutions; None = the source's own size
    frame_sampling: str = "auto"
    caption_dropout_rate: float = 0.0
    num_repeats: int = 1
    cache_to_disk: bool = False
    on_bad_file: str = "error"             # "skip": a file that fails to decode later is dropped with a warning
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else f"{self.source}[{self.extra.get('index', 0)}]"


def _setting(cfg, name: str, default):
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def resolutions_of(cfg) -> tuple[int, ...]:
    """The dataset's resolution list (a single number is accepted as a one-item list)."""
    value = _setting(cfg, "resolution", [512])
    if isinstance(value, (int, float)):
        value = [value]
    return tuple(int(r) for r in value)


def _check_image(path: Path, factor: int) -> tuple[int, int]:
    """Open and verify an image without decoding it; returns its displayed (width, height)."""
    try:
        with Image.open(path) as image:
            image.verify()  # must come straight after open; checks structure and checksums, no decoding
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112)
    except UnidentifiedImageError as exc:
        raise DatasetError(path, "not a readable image (unknown or corrupt format); re-save it as PNG or JPEG") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(path, f"the image is corrupt or unreadable ({exc}); re-save it or remove it") from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    if width < factor or height < factor:
        raise DatasetError(path, f"the image is {width}x{height}, smaller than the model's minimum of {factor} "
                                 "pixels per side; remove it")
    return width, height


def _scan_file(path: Path, cfg, family, caption: str) -> MediaItem:
    """A MediaItem for one media file, or DatasetError naming it."""
    factor = family.resolution_factor
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    if size == 0:
        raise DatasetError(path, "the file is empty (0 bytes); remove it or copy it again")
    num_frames = int(_setting(cfg, "num_frames", 1))
    common = dict(
        caption=caption,
        path=path,
        source=str(_setting(cfg, "folder_path", "")),
        resolutions=resolutions_of(cfg),
        frame_sampling=_setting(cfg, "frame_sampling", "auto"),
        caption_dropout_rate=float(_setting(cfg, "caption_dropout_rate", 0.0)),
        num_repeats=int(_setting(cfg, "num_repeats", 1)),
        cache_to_disk=bool(_setting(cfg, "cache_latents_to_disk", False)),
        on_bad_file=str(_setting(cfg, "on_bad_file", "error")),
    )
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        width, height = _check_image(path, factor)
        return MediaItem(kind="image", width=width, height=height, **common)
    if not family.video:
        raise DatasetError(path, f"this is a video, but the {family.name or 'chosen'} model family trains on still "
                                 "images; remove it or use a video model family")
    info = probe_video(path)
    if info.width < factor or info.height < factor:
        raise DatasetError(path, f"the video is {info.width}x{info.height}, smaller than the model's minimum of "
                                 f"{factor} pixels per side; remove it")
    if info.frame_count < num_frames:
        raise DatasetError(path, f"the video has {info.frame_count} frames, fewer than num_frames={num_frames}; "
                                 "lower num_frames or remove this clip")
    return MediaItem(kind="video", width=info.width, height=info.height, video_info=info,
                     frame_count=info.frame_count, num_frames=num_frames, **common)


def scan_folder(cfg, family, *, dataset_index: int = 0, log: Callable[[str], None] = print) -> list[MediaItem]:
    """Every usable image and video in `cfg.folder_path` (not recursive), with captions resolved.

    `cfg` is a trainer.job.DatasetConfig (or a dict with its keys); `family` a ModelFamily class or instance.
    Bad files raise DatasetError naming them, or with ``on_bad_file="skip"`` are skipped with one warning
    line each. A folder left without media is always an error.
    """
    folder = Path(str(_setting(cfg, "folder_path", ""))).expanduser()
    field_name = f"datasets[{dataset_index}].folder_path"
    if not folder.exists():
        raise DatasetError(folder, f"the folder does not exist; check {field_name}")
    if not folder.is_dir():
        raise DatasetError(folder, f"this is not a folder; {field_name} must name a folder of images or videos")
    caption_ext = "." + str(_setting(cfg, "caption_ext", "txt")).lstrip(".")
    default_caption = str(_setting(cfg, "default_caption", "") or "")
    trigger_word = _setting(cfg, "trigger_word", None)
    skip = _setting(cfg, "on_bad_file", "error") == "skip"

    media, ignored = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or suffix in VIDEO_EXTENSIONS:
            media.append(path)
        elif suffix != caption_ext.lower():
            ignored.append(path.name)
    if not media:
        raise DatasetError(folder, "no images (" + ", ".join(e[1:] for e in IMAGE_EXTENSIONS) + ") or videos ("
                           + ", ".join(e[1:] for e in VIDEO_EXTENSIONS) + f") in this folder; add media files with "
                           f"same-name {caption_ext} captions")
    if ignored:
        shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
        log(f"note: {folder}: ignoring {len(ignored)} file(s) that are not supported images or videos ({shown})")

    items: list[MediaItem] = []
    missing_captions = 0
    skipped = 0
    for path in media:
        caption_path = path.with_suffix(caption_ext)
        try:
            if caption_path.is_file():
                raw_caption = read_caption(caption_path)
            else:
                missing_captions += 1
                raw_caption = default_caption
            item = _scan_file(path, cfg, family, apply_trigger(raw_caption, trigger_word))
        except DatasetError as exc:
            if not skip:
                raise
            skipped += 1
            log(f"warning: skipping {exc}")
            continue
        item.dataset_index = dataset_index
        items.append(item)
    if missing_captions:
        log(f"warning: {folder}: {missing_captions} of {len(media)} media file(s) have no {caption_ext} caption; "
            f"they use default_caption {default_caption!r}")
    if not items:
        raise DatasetError(folder, f"no usable media left after skipping {skipped} bad file(s); fix or replace them")
    return items


def items_from_tensors(
    images: torch.Tensor,
    captions: list[str] | str,
    as_video: bool,
    trigger_word: str | None = None,
    *,
    resolution: list[int] | None = None,
    caption_dropout_rate: float = 0.0,
    num_repeats: int = 1,
    source: str = "tensors",
) -> list[MediaItem]:
    """MediaItems from a ComfyUI IMAGE batch: float ``[B, H, W, 3]`` in 0..1.

    `captions`: one string per image, or one string for all. ``as_video=True`` makes one clip of B frames
    (one caption). `resolution=None` trains at the images' own size (rounded down to the model's factor):
    generated images usually already have the size they should train at.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DatasetError(source, f"expected an IMAGE batch of shape [B, H, W, 3], got {shape}")
    if not images.is_floating_point():
        raise DatasetError(source, f"expected float pixels in 0..1, got dtype {images.dtype}")
    count, height, width = images.shape[:3]
    if count == 0:
        raise DatasetError(source, "the IMAGE batch is empty")
    if isinstance(captions, str):
        captions = [captions] * (1 if as_video else count)
    captions = [str(c) for c in captions]
    if as_video:
        if len(set(captions)) != 1:
            raise DatasetError(source, f"a clip has one caption, got {len(captions)} different ones; pass one string")
    elif len(captions) != count:
        raise DatasetError(source, f"got {len(captions)} captions for {count} images; pass one per image or one string")
    images = images.detach().to("cpu", torch.float32).clamp(0, 1)
    common = dict(
        width=width, height=height, source=source,
        resolutions=tuple(resolution) if resolution else (None,),
        caption_dropout_rate=float(caption_dropout_rate), num_repeats=int(num_repeats),
    )
    if as_video:
        caption = apply_trigger(captions[0], trigger_word)
        return [MediaItem(kind="video", caption=caption, pixels=images, frame_count=count, num_frames=count,
                          extra={"index": 0}, **common)]
    return [
        MediaItem(kind="image", caption=apply_trigger(captions[i], trigger_word), pixels=images[i : i + 1],
                  extra={"index": i}, **common)
        for i in range(count)
    ]


def _to_unit_range(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float().div_(127.5).sub_(1.0)


def load_image_rgb(path: Path) -> np.ndarray:
    """Decode an image file upright (EXIF rotation applied) as uint8 [H, W, 3]."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(path, f"the image cannot be decoded ({exc}); re-save it or remove it") from exc


def load_pixels(item: MediaItem, frame_indices: list[int], buckets: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The item's frames at `frame_indices`, resized and center-cropped into each bucket.

    Returns one float tensor ``[3, F, bucket_h, bucket_w]`` in [-1, 1] per bucket. The source is decoded
    once for all buckets, and video frames are resized as they are decoded, so a long clip at full size is
    never held in memory.
    """
    per_bucket: list[list[torch.Tensor]] = [[] for _ in buckets]

    def take(frame: torch.Tensor) -> None:
        for out, bucket in zip(per_bucket, buckets):
            out.append(resize_and_crop(frame, bucket)[0])

    if item.pixels is not None:
        for index in frame_indices:
            take(item.pixels[index].permute(2, 0, 1)[None] * 2.0 - 1.0)
    elif item.kind == "image":
        take(_to_unit_range(load_image_rgb(item.path)))
    else:
        if list(frame_indices) != sorted(set(frame_indices)):
            raise ValueError("frame indices must be distinct and ascending")
        for _, rgb in read_frames(item.path, frame_indices, item.frame_sampling, item.video_info):
            take(_to_unit_range(rgb))
    return [torch.stack(frames, dim=1) for frames in per_bucket]

"""Reading evenly spaced frames from a video with PyAV.

`num_frames` frames are taken at ``round(linspace(0, n - 1, num_frames))`` (NumPy rounding, half to even).
Two ways to get them, neither decoding any part of the file more than once:

- ``decode``: one sequential pass from the start, converting to RGB only the selected frames and stopping
  after the last one. Cost: every frame up to the last selected one is decoded.
- ``seek``: for each selected frame, seek to the keyframe at or before it and decode forward to it; when
  the next selected frame lies in the GOP being decoded already, keep decoding instead of seeking. Cost:
  about half a keyframe interval of decoding per selected frame, plus the seeks.

``auto`` picks ``seek`` when the average gap between selected frames is at least `SEEK_GAP_RATIO` keyframe
intervals, else ``decode``. The keyframe interval comes from the demuxer's packet keyframe flags, read once
at probe time: demuxing reads the file but decodes nothing, so it is cheap next to decoding.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from trainer.errors import DatasetError

STRATEGIES = ("auto", "decode", "seek")
# With a gap of g frames between selected frames and keyframes every K frames, seeking decodes about
# K/2 + 1 frames per selected frame where the sequential pass decodes g; at g = 2K that is 4x fewer. The
# margin pays for the seeks and for the frame threads that only the uninterrupted sequential pass uses
# well on many-core machines. Measured with benchmark_sampling (numbers in the data pipeline report).
SEEK_GAP_RATIO = 2.0


@dataclass(frozen=True)
class VideoInfo:
    """What a demux pass (no decoding) says about a video's first video stream."""

    width: int
    height: int
    frame_count: int
    # Presentation timestamps of every frame in presentation order, and of the keyframes; None when the
    # container gives no timestamps (then only the sequential strategy can be used).
    frame_pts: tuple[int, ...] | None
    keyframe_pts: tuple[int, ...]
    # Counter-clockwise degrees the frames must be turned for display (phone videos carry a display matrix);
    # width and height above are the displayed ones.
    rotation: int = 0

    @property
    def keyframe_count(self) -> int:
        return max(1, len(self.keyframe_pts))

    @property
    def keyframe_interval(self) -> float:
        """Average number of frames per keyframe (GOP length)."""
        return self.frame_count / self.keyframe_count


def _open(path: Path):
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc  # FFmpeg's own message repeats the path
        raise DatasetError(path, f"cannot open this video ({reason}); it may be corrupt or not a video file") from exc


def probe_video(path: str | Path) -> VideoInfo:
    """Demux the whole file (no decoding) and decode its first frame to prove the codec works.

    Raises DatasetError naming the file when it is not a readable video.
    """
    path = Path(path)
    container = _open(path)
    try:
        if not container.streams.video:
            raise DatasetError(path, "the file has no readable video stream (truncated, or not a video); "
                                     "re-export it or remove it")
        stream = container.streams.video[0]
        pts_values: list[int] = []
        keyframes: list[int] = []
        count = 0
        has_pts = True
        try:
            for packet in container.demux(stream):
                # Empty packets flush the demuxer; discarded ones are dropped by the decoder (edit lists).
                if packet.size == 0 or packet.is_discard:
                    continue
                count += 1
                if packet.pts is None:
                    has_pts = False
                    continue
                pts_values.append(packet.pts)
                if packet.is_keyframe:
                    keyframes.append(packet.pts)
            container.seek(0, stream=stream, backward=True)
            first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise DatasetError(path, f"the video cannot be read ({exc}); it may be truncated or corrupt") from exc
        if count == 0 or first is None:
            raise DatasetError(path, "the video has no decodable frames")
        width, height = first.width, first.height
        rotation = _quarter_turns(getattr(first, "rotation", 0)) * 90
        if rotation in (90, 270):
            width, height = height, width
    finally:
        container.close()
    frame_pts = tuple(sorted(pts_values)) if has_pts and len(set(pts_values)) == count else None
    return VideoInfo(width, height, count, frame_pts, tuple(sorted(keyframes)), rotation)


def sample_indices(frame_count: int, num_frames: int) -> list[int]:
    """Evenly spaced frame indices ``round(linspace(0, frame_count - 1, num_frames))``."""
    if num_frames < 1:
        raise ValueError("num_frames must be at least 1")
    if frame_count < num_frames:
        raise ValueError(f"the clip has {frame_count} frames, fewer than the {num_frames} asked for")
    return [int(i) for i in np.round(np.linspace(0, frame_count - 1, num_frames))]


def choose_strategy(info: VideoInfo, indices: list[int], strategy: str = "auto") -> str:
    """'decode' or 'seek' for reading `indices` of a video described by `info`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"frame_sampling must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if info.frame_pts is None:
        return "decode"  # seeking needs timestamps
    if strategy != "auto":
        return strategy
    if len(indices) < 2:
        # One frame: seeking is right unless it is inside the first GOP.
        return "seek" if indices and indices[0] >= info.keyframe_interval else "decode"
    average_gap = (indices[-1] - indices[0]) / (len(indices) - 1)
    return "seek" if average_gap >= SEEK_GAP_RATIO * info.keyframe_interval else "decode"


def _quarter_turns(degrees) -> int:
    """Counter-clockwise quarter turns (0..3) nearest to `degrees`."""
    return int(round((degrees or 0) / 90)) % 4


def _to_rgb(frame, rotation: int = 0) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(rotation)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _decode_pass(path: Path, indices: list[int], stats: dict, rotation: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    wanted = sorted(set(indices))
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: the sequential pass is where they pay most
        position = 0
        for index, frame in enumerate(container.decode(stream)):
            stats["decoded"] += 1
            if index == wanted[position]:
                yield index, _to_rgb(frame, rotation)
                position += 1
                if position == len(wanted):
                    return
    except av.FFmpegError as exc:
        raise DatasetError(path, f"decoding failed ({exc}); the file may be corrupt") from exc
    finally:
        container.close()
    raise DatasetError(
        path,
        f"the video decoded to fewer frames than its container lists (needed frame {wanted[position]}); "
        "re-encode it (for example with ffmpeg -i in.mp4 out.mp4)",
    )


def _seek_pass(path: Path, info: VideoInfo, indices: list[int], stats: dict) -> Iterator[tuple[int, np.ndarray]]:
    wanted = sorted(set(indices))
    keyframes = info.keyframe_pts
    container = _open(path)
    try:
        stream = container.streams.video[0]
        frames = None          # the running decode iterator, positioned after `current_pts`
        current_pts = None     # pts of the last frame decoded
        for index in wanted:
            target = info.frame_pts[index]
            k = bisect.bisect_right(keyframes, target) - 1
            keyframe = keyframes[k] if k >= 0 else info.frame_pts[0]
            # Keep decoding forward when the target's GOP is the one being decoded (or a later frame of it).
            if frames is None or current_pts is None or current_pts >= target or current_pts < keyframe:
                container.seek(keyframe, stream=stream, backward=True, any_frame=False)
                stats["seeks"] += 1
                frames = container.decode(stream)
                current_pts = None
            for frame in frames:
                stats["decoded"] += 1
                if frame.pts is None:
                    raise _NoTimestamps()
                current_pts = frame.pts
                if frame.pts >= target:
                    break
            else:
                raise DatasetError(path, f"frame {index} could not be reached by seeking; the file may be truncated")
            if current_pts != target:
                # The seek landed after the target (bad index in the file): let the caller fall back.
                raise _NoTimestamps()
            yield index, _to_rgb(frame, info.rotation)
    except av.FFmpegError as exc:
        raise DatasetError(path, f"decoding failed ({exc}); the file may be corrupt") from exc
    finally:
        container.close()


class _NoTimestamps(Exception):
    """Seeking cannot address frames in this file; the sequential pass is used instead."""


def read_frames(
    path: str | Path,
    indices: list[int],
    strategy: str = "auto",
    info: VideoInfo | None = None,
    stats: dict | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(index, rgb uint8 [H, W, 3])`` for each distinct index in ascending order, turned upright.

    `strategy` is 'auto', 'decode' or 'seek'; `info` is `probe_video`'s result (probed when None). `stats`,
    if given, receives the strategy used and counts of decoded frames and seeks.
    """
    path = Path(path)
    if not indices:
        return
    info = info or probe_video(path)
    chosen = choose_strategy(info, indices, strategy)
    stats = stats if stats is not None else {}
    stats.update(strategy=chosen, decoded=0, seeks=0)
    if chosen == "decode":
        yield from _decode_pass(path, indices, stats, info.rotation)
        return
    done: set[int] = set()
    try:
        for index, rgb in _seek_pass(path, info, indices, stats):
            done.add(index)
            yield index, rgb
    except _NoTimestamps:
        stats["strategy"] = "decode (seek fell back)"
        remaining = [i for i in indices if i not in done]
        yield from _decode_pass(path, remaining, stats, info.rotation)


def benchmark_sampling(path: str | Path, num_frames: int, repeats: int = 3) -> dict:
    """Time both strategies reading `num_frames` evenly spaced frames of `path` (best of `repeats` runs).

    Returns the video's facts, what `auto` would pick, and per strategy: seconds, selected frames per second,
    frames decoded and seeks made; `same_frames` says whether both returned identical pixels.
    """
    path = Path(path)
    started = time.perf_counter()
    info = probe_video(path)
    probe_seconds = time.perf_counter() - started
    indices = sample_indices(info.frame_count, num_frames)
    result = {
        "path": str(path),
        "width": info.width,
        "height": info.height,
        "frames_total": info.frame_count,
        "num_frames": num_frames,
        "keyframe_interval": round(info.keyframe_interval, 2),
        "average_gap": round((indices[-1] - indices[0]) / max(1, len(indices) - 1), 2),
        "auto_choice": choose_strategy(info, indices, "auto"),
        "probe_seconds": round(probe_seconds, 4),
    }
    outputs = {}
    for strategy in ("decode", "seek"):
        best = None
        for _ in range(max(1, repeats)):
            stats: dict = {}
            started = time.perf_counter()
            frames = list(read_frames(path, indices, strategy, info, stats))
            seconds = time.perf_counter() - started
            if best is None or seconds < best[0]:
                best = (seconds, stats)
        outputs[strategy] = frames
        seconds, stats = best
        result[strategy] = {
            "seconds": round(seconds, 4),
            "frames_per_s": round(len(frames) / seconds, 1) if seconds > 0 else None,
            "decoded_frames": stats["decoded"],
            "seeks": stats["seeks"],
        }
    result["same_frames"] = len(outputs["decode"]) == len(outputs["seek"]) and all(
        a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(outputs["decode"], outputs["seek"])
    )
    return result

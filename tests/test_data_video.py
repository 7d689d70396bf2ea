"""Frame sampling on real encoded videos: the right frames, both strategies, every container."""

from __future__ import annotations

import numpy as np
import pytest

from tests.media import frame_index_of, index_frame, keyframe_indices, textured_frames, write_video
from trainer.data.video import (
    VideoInfo,
    benchmark_sampling,
    choose_strategy,
    probe_video,
    read_frames,
    sample_indices,
)
from trainer.errors import DatasetError


def test_sample_indices_are_rounded_linspace():
    assert sample_indices(10, 1) == [0]
    assert sample_indices(10, 10) == list(range(10))
    assert sample_indices(100, 5) == [0, 25, 50, 74, 99]          # 24.75 -> 25, 49.5 -> 50 (half to even), 74.25
    assert sample_indices(33, 33) == list(range(33))
    for n, k in [(81, 33), (500, 17), (34, 33)]:
        indices = sample_indices(n, k)
        assert indices == [int(i) for i in np.round(np.linspace(0, n - 1, k))]
        assert len(set(indices)) == k and indices[0] == 0 and indices[-1] == n - 1
    with pytest.raises(ValueError):
        sample_indices(4, 5)


def test_index_frames_survive_encoding(tmp_path):
    path = write_video(tmp_path / "ids.mp4", num_frames=70, gop=10)
    frames = [rgb for _, rgb in read_frames(path, list(range(70)), "decode")]
    assert [frame_index_of(f) for f in frames] == list(range(70))
    # For index < 32 the frame is (close to) solid gray 8*index + 4 in its top half.
    assert abs(frames[5][:10].mean() - 44) < 3


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mov", ".mkv"])
@pytest.mark.parametrize("gop", [4, 100])
def test_both_strategies_return_the_right_frames(tmp_path, suffix, gop):
    path = write_video(tmp_path / f"clip{suffix}", num_frames=45, width=48, height=32, gop=gop)
    info = probe_video(path)
    assert info.frame_count == 45 and (info.width, info.height) == (48, 32)
    assert keyframe_indices(path) == list(range(0, 45, gop))
    assert info.keyframe_count == len(range(0, 45, gop))
    indices = sample_indices(45, 9)
    results = {}
    for strategy in ("decode", "seek", "auto"):
        stats = {}
        got = list(read_frames(path, indices, strategy, info, stats))
        assert [i for i, _ in got] == indices
        assert [frame_index_of(rgb) for _, rgb in got] == indices, strategy
        assert all(rgb.shape == (32, 48, 3) and rgb.dtype == np.uint8 for _, rgb in got)
        results[strategy] = (got, stats)
    # Both strategies decode the same frames bit for bit.
    for (_, a), (_, b) in zip(results["decode"][0], results["seek"][0]):
        assert np.array_equal(a, b)
    decode_stats, seek_stats = results["decode"][1], results["seek"][1]
    assert decode_stats["strategy"] == "decode" and decode_stats["decoded"] == 45 and decode_stats["seeks"] == 0
    assert seek_stats["strategy"] == "seek" and seek_stats["seeks"] >= 1
    if gop == 4:
        # Gap 5.5 frames > keyframe interval 4: seeking skips frames instead of decoding them all.
        assert seek_stats["decoded"] < 45


def test_decode_stops_after_the_last_needed_frame(tmp_path):
    path = write_video(tmp_path / "long.mp4", num_frames=40, gop=8)
    stats = {}
    got = list(read_frames(path, [3, 10], "decode", stats=stats))
    assert [frame_index_of(rgb) for _, rgb in got] == [3, 10]
    assert stats["decoded"] == 11


def test_seek_keeps_decoding_within_a_gop(tmp_path):
    path = write_video(tmp_path / "gop.mp4", num_frames=40, gop=20)
    stats = {}
    got = list(read_frames(path, [2, 5, 25, 26], "seek", stats=stats))
    assert [frame_index_of(rgb) for _, rgb in got] == [2, 5, 25, 26]
    assert stats["seeks"] == 2          # one per GOP visited
    assert stats["decoded"] == 6 + 7    # 0..5, then 20..26


def _info(frames, keyframe_every):
    pts = tuple(range(frames))
    return VideoInfo(64, 48, frames, pts, tuple(range(0, frames, keyframe_every)))


def test_auto_choice_follows_gap_versus_keyframe_spacing():
    sparse_pick = sample_indices(300, 5)    # gap ~75 frames
    dense_pick = sample_indices(300, 81)    # gap ~3.7 frames
    assert choose_strategy(_info(300, 12), sparse_pick) == "seek"
    assert choose_strategy(_info(300, 12), dense_pick) == "decode"
    assert choose_strategy(_info(300, 250), sparse_pick) == "decode"   # one or two keyframes: seeking cannot skip
    assert choose_strategy(_info(300, 12), dense_pick, "seek") == "seek"
    no_pts = VideoInfo(64, 48, 300, None, ())
    assert choose_strategy(no_pts, sparse_pick, "seek") == "decode"
    with pytest.raises(ValueError):
        choose_strategy(_info(300, 12), sparse_pick, "fast")


def test_auto_on_real_files(tmp_path):
    dense = write_video(tmp_path / "dense.mp4", num_frames=120, width=32, height=32, gop=6)
    sparse = write_video(tmp_path / "sparse.mp4", num_frames=120, width=32, height=32, gop=120)
    indices = sample_indices(120, 5)
    stats_dense, stats_sparse = {}, {}
    assert [frame_index_of(f) for _, f in read_frames(dense, indices, "auto", stats=stats_dense)] == indices
    assert [frame_index_of(f) for _, f in read_frames(sparse, indices, "auto", stats=stats_sparse)] == indices
    assert stats_dense["strategy"] == "seek" and stats_dense["decoded"] < 40
    assert stats_sparse["strategy"] == "decode"


def test_benchmark_sampling_reports_both(tmp_path):
    path = write_video(tmp_path / "bench.mp4", textured_frames(48, 64, 48), width=64, height=48, gop=4)
    result = benchmark_sampling(path, 5, repeats=1)
    assert result["frames_total"] == 48 and result["keyframe_interval"] == 4
    assert result["same_frames"] is True
    for strategy in ("decode", "seek"):
        assert result[strategy]["seconds"] > 0 and result[strategy]["frames_per_s"] > 0
    assert result["decode"]["decoded_frames"] == 48
    assert result["seek"]["decoded_frames"] < 48
    assert result["auto_choice"] == "seek"


def test_corrupt_and_non_video_files_name_the_file(tmp_path):
    good = write_video(tmp_path / "good.mp4", num_frames=30, gop=5)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video")
    for path in (truncated, text):
        with pytest.raises(DatasetError) as info:
            probe_video(path)
        assert info.value.path == str(path)


def test_frame_content_matches_the_source_pixels(tmp_path):
    # Not only the index: the decoded picture is the encoded one (up to lossy coding).
    path = write_video(tmp_path / "px.mkv", num_frames=9, width=32, height=32, gop=4, crf=0)
    (index, rgb), = list(read_frames(path, [6], "seek"))
    assert index == 6 and np.abs(rgb.astype(int) - index_frame(6, 32, 32)).mean() < 2


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_display_rotation_is_applied(tmp_path, suffix):
    # A phone-style portrait clip: stored 64x48 landscape, display matrix says turn 90 degrees clockwise.
    path = write_video(tmp_path / f"phone{suffix}", num_frames=9, width=64, height=48, gop=4, rotation=-90)
    info = probe_video(path)
    assert info.rotation == 270 and (info.width, info.height) == (48, 64)
    for strategy in ("decode", "seek"):
        frames = list(read_frames(path, [0, 4, 8], strategy, info))
        for index, rgb in frames:
            assert rgb.shape == (64, 48, 3)
            expected = np.rot90(index_frame(index, 64, 48), -1)     # the stored frame turned clockwise
            assert np.abs(rgb.astype(int) - expected).mean() < 3
            assert frame_index_of(np.rot90(rgb, 1)) == index

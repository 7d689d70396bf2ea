"""Folder validation (every error names the file or field), skip mode, and the in-memory tensor source."""

from __future__ import annotations

import pytest
import torch

from tests.media import FakeImageFamily, FakeVideoFamily, frame_index_of, write_caption, write_image, write_video
from trainer.data.sources import items_from_tensors, load_pixels
from trainer.data.training_set import scan_datasets
from trainer.errors import DatasetError, JobError
from trainer.job import DatasetConfig


def quiet(_line):
    pass


def scan(folder, family=None, **settings):
    return scan_datasets([DatasetConfig(folder_path=str(folder), **settings)], family or FakeVideoFamily(), log=quiet)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DatasetError) as info:
        scan(tmp_path / "nope")
    assert info.value.path == str(tmp_path / "nope") and "does not exist" in str(info.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("captions only")
    with pytest.raises(DatasetError) as info:
        scan(tmp_path / "empty")
    assert info.value.path == str(tmp_path / "empty") and "no images" in str(info.value)
    file_path = write_image(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="not a folder"):
        scan(file_path)


def _bad_files(folder):
    """name -> writer of a file that must be rejected."""
    good_video = write_video(folder / "_good.mp4", num_frames=12, gop=4)
    data = good_video.read_bytes()
    good_video.unlink()
    good_png = write_image(folder / "_good.png", 32, 32)
    png = good_png.read_bytes()
    good_png.unlink()
    corrupt_png = bytearray(png)
    corrupt_png[60:80] = b"\x00" * 20  # inside the IDAT chunk: checksum fails
    return {
        "empty.png": b"",
        "corrupt.png": bytes(corrupt_png),
        "notes.jpg": b"these are words, not a JPEG",
        "half.mp4": data[: len(data) // 3],
        "words.webm": b"not a video at all" * 10,
        "empty.mkv": b"",
    }


@pytest.mark.parametrize("name", ["empty.png", "corrupt.png", "notes.jpg", "half.mp4", "words.webm", "empty.mkv"])
def test_bad_file_is_an_error_naming_it(tmp_path, name):
    write_image(tmp_path / "fine.png")
    (tmp_path / name).write_bytes(_bad_files(tmp_path)[name])
    with pytest.raises(DatasetError) as info:
        scan(tmp_path)
    assert info.value.path == str(tmp_path / name)


def test_skip_mode_warns_and_keeps_the_good_files(tmp_path):
    write_image(tmp_path / "fine.png")
    write_video(tmp_path / "fine.mp4", num_frames=12, gop=4)
    for name, content in _bad_files(tmp_path).items():
        (tmp_path / name).write_bytes(content)
    write_video(tmp_path / "short.mp4", num_frames=3, gop=4)
    lines = []
    items = scan_datasets([DatasetConfig(folder_path=str(tmp_path), num_frames=9, on_bad_file="skip")],
                          FakeVideoFamily(), log=lines.append)
    assert sorted(i.path.name for i in items) == ["fine.mp4", "fine.png"]
    warnings = [line for line in lines if line.startswith("warning: skipping")]
    assert len(warnings) == 7
    for name in [*_bad_files(tmp_path), "short.mp4"]:
        assert sum(name in line for line in warnings) == 1


def test_skip_mode_with_nothing_left_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.mp4").write_bytes(b"junk")
    with pytest.raises(DatasetError) as info:
        scan(tmp_path, on_bad_file="skip")
    assert info.value.path == str(tmp_path) and "no usable media" in str(info.value)


def test_video_shorter_than_num_frames(tmp_path):
    write_video(tmp_path / "short.mov", num_frames=7, gop=4)
    with pytest.raises(DatasetError) as info:
        scan(tmp_path, num_frames=9)
    assert info.value.path == str(tmp_path / "short.mov")
    assert "7 frames" in str(info.value) and "num_frames=9" in str(info.value)
    assert len(scan(tmp_path, num_frames=5)) == 1


def test_video_in_an_image_family_names_the_file(tmp_path):
    write_image(tmp_path / "a.png")
    write_video(tmp_path / "b.webm", num_frames=5, gop=4)
    with pytest.raises(DatasetError) as info:
        scan(tmp_path, FakeImageFamily())
    assert info.value.path == str(tmp_path / "b.webm") and "still images" in str(info.value)


def test_image_smaller_than_the_factor(tmp_path):
    write_image(tmp_path / "tiny.png", 6, 40)
    with pytest.raises(DatasetError) as info:
        scan(tmp_path)
    assert info.value.path == str(tmp_path / "tiny.png") and "6x40" in str(info.value)


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"num_frames": 8}, "datasets[0].num_frames"),
        ({"num_frames": 0}, "datasets[0].num_frames"),
        ({"resolution": [4]}, "datasets[0].resolution"),
        ({"caption_dropout_rate": 1.5}, "datasets[0].caption_dropout_rate"),
        ({"num_repeats": 0}, "datasets[0].num_repeats"),
        ({"on_bad_file": "ignore"}, "datasets[0].on_bad_file"),
        ({"frame_sampling": "fast"}, "datasets[0].frame_sampling"),
    ],
)
def test_settings_errors_name_the_field(tmp_path, settings, field):
    write_image(tmp_path / "a.png")
    with pytest.raises(JobError) as info:
        scan(tmp_path, **settings)
    assert info.value.field == field


def test_num_frames_rule_of_the_family(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(JobError) as info:
        scan(tmp_path, FakeImageFamily(), num_frames=5)       # image family: 1 only
    assert info.value.field == "datasets[0].num_frames" and "still images" in str(info.value)
    with pytest.raises(JobError) as info:
        scan(tmp_path, FakeVideoFamily(), num_frames=6)
    assert "4k+1" in str(info.value)
    # The second dataset's error names the second dataset.
    (tmp_path / "two").mkdir()
    write_image(tmp_path / "two" / "b.png")
    with pytest.raises(JobError) as info:
        scan_datasets([DatasetConfig(folder_path=str(tmp_path), num_frames=5),
                       DatasetConfig(folder_path=str(tmp_path / "two"), num_frames=4)], FakeVideoFamily(), log=quiet)
    assert info.value.field == "datasets[1].num_frames"


def test_images_are_one_frame_clips_in_a_video_family(tmp_path):
    write_caption(write_image(tmp_path / "a.png", 64, 48), "still")
    write_caption(write_video(tmp_path / "b.mp4", num_frames=20, gop=4), "moving")
    items = scan(tmp_path, num_frames=9)
    by_name = {i.path.name: i for i in items}
    assert by_name["a.png"].kind == "image" and by_name["a.png"].num_frames == 1
    assert by_name["b.mp4"].kind == "video" and by_name["b.mp4"].num_frames == 9
    assert by_name["b.mp4"].frame_count == 20
    clip = load_pixels(by_name["b.mp4"], [0, 2, 5, 7, 10, 12, 14, 17, 19], [(64, 48)])[0]
    assert clip.shape == (3, 9, 48, 64)
    # Pixels in [-1, 1] back to 0..255 still carry the frame indices.
    frames = ((clip.permute(1, 2, 3, 0) + 1) * 127.5).numpy()
    assert [frame_index_of(f) for f in frames] == [0, 2, 5, 7, 10, 12, 14, 17, 19]


# ---- in-memory ComfyUI IMAGE batches ----

def _comfy_batch(count, height=40, width=56):
    """[B, H, W, 3] in 0..1 where image b is a flat gray of level b / 10."""
    return torch.arange(count, dtype=torch.float32).div(10).view(count, 1, 1, 1).expand(count, height, width, 3).clone()


def test_tensor_images_one_caption_each():
    images = _comfy_batch(3)
    items = items_from_tensors(images, ["a [trigger]", "b", "ohwx c"], as_video=False, trigger_word="ohwx")
    assert [i.kind for i in items] == ["image"] * 3
    assert [i.caption for i in items] == ["a ohwx", "ohwx, b", "ohwx c"]
    assert all((i.width, i.height) == (56, 40) and i.path is None for i in items)
    (pixels,) = load_pixels(items[2], [0], [(56, 40)])
    assert pixels.shape == (3, 1, 40, 56)
    assert torch.allclose(pixels, torch.full_like(pixels, 0.2 * 2 - 1))


def test_tensor_clip_and_shared_caption():
    images = _comfy_batch(5)
    (clip,) = items_from_tensors(images, "a clip", as_video=True)
    assert clip.kind == "video" and clip.num_frames == 5 and clip.caption == "a clip"
    (pixels,) = load_pixels(clip, list(range(5)), [(48, 40)])
    assert pixels.shape == (3, 5, 40, 48)
    assert torch.allclose(pixels.mean(dim=(0, 2, 3)), torch.arange(5) / 10 * 2 - 1, atol=1e-5)
    items = items_from_tensors(images, "same for all", as_video=False)
    assert [i.caption for i in items] == ["same for all"] * 5


def test_tensor_source_errors():
    with pytest.raises(DatasetError, match=r"\[B, H, W, 3\]"):
        items_from_tensors(torch.zeros(2, 3, 32, 32), "x", as_video=False)
    with pytest.raises(DatasetError, match="2 captions for 3 images"):
        items_from_tensors(_comfy_batch(3), ["a", "b"], as_video=False)
    with pytest.raises(DatasetError, match="one caption"):
        items_from_tensors(_comfy_batch(3), ["a", "b", "c"], as_video=True)
    # A clip whose length breaks the family's frame rule is named in the error.
    (clip,) = items_from_tensors(_comfy_batch(4), "x", as_video=True)
    with pytest.raises(DatasetError, match="4k\\+1"):
        scan_datasets([clip], FakeVideoFamily(), log=quiet)
    with pytest.raises(DatasetError, match="still images"):
        scan_datasets([clip], FakeImageFamily(), log=quiet)

"""TrainingSet: encoding once, the disk cache, distinct captions, deterministic batches, collate, summary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.media import (
    FakeImageFamily,
    FakeVideoFamily,
    caption_vector,
    frame_index_of,
    write_caption,
    write_image,
    write_video,
)
from trainer.data import TrainingSet, items_from_tensors
from trainer.data.sources import CACHE_DIRNAME, load_pixels
from trainer.job import DatasetConfig


def quiet(_line):
    pass


def _folder(tmp_path, name="set"):
    folder = tmp_path / name
    write_caption(write_image(folder / "a.png", 96, 64, seed=1), "red [trigger]")
    write_caption(write_image(folder / "b.jpg", 64, 96, seed=2), "blue")
    write_caption(write_image(folder / "c.webp", 64, 64, seed=3), "blue")
    write_caption(write_video(folder / "d.mp4", num_frames=24, width=64, height=48, gop=4), "moving")
    return folder


def _cfg(folder, **settings):
    return DatasetConfig(folder_path=str(folder), **{"trigger_word": "ohwx", **settings})


def test_build_encodes_each_sample_once_and_each_caption_once(tmp_path):
    folder = _folder(tmp_path)
    family = FakeVideoFamily()
    ts = TrainingSet.build([_cfg(folder, resolution=[32, 48], num_frames=5, caption_dropout_rate=0.1)], family,
                           seed=0, log=quiet)
    assert len(ts) == 8                       # 4 media x 2 resolutions
    assert len(family.pixel_calls) == 8 and all(shape[0] == 1 for shape in family.pixel_calls)
    encoded = [c for call in family.prompt_calls for c in call]
    assert sorted(encoded) == sorted(["red ohwx", "ohwx, blue", "ohwx, moving", ""])   # distinct, plus dropout's ""
    assert len(encoded) == len(set(encoded))
    for sample in ts.samples:
        width, height = sample.bucket
        frames = 5 if sample.item.kind == "video" else 1
        assert sample.latent.shape == (3, frames, height // 8, width // 8)
        assert sample.latent.device.type == "cpu"
    # The cached latent is exactly the family's encoding of the loaded pixels.
    video = next(s for s in ts.samples if s.item.kind == "video")
    assert video.frame_indices == (0, 6, 12, 17, 23)
    (pixels,) = load_pixels(video.item, list(video.frame_indices), [video.bucket])
    assert torch.allclose(video.latent, F.avg_pool3d(pixels, (1, 8, 8)))
    frames = ((pixels.permute(1, 2, 3, 0) + 1) * 127.5).numpy()
    assert [frame_index_of(f) for f in frames] == [0, 6, 12, 17, 23]


def test_no_empty_caption_without_dropout(tmp_path):
    family = FakeImageFamily()
    folder = tmp_path / "imgs"
    write_caption(write_image(folder / "a.png"), "x")
    TrainingSet.build([DatasetConfig(folder_path=str(folder), resolution=[32])], family, seed=0, log=quiet)
    assert [c for call in family.prompt_calls for c in call] == ["x"]


def test_disk_cache_hit_skips_the_encoder(tmp_path):
    folder = _folder(tmp_path)
    cfg = _cfg(folder, resolution=[32], num_frames=5, cache_latents_to_disk=True)
    first = FakeVideoFamily()
    ts1 = TrainingSet.build([cfg], first, seed=0, log=quiet)
    assert len(first.pixel_calls) == 4
    cache = folder / CACHE_DIRNAME
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 4 and not list(cache.glob(".tmp-*"))

    second = FakeVideoFamily()
    lines = []
    ts2 = TrainingSet.build([cfg], second, seed=0, log=lines.append)
    assert second.pixel_calls == []
    assert any("4 from disk" in line for line in lines)
    for a, b in zip(ts1.samples, ts2.samples):
        assert torch.equal(a.latent, b.latent)

    # Changing one file's content re-encodes that file only.
    write_image(folder / "a.png", 96, 64, seed=99)
    third = FakeVideoFamily()
    TrainingSet.build([cfg], third, seed=0, log=quiet)
    assert len(third.pixel_calls) == 1


def test_cache_key_covers_every_setting_that_changes_the_latent(tmp_path):
    folder = _folder(tmp_path)
    base = dict(resolution=[32], num_frames=5, cache_latents_to_disk=True)
    TrainingSet.build([_cfg(folder, **base)], FakeVideoFamily(), seed=0, log=quiet)

    def misses(family=None, **changes):
        family = family or FakeVideoFamily()
        TrainingSet.build([_cfg(folder, **{**base, **changes})], family, seed=0, log=quiet)
        return len(family.pixel_calls)

    assert misses() == 0
    assert misses(trigger_word=None, caption_dropout_rate=0.5, num_repeats=3) == 0   # captions do not matter
    assert misses(frame_sampling="seek") == 0                                       # same frames either way
    assert misses(resolution=[48]) == 4                                             # bucket size
    assert misses(num_frames=9) == 1                                                # the clip's frames
    assert misses(FakeVideoFamily(identity="other vae")) == 4                       # family.cache_identity()
    # Another family name with the same identity string is another cache.
    other = type("OtherFamily", (FakeVideoFamily,), {"name": "other"})()
    assert misses(other) == 4


def test_cache_dir_and_in_memory_items(tmp_path):
    images = torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(0))
    items = items_from_tensors(images, "generated", as_video=False, resolution=[32])
    family = FakeImageFamily()
    TrainingSet.build(items, family, seed=0, log=quiet, cache_dir=tmp_path / "cache")
    assert len(family.pixel_calls) == 3 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    again = FakeImageFamily()
    TrainingSet.build(items_from_tensors(images.clone(), "generated", as_video=False, resolution=[32]), again,
                      seed=0, log=quiet, cache_dir=tmp_path / "cache")
    assert again.pixel_calls == []
    # Without cache_dir, in-memory items are cached in memory only.
    before = set((tmp_path / "cache").iterdir())
    TrainingSet.build(items, FakeImageFamily(), seed=0, log=quiet)
    assert set((tmp_path / "cache").iterdir()) == before


def test_corrupt_cache_file_is_recomputed(tmp_path):
    folder = _folder(tmp_path)
    cfg = _cfg(folder, resolution=[32], num_frames=5, cache_latents_to_disk=True)
    TrainingSet.build([cfg], FakeVideoFamily(), seed=0, log=quiet)
    victim = sorted((folder / CACHE_DIRNAME).glob("*.safetensors"))[0]
    victim.write_bytes(b"garbage")
    family, lines = FakeVideoFamily(), []
    TrainingSet.build([cfg], family, seed=0, log=lines.append)
    assert len(family.pixel_calls) == 1
    assert any("unreadable cache file" in line for line in lines)


def test_mixed_folder_and_tensor_datasets_with_repeats(tmp_path):
    folder = _folder(tmp_path)
    clip = items_from_tensors(torch.rand(5, 32, 32, 3), "a generated clip", as_video=True, num_repeats=2)
    ts = TrainingSet.build([_cfg(folder, resolution=[32], num_frames=5, num_repeats=3), clip], FakeVideoFamily(),
                           seed=0, log=quiet)
    summary = ts.summary()
    assert summary == {
        "folders": [str(folder)],
        "images": 3,
        "videos": 2,
        "in_memory_items": 1,
        "samples": 5,
        "samples_per_epoch": 4 * 3 + 2,
        "buckets": {"24x40x1": 1, "32x32x1": 1, "32x32x5": 1, "40x24x1": 1, "40x24x5": 1},
        "distinct_captions": 4,
    }
    batches = ts.epoch_batches(0, 1, seed=5)
    counts = torch.bincount(torch.tensor([b[0] for b in batches]), minlength=len(ts)).tolist()
    assert counts == [3 if s.item.path is not None else 2 for s in ts.samples]


def test_epoch_batches_are_deterministic_and_grouped_by_shape(tmp_path):
    folder = tmp_path / "many"
    for i in range(7):
        write_image(folder / f"sq{i}.png", 64, 64, seed=i)
    for i in range(5):
        write_image(folder / f"wide{i}.png", 96, 48, seed=10 + i)
    ts = TrainingSet.build([DatasetConfig(folder_path=str(folder), resolution=[32], num_repeats=2)],
                           FakeImageFamily(), seed=0, log=quiet)
    batches = ts.epoch_batches(3, 4, seed=11)
    assert batches == ts.epoch_batches(3, 4, seed=11)
    assert batches != ts.epoch_batches(4, 4, seed=11)
    assert batches != ts.epoch_batches(3, 4, seed=12)
    flat = sorted(i for b in batches for i in b)
    assert flat == sorted(list(range(len(ts))) * 2)             # every sample, num_repeats times
    for batch in batches:
        assert len({tuple(ts.samples[i].latent.shape) for i in batch}) == 1
    sizes = sorted(len(b) for b in batches)
    assert sizes == sorted([4, 4, 4, 2, 4, 4, 2])               # 14 square -> 4+4+4+2, 10 wide -> 4+4+2
    orders = {tuple(map(tuple, ts.epoch_batches(e, 4, seed=11))) for e in range(6)}
    assert len(orders) == 6                                      # shuffled differently every epoch


def test_collate_stacks_and_drops_captions(tmp_path):
    folder = tmp_path / "c"
    for i in range(4):
        write_caption(write_image(folder / f"{i}.png", 64, 64, seed=i), f"caption {i}")
    ts = TrainingSet.build([DatasetConfig(folder_path=str(folder), resolution=[32], caption_dropout_rate=0.5)],
                           FakeImageFamily(), seed=0, log=quiet)
    batch = ts.collate([0, 1, 2, 3], torch.Generator().manual_seed(0))
    assert batch["latents"].shape == (4, 3, 1, 4, 4)
    assert batch["cond"]["prompt_embeds"].shape == (4, 2, 8)
    for row, caption in enumerate(batch["captions"]):
        assert caption in ("", f"caption {row}")
        assert torch.equal(batch["cond"]["prompt_embeds"][row], caption_vector(caption))
        assert torch.equal(batch["latents"][row], ts.samples[row].latent)
    # No generator: no dropout (the fixed-noise evaluation relies on it).
    for _ in range(20):
        assert ts.collate([0, 1, 2, 3], None)["captions"] == [f"caption {i}" for i in range(4)]
    # Same generator state, same drops; dropout rate observed over many draws.
    again = ts.collate([0, 1, 2, 3], torch.Generator().manual_seed(0))
    assert again["captions"] == batch["captions"]
    generator = torch.Generator().manual_seed(1)
    drops = sum(c == "" for _ in range(500) for c in ts.collate([0, 1, 2, 3], generator)["captions"])
    assert abs(drops / 2000 - 0.5) < 0.05


def test_each_resolution_is_its_own_sample(tmp_path):
    folder = tmp_path / "r"
    write_image(folder / "big.png", 128, 64)
    write_image(folder / "small.png", 40, 40)
    family = FakeImageFamily()
    ts = TrainingSet.build([DatasetConfig(folder_path=str(folder), resolution=[32, 64])], family, seed=0, log=quiet)
    buckets = [(s.item.path.name, s.resolution, s.bucket) for s in ts.samples]
    assert buckets == [("big.png", 32, (48, 24)), ("big.png", 64, (88, 48)),
                       ("small.png", 32, (32, 32)), ("small.png", 64, (40, 40))]   # never upscaled
    assert len(family.pixel_calls) == 4


def test_file_failing_to_decode_at_build_time(tmp_path, monkeypatch):
    # A file can pass the cheap scan and still fail to decode fully; error names it, or skip drops it.
    folder = _folder(tmp_path)
    import trainer.data.training_set as training_set
    from trainer.errors import DatasetError

    real = training_set.load_pixels

    def failing(item, indices, buckets):
        if item.path.name == "d.mp4":
            raise DatasetError(item.path, "decoding failed (simulated)")
        return real(item, indices, buckets)

    monkeypatch.setattr(training_set, "load_pixels", failing)
    with pytest.raises(DatasetError) as info:
        TrainingSet.build([_cfg(folder, resolution=[32], num_frames=5)], FakeVideoFamily(), seed=0, log=quiet)
    assert info.value.path == str(folder / "d.mp4")
    lines = []
    ts = TrainingSet.build([_cfg(folder, resolution=[32], num_frames=5, on_bad_file="skip")], FakeVideoFamily(),
                           seed=0, log=lines.append)
    assert sorted(s.item.path.name for s in ts.samples) == ["a.png", "b.jpg", "c.webp"]
    assert any(line.startswith("warning: skipping") and "d.mp4" in line for line in lines)

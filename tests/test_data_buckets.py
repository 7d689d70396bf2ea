"""Aspect-ratio buckets (never upscale) and the resize + center crop into them, on real image files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.media import FakeImageFamily, write_image
from trainer.data.buckets import bucket_size, cover_size, native_bucket, resize_and_crop
from trainer.data.sources import load_pixels, scan_folder
from trainer.job import DatasetConfig


@settings(max_examples=200, deadline=None)
@given(width=st.integers(16, 4000), height=st.integers(16, 4000), resolution=st.sampled_from([64, 256, 512, 768, 1024]),
       factor=st.sampled_from([8, 16, 32]))
def test_bucket_rules(width, height, resolution, factor):
    if min(width, height) < factor:
        with pytest.raises(ValueError):
            bucket_size(width, height, resolution, factor)
        return
    bucket_w, bucket_h = bucket_size(width, height, resolution, factor)
    assert bucket_w % factor == 0 and bucket_h % factor == 0
    assert factor <= bucket_w <= width and factor <= bucket_h <= height           # never upscale
    native = (width // factor * factor, height // factor * factor)
    ideal_w = round(resolution * math.sqrt(width / height) / factor) * factor
    ideal_h = round(resolution / math.sqrt(width / height) / factor) * factor
    if ideal_w < factor or ideal_h < factor:
        # Extreme aspect ratio: the short side is one step and the area stays about R*R (if that fits).
        steps = max(1, round(resolution**2 / factor**2))
        clamped = (factor, steps * factor) if ideal_w < factor else (steps * factor, factor)
        fits = clamped[0] <= width and clamped[1] <= height
        assert (bucket_w, bucket_h) == (clamped if fits else native)
    elif ideal_w <= width and ideal_h <= height:
        # Big enough source: area about R*R, aspect kept up to rounding to the factor.
        assert (bucket_w, bucket_h) == (ideal_w, ideal_h)
        assert abs(bucket_w * bucket_h - resolution**2) <= factor * (bucket_w + bucket_h) / 2 + factor**2
    else:
        # Small source: the largest multiple-of-factor size that fits it.
        assert (bucket_w, bucket_h) == native
    if min(bucket_w, bucket_h) >= 4 * factor:
        # Aspect kept: rounding each side by at most factor/2 moves the ratio only a little.
        assert abs(math.log((bucket_w / bucket_h) / (width / height))) < 0.3


def test_bucket_examples():
    assert bucket_size(1024, 1024, 512, 8) == (512, 512)
    assert bucket_size(1920, 1080, 512, 16) == (688, 384)       # 16:9 at about 512*512
    assert bucket_size(1080, 1920, 512, 16) == (384, 688)
    assert bucket_size(300, 200, 512, 8) == (296, 200)           # smaller than the bucket: fits the source
    assert bucket_size(300, 200, None, 16) == native_bucket(300, 200, 16) == (288, 192)


def test_crop_without_resize_is_exact_center():
    # Horizontal gradient: pixel value = column index. Bucket 20x20 of a 40x20 source needs no resize.
    source = torch.arange(40, dtype=torch.float32).expand(1, 3, 20, 40).clone()
    out = resize_and_crop(source, (20, 20))
    assert out.shape == (1, 3, 20, 20)
    assert torch.equal(out, source[..., 10:30])


def test_resize_covers_then_center_crops():
    rng = np.random.default_rng(0)
    source = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 60, 100)).astype(np.float32))
    bucket = (48, 48)
    new_w, new_h = cover_size(100, 60, bucket)
    assert (new_w, new_h) == (80, 48)
    expected = F.interpolate(source, size=(48, 80), mode="bicubic", antialias=True, align_corners=False)
    expected = expected.clamp(source.min(), source.max())[..., :, 16:64]
    assert torch.allclose(resize_and_crop(source, bucket), expected)


def test_resize_refuses_to_upscale():
    with pytest.raises(ValueError, match="no upscaling"):
        resize_and_crop(torch.zeros(1, 3, 32, 32), (40, 32))


def _marker_image(width, height, band):
    """Gray background, a white 16x16 square in the center, red left band and blue right band."""
    array = np.full((height, width, 3), 128, np.uint8)
    cy, cx = height // 2, width // 2
    array[cy - 8 : cy + 8, cx - 8 : cx + 8] = 255
    array[:, :band] = (255, 0, 0)
    array[:, -band:] = (0, 0, 255)
    return array


def test_real_image_is_center_cropped_into_its_bucket(tmp_path):
    # 100x64 at resolution 32, factor 16: the bucket rounds to 32x32, so the source is resized to 50x32
    # and 9 columns are cut on each side: the 8-pixel (4 after resizing) colored bands must vanish.
    path = write_image(tmp_path / "wide.png", array=_marker_image(100, 64, band=8))
    item = scan_folder(DatasetConfig(folder_path=str(tmp_path), resolution=[32]), FakeImageFamily(),
                       log=lambda _: None)[0]
    bucket = bucket_size(item.width, item.height, 32, 16)
    assert bucket == (32, 32)
    assert cover_size(100, 64, bucket) == (50, 32)
    (pixels,) = load_pixels(item, [0], [bucket])
    assert pixels.shape == (3, 1, 32, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    ours = pixels[:, 0].permute(1, 2, 0).numpy()
    # Reference: Pillow's own antialiased bicubic resize to the cover size, then the center box.
    reference = Image.open(path).convert("RGB").resize((50, 32), Image.BICUBIC).crop((9, 0, 41, 32))
    reference = np.asarray(reference, np.float32) / 127.5 - 1
    assert np.abs(ours - reference).mean() < 0.02
    # The white square stays centered.
    white = np.argwhere(ours.mean(axis=2) > 0.9)
    assert np.allclose(white.mean(axis=0), (15.5, 15.5), atol=0.6)
    # The bands were cropped away: the edge columns are the gray background.
    assert np.abs(ours[:, [0, -1]] - (128 / 127.5 - 1)).max() < 0.05
    # While an uncropped bucket of the same image keeps them.
    (full,) = load_pixels(item, [0], [(96, 64)])
    assert full[0, 0, :, 0].mean() > 0.9 and full[2, 0, :, -1].mean() > 0.9


def test_exif_rotation_is_applied(tmp_path):
    # Stored 64 wide x 32 high with orientation 6 (rotate 90 cw to display): displayed 32 wide x 64 high.
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :32] = 255  # left half white in storage -> top half white when displayed
    write_image(tmp_path / "phone.jpg", array=array, exif_orientation=6)
    item = scan_folder(DatasetConfig(folder_path=str(tmp_path), resolution=[32]), FakeImageFamily(),
                       log=lambda _: None)[0]
    assert (item.width, item.height) == (32, 64)
    (pixels,) = load_pixels(item, [0], [native_bucket(32, 64, 8)])
    assert pixels.shape == (3, 1, 64, 32)
    assert pixels[:, 0, :28].mean() > 0.9 and pixels[:, 0, 36:].mean() < -0.9


def test_one_decode_for_several_buckets(tmp_path):
    write_image(tmp_path / "a.png", 200, 120)
    item = scan_folder(DatasetConfig(folder_path=str(tmp_path), resolution=[64, 96]), FakeImageFamily(),
                       log=lambda _: None)[0]
    buckets = [bucket_size(200, 120, r, 8) for r in item.resolutions]
    out = load_pixels(item, [0], buckets)
    assert [tuple(p.shape) for p in out] == [(3, 1, h, w) for w, h in buckets]

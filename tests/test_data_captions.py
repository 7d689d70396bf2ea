"""Caption files, the trigger word, default captions and caption dropout."""

from __future__ import annotations

import pytest
import torch

from tests.media import FakeImageFamily, write_caption, write_image
from trainer.data.captions import apply_dropout, apply_trigger, dropout_mask, read_caption
from trainer.data.sources import scan_folder
from trainer.errors import DatasetError
from trainer.job import DatasetConfig


@pytest.mark.parametrize(
    "caption, trigger, expected",
    [
        ("a photo of [trigger] on a beach", "ohwx", "a photo of ohwx on a beach"),
        ("a photo of a dog", "ohwx", "ohwx, a photo of a dog"),
        ("ohwx walking", "ohwx", "ohwx walking"),
        ("ohwxman walking", "ohwx", "ohwx, ohwxman walking"),   # a longer word is not the trigger
        ("", "ohwx", "ohwx"),
        ("  [trigger]  ", "ohwx", "ohwx"),
        ("<sks> portrait", "<sks>", "<sks> portrait"),
        ("a dog", None, "a dog"),
        ("[trigger], a dog", None, "a dog"),
        ("a [trigger] dog", "", "a dog"),
    ],
)
def test_apply_trigger(caption, trigger, expected):
    assert apply_trigger(caption, trigger) == expected


def test_read_caption_utf8_and_bom(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_bytes("café au lait \n".encode("utf-8"))
    bom = tmp_path / "b.txt"
    bom.write_bytes("\ufeffnaïve".encode("utf-8"))
    assert read_caption(plain) == "café au lait"
    assert read_caption(bom) == "naïve"


def test_caption_in_wrong_encoding_names_the_file(tmp_path):
    image = write_image(tmp_path / "img.png")
    caption = write_caption(image, "caf\xe9 cr\xe8me", encoding="latin-1")
    with pytest.raises(DatasetError) as info:
        scan_folder(DatasetConfig(folder_path=str(tmp_path)), FakeImageFamily(), log=lambda _: None)
    assert info.value.path == str(caption)
    assert "save it as UTF-8" in str(info.value)


def test_folder_captions_trigger_and_default(tmp_path):
    write_caption(write_image(tmp_path / "a.png"), "a red car, [trigger] style")
    write_caption(write_image(tmp_path / "b.jpg"), "a blue car")
    write_image(tmp_path / "c.webp")
    write_image(tmp_path / "d.jpeg")
    (tmp_path / "notes.json").write_text("{}")
    lines = []
    cfg = DatasetConfig(folder_path=str(tmp_path), trigger_word="ohwx", default_caption="a car")
    items = scan_folder(cfg, FakeImageFamily(), log=lines.append)
    assert [i.path.name for i in items] == ["a.png", "b.jpg", "c.webp", "d.jpeg"]
    assert [i.caption for i in items] == ["a red car, ohwx style", "ohwx, a blue car", "ohwx, a car", "ohwx, a car"]
    missing = [line for line in lines if "default_caption" in line]
    assert len(missing) == 1 and "2 of 4" in missing[0] and missing[0].startswith("warning")
    assert any("notes.json" in line for line in lines)


def test_caption_ext_option(tmp_path):
    write_caption(write_image(tmp_path / "a.png"), "from txt", ext="txt")
    write_caption(tmp_path / "a.png", "from caption", ext="caption")
    items = scan_folder(DatasetConfig(folder_path=str(tmp_path), caption_ext=".caption"), FakeImageFamily(),
                        log=lambda _: None)
    assert items[0].caption == "from caption"


def test_dropout_rate_statistics():
    generator = torch.Generator().manual_seed(0)
    n = 20000
    for rate in (0.0, 0.1, 0.5, 1.0):
        dropped = apply_dropout(["x"] * n, [rate] * n, generator)
        fraction = dropped.count("") / n
        # binomial standard deviation is at most 0.0036 here; 0.015 is > 4 sigma
        assert abs(fraction - rate) < 0.015, (rate, fraction)
    assert apply_dropout(["keep"] * 100, [0.0] * 100, generator) == ["keep"] * 100


def test_dropout_is_per_item_and_follows_the_generator():
    rates = [0.5] * 64
    first = dropout_mask(rates, torch.Generator().manual_seed(7))
    again = dropout_mask(rates, torch.Generator().manual_seed(7))
    other = dropout_mask(rates, torch.Generator().manual_seed(8))
    assert first == again
    assert first != other
    assert 0 < sum(first) < 64  # items drop independently, not all together
    # Mixed rates in one batch: each item uses its own.
    mixed = apply_dropout(["a", "b"] * 500, [0.0, 1.0] * 500, torch.Generator().manual_seed(1))
    assert mixed[0::2] == ["a"] * 500 and mixed[1::2] == [""] * 500

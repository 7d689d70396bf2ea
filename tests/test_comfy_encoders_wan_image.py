"""ComfyUI's CLIP vision as the Wan 2.1 I2V image encoder (trainer/comfy_encoders/wan_image.py), in CI.

The adapter resizes and crops the first frame with the family's own CLIPImageProcessor and hands ComfyUI images
already at its input size, so ComfyUI only rounds to 8 bits, normalizes and runs its tower. Checked here on
real tensors: that this split of the processor's work equals the processor's own output; and, with a stand-in
for ComfyUI's ClipVisionModel that does what comfy/clip_vision.py's encode_image does to a correctly sized
image (8-bit rounding, mean/std, penultimate layer of a real transformers CLIPVisionModel) and refuses to
resize, that the family's image embeddings through the adapter equal the family's own. Real ComfyUI:
tests/e2e/test_comfyui_clip_vision.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_models import tiny_wan21_i2v_path  # noqa: F401
from trainer.comfy_encoders import ExternalEncoders, for_family
from trainer.comfy_encoders.wan_image import (
    check_comfy_clip_vision,
    comfy_wan_image_encoders,
    crop_like_processor,
    wan_image_processor,
)
from trainer.errors import ModelError
from trainer.families.wan21_i2v import Wan21I2V, first_frame_images
from trainer.tiny import WAN_CLIP_WIDTH

# The real model's 224-pixel crops in 14-pixel patches (257 tokens), at the tiny I2V transformer's image_dim.
CLIP_SIZE, CLIP_PATCH = 224, 14


def tiny_clip_h(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=WAN_CLIP_WIDTH, intermediate_size=24, num_hidden_layers=3,
                              num_attention_heads=2, image_size=CLIP_SIZE, patch_size=CLIP_PATCH,
                              hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPVisionModel(config).eval()


class StandInClipVision:
    """What ComfyUI's comfy.clip_vision.ClipVisionModel exposes and does with an image of its input size."""

    def __init__(self, model, image_size: int = CLIP_SIZE, mean=None, std=None):
        processor = wan_image_processor()
        self.model = model
        self.image_size = image_size
        self.image_mean = list(mean or processor.image_mean)
        self.image_std = list(std or processor.image_std)
        self.calls = []

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, crop: bool = True) -> dict:
        self.calls.append((tuple(image.shape), crop))
        assert image.shape[1:3] == (self.image_size, self.image_size), "the adapter must not make ComfyUI resize"
        x = (torch.clip(255.0 * image, 0, 255).round() / 255.0).movedim(-1, 1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        out = self.model(pixel_values=(x - mean) / std, output_hidden_states=True)
        return {"penultimate_hidden_states": out.hidden_states[-2]}


def uint8_images(seed: int = 0) -> list[np.ndarray]:
    """First frames of the sizes a dataset gives: smaller than the crop, larger, portrait, landscape."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    smooth = np.stack([np.add.outer(ramp[:80], ramp[:96]) / 2] * 3, -1).astype(np.uint8)
    return [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), rng.integers(0, 256, (300, 260, 3), dtype=np.uint8),
            smooth, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]


# ---------------------------------------------------------------------------------------------- preprocessing


def test_processor_split_equals_the_processor():
    """The processor's resize + crop, then ComfyUI's 8-bit rounding and mean/std, is the processor's output."""
    processor = wan_image_processor()
    assert (processor.crop_size["height"], processor.size["shortest_edge"], processor.resample) == (224, 224, 3)
    images = uint8_images()
    want = torch.cat([processor(images=[im], return_tensors="pt")["pixel_values"] for im in images])
    cropped = crop_like_processor(processor, images)
    assert cropped.shape == (4, 224, 224, 3) and cropped.dtype == torch.float32
    assert torch.equal(torch.clip(255.0 * cropped, 0, 255).round() / 255.0, cropped)  # ComfyUI's rounding: a no-op
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    got = (cropped.movedim(-1, 1) - mean) / std
    diff = (got - want).abs().max().item()
    print(f"{type(processor).__name__}: max |split - processor| {diff:.3e}")
    # bit-exact with the PIL backend (no torchvision here); the torchvision backend fuses scale and normalize
    assert diff <= (0 if type(processor).__name__.endswith("Pil") else 5e-7), diff


def test_first_frame_images_are_the_8bit_first_frames():
    clip = np.random.default_rng(3).integers(0, 256, (2, 5, 16, 24, 3), dtype=np.uint8)
    pixels = torch.from_numpy(clip).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    images = first_frame_images(pixels)
    assert len(images) == 2 and all(np.array_equal(images[i], clip[i, 0]) for i in range(2))


# ---------------------------------------------------------------------------------------------- the adapter


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip_h()


def test_adapter_gives_the_family_image_embeddings(clip_model):
    import transformers

    from trainer.families.wan21_i2v import clip_image_processor_class

    processor = wan_image_processor()
    assert type(processor) is clip_image_processor_class()  # the class the family loads from a folder
    # PIL's resize whether or not torchvision is installed (transformers 5 would pick torchvision in ComfyUI)
    assert type(processor) is getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    images = uint8_images(1)
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        want = clip_model(**inputs, output_hidden_states=True).hidden_states[-2]
    stand_in = StandInClipVision(clip_model)
    encoders = for_family("wan21_i2v", clip_vision=stand_in)
    got = encoders.encode_image(images)
    assert got.shape == (4, 257, WAN_CLIP_WIDTH) and got.dtype == torch.float32
    diff = (got - want).abs().max().item()
    print(f"max |adapter - family| image embedding {diff:.3e}")
    assert diff <= 1e-5, diff
    assert stand_in.calls == [((4, 224, 224, 3), False)]
    assert not torch.equal(got[0], got[1])
    # without a text encoder or VAE the adapter leaves those to the family
    assert encoders.encode_prompts is None and encoders.encode_pixels is None
    encoders.release()
    assert encoders.encode_image is None and encoders.objects == []


def test_adapter_refuses_another_clip_vision_model(clip_model):
    with pytest.raises(ValueError, match="clip_vision_h"):
        for_family("wan21_i2v", clip_vision=StandInClipVision(clip_model, image_size=336))
    with pytest.raises(ValueError, match="image_mean"):  # e.g. SigLIP's 0.5 mean
        check_comfy_clip_vision(StandInClipVision(clip_model, mean=[0.5] * 3, std=[0.5] * 3),
                                wan_image_processor())
    with pytest.raises(ValueError, match="text-to-video"):  # the T2V family still refuses an image encoder
        for_family("wan21", clip_vision=StandInClipVision(clip_model))


def test_identity_names_the_clip_vision_weights(clip_model):
    a = comfy_wan_image_encoders(clip_vision=StandInClipVision(clip_model)).identity
    b = comfy_wan_image_encoders(clip_vision=StandInClipVision(tiny_clip_h(seed=1))).identity
    assert a != b and a == comfy_wan_image_encoders(clip_vision=StandInClipVision(clip_model)).identity


# ---------------------------------------------------------------------------------------------- the family


@pytest.fixture(scope="module")
def fam(tiny_wan21_i2v_path):
    return Wan21I2V.load(str(tiny_wan21_i2v_path), torch.float32)


def test_family_uses_the_external_image_encoder(fam, clip_model):
    """The same first frames: the family's own path (its processor + tower) vs ComfyUI's through the adapter."""
    clips = np.random.default_rng(4).integers(0, 256, (2, 5, 32, 48, 3), dtype=np.uint8)
    pixels = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    saved = dict(fam.loaded.extra)
    try:
        fam.loaded.extra.update(image_encoder=clip_model, image_processor=wan_image_processor())
        own = fam.encode_pixels(pixels)
        for key in ("image_encoder", "image_processor"):
            fam.loaded.extra.pop(key)
        assert not fam.uses_clip
        fam.loaded.extra["external_encoders"] = comfy_wan_image_encoders(clip_vision=StandInClipVision(clip_model))
        assert fam.uses_clip
        external = fam.encode_pixels(pixels)
        assert set(external) == {"latents", "image_condition", "image_embeds"}
        assert torch.equal(external["latents"], own["latents"])  # the folder's VAE still encodes the pixels
        diff = (external["image_embeds"] - own["image_embeds"]).abs().max().item()
        assert external["image_embeds"].shape == (2, 257, WAN_CLIP_WIDTH) and diff <= 1e-5, diff
        # the cached image embeddings depend on the CLIP vision model: it is part of the cache key
        first = fam.cache_identity()
        fam.loaded.extra["external_encoders"] = comfy_wan_image_encoders(
            clip_vision=StandInClipVision(tiny_clip_h(seed=2)))
        assert fam.cache_identity() != first
        # a CLIP vision model of another width than the transformer's image_dim is named, not broadcast
        fam.loaded.extra["external_encoders"] = ExternalEncoders(
            encode_prompts=None, encode_pixels=None, identity="wide", encode_image=lambda images: torch.zeros(
                len(images), 257, WAN_CLIP_WIDTH * 2))
        with pytest.raises(ModelError, match="image_dim"):
            fam.encode_first_frame_clip(pixels)
    finally:
        fam.loaded.extra.clear()
        fam.loaded.extra.update(saved)


# ---------------------------------------------------------------------------------------------- single files


@pytest.fixture(scope="module")
def i2v_file(tiny_wan21_i2v_path, tmp_path_factory):
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from tests.e2e.tiny_models import wan_native_state_dict

    transformer = WanTransformer3DModel.from_pretrained(tiny_wan21_i2v_path, subfolder="transformer")
    path = tmp_path_factory.mktemp("i2v_file") / "tiny_wan_i2v.safetensors"
    save_file(wan_native_state_dict(transformer), str(path))
    return path, transformer


def test_i2v_file_needs_an_image_encoder_and_takes_comfyuis(i2v_file, tiny_wan21_i2v_path, clip_model):
    from trainer.families.single_file import load_single_file

    path, reference = i2v_file
    config = tiny_wan21_i2v_path / "transformer"
    text_and_vae = dict(encode_prompts=lambda captions, n: [], encode_pixels=lambda pixels: pixels, identity="x")
    with pytest.raises(ModelError, match="CLIP vision") as err:
        load_single_file(path, torch.float32, config=config, encoders=ExternalEncoders(**text_and_vae))
    assert "encoders_from" in str(err.value)

    adapter = comfy_wan_image_encoders(clip_vision=StandInClipVision(clip_model))
    encoders = ExternalEncoders(**text_and_vae, encode_image=adapter.encode_image)
    family = load_single_file(path, torch.float32, config=config, encoders=encoders)
    assert family.name == "wan21_i2v" and family.uses_clip
    assert "image_encoder" not in family.loaded.extra  # no diffusers folder was read
    assert all(torch.equal(family.denoiser.state_dict()[k], v) for k, v in reference.state_dict().items())
    images = uint8_images(2)[:2]
    pixels = torch.stack([torch.from_numpy(im[:32, :48]).permute(2, 0, 1) for im in images])[:, :, None]
    torch.testing.assert_close(family.encode_first_frame_clip(pixels.float() / 127.5 - 1),
                               adapter.encode_image([im[:32, :48] for im in images]), rtol=0, atol=0)
    family.release_encoders()
    assert not family.uses_clip and encoders.encode_image is None

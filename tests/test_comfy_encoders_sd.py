"""ComfyUI's SD 1.5 / SDXL CLIP and VAE conventions -> the sd15 / sdxl pipelines' (trainer/comfy_encoders/sd.py):
the pure conversions on real tokenizers, encoders and VAEs, and the families deferring to external encoders
(with the checkpoint's own text towers and VAE then never loaded). Equivalence with real ComfyUI objects is
tests/e2e/test_comfyui_sd_encoders.py (COMFYUI_ROOT)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fixtures_models import tiny_sd15_path, tiny_sdxl_path  # noqa: F401
from trainer.comfy_encoders import ADAPTERS, ExternalEncoders, for_family
from trainer.comfy_encoders.sd import (
    LATENT_SCALE,
    SDXL_TOWERS,
    check_clip_layer,
    clip_tokens_for_pipeline,
    escape_comfy_weights,
    scale_sd_latents,
    still_images_to_comfy,
    sd_text_from_comfy,
)
from trainer.families import get_family
from trainer.families.single_file import SD15_CONFIG_DIR, SDXL_CONFIG_DIR, load_single_file


def comfy_chunks(ids: list[int], start: int, end: int, pad: int, length: int = 77) -> list:
    """A caption's token ids (no specials) in ComfyUI's tokenize_with_weights form: 77-token chunks of <start>,
    up to 75 tokens, <end>, padding; (id, weight, word id) tuples."""
    chunks, rest = [], list(ids)
    while True:
        part, rest = rest[: length - 2], rest[length - 2:]
        seq = [(start, 1.0, 0)] + [(t, 1.0, 1) for t in part] + [(end, 1.0, 0)]
        chunks.append(seq + [(pad, 1.0, 0)] * (length - len(seq)))
        if not rest:
            return chunks


# ---------------------------------------------------------------------------------------------- captions


def test_literal_text_escapes_brackets_so_comfyui_reads_them_back():
    assert escape_comfy_weights("a (red:1.2) car") == r"a \(red:1.2\) car"
    # ComfyUI reads '\(' as '(' and keeps other backslashes: a caption's own '\(' must become '\\('
    assert escape_comfy_weights(r"smile \(x\) a\b") == r"smile \\(x\\) a\b"
    assert escape_comfy_weights("[x] {y}: 1.5, embeddings:no") == "[x] {y}: 1.5, embeddings:no"
    for caption in ("embedding:cat on a mat", "a photo of embedding:cat", "line\nembedding:x"):
        with pytest.raises(ValueError, match="textual-inversion embedding"):
            escape_comfy_weights(caption)


@pytest.mark.parametrize("caption", ["", "a red car", "x" * 60 + " and a much longer tail " * 4])
def test_comfy_chunks_become_the_diffusers_tokenizer_ids(tiny_sd15_path, caption):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_sd15_path, subfolder="tokenizer")
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    want = tokenizer(caption, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ids = tokenizer(caption)["input_ids"][1:-1]
    tokens = {"l": comfy_chunks(ids, start, end, end)}
    assert len(tokens["l"]) == max(1, -(-len(ids) // 75))
    out = clip_tokens_for_pipeline(tokens, {"l": end}, 77, start=start, end=end)
    assert [t for t, _ in out["l"][0]] == want and all(w == 1.0 for _, w in out["l"][0])


def test_sdxl_towers_pad_their_own_way_and_a_real_pad_id_token_is_kept():
    start, end = 49406, 49407
    ids = [320, 0, 1929]  # "a ! car": "!" is token 0, also clip_g's pad id
    tokens = {"g": comfy_chunks(ids, start, end, 0), "l": comfy_chunks(ids, start, end, end)}
    out = clip_tokens_for_pipeline(tokens, SDXL_TOWERS)
    assert [t for t, _ in out["g"][0]] == [start, 320, 0, 1929, end] + [0] * 72
    assert [t for t, _ in out["l"][0]] == [start, 320, 0, 1929, end] + [end] * 72
    # a short word ComfyUI moved to the next chunk is still joined on, up to 75 tokens
    split = {"l": [[(start, 1.0)] + [(5, 1.0)] * 70 + [(end, 1.0)] * 6, [(start, 1.0)] + [(6, 1.0)] * 9
                   + [(end, 1.0)] * 67], "g": tokens["g"]}
    seq = [t for t, _ in clip_tokens_for_pipeline(split, SDXL_TOWERS)["l"][0]]
    assert seq == [start] + [5] * 70 + [6] * 5 + [end]


def test_other_models_clips_weights_and_embeddings_are_refused():
    one = [[(49406, 1.0), (320, 1.0), (49407, 1.0)]]
    with pytest.raises(ValueError, match=r"token streams \['l', 't5xxl'\].*\['g', 'l'\]"):
        clip_tokens_for_pipeline({"l": one, "t5xxl": one}, SDXL_TOWERS)
    with pytest.raises(ValueError, match="weight 1.2"):
        clip_tokens_for_pipeline({"l": [[(49406, 1.0), (320, 1.2), (49407, 1.0)]]}, {"l": 49407})
    with pytest.raises(ValueError, match="embedding vector"):
        clip_tokens_for_pipeline({"l": [[(49406, 1.0), (torch.zeros(768), 1.0), (49407, 1.0)]]}, {"l": 49407})


# ---------------------------------------------------------------------------------------------- layers


def test_the_layer_comfyui_returns_must_be_the_pipelines(tiny_sd15_path):
    from transformers import CLIPTextModel

    for family, layer in (("sd15", None), ("sd15", -1), ("sdxl", None), ("sdxl", -2)):
        check_clip_layer(family, layer)
    for family, layer in (("sd15", -2), ("sdxl", -1), ("sdxl", -3)):
        with pytest.raises(ValueError, match=f"stop at layer {layer}.*CLIPSetLastLayer"):
            check_clip_layer(family, layer)
    # why -1 is SD 1.5's layer and not SDXL's: ComfyUI layer-norms SD1's intermediate output, so layer -1 is the
    # pipeline's last_hidden_state; SDXL's towers are read unnormed, where -1 is not the penultimate state
    encoder = CLIPTextModel.from_pretrained(tiny_sd15_path, subfolder="text_encoder").eval()
    with torch.no_grad():
        out = encoder(torch.tensor([[0, 7, 8, 9, 1, 1]]), output_hidden_states=True)
        normed_last = encoder.final_layer_norm(out.hidden_states[-1])
    assert torch.allclose(normed_last, out.last_hidden_state, atol=1e-6)
    assert not torch.allclose(out.hidden_states[-1], out.hidden_states[-2], atol=1e-3)


def test_text_outputs_take_the_family_shapes():
    cond, pooled = torch.randn(1, 77, 2048), torch.randn(1, 1280)
    xl = sd_text_from_comfy(cond, pooled, "sdxl")
    assert xl["encoder_hidden_states"].shape == (77, 2048) and torch.equal(xl["text_embeds"], pooled[0])
    assert set(sd_text_from_comfy(cond[..., :768], torch.randn(1, 768), "sd15")) == {"encoder_hidden_states"}
    with pytest.raises(ValueError, match="no pooled output"):
        sd_text_from_comfy(cond, None, "sdxl")
    with pytest.raises(ValueError, match="154 positions"):
        sd_text_from_comfy(torch.randn(1, 154, 768), None, "sd15")


# ---------------------------------------------------------------------------------------------- latents


def test_latent_scale_is_the_vae_configs_and_comfy_vae_means_scale_to_the_family_latents(tiny_sd15_path):
    for family, folder in (("sd15", SD15_CONFIG_DIR), ("sdxl", SDXL_CONFIG_DIR)):
        assert LATENT_SCALE[family] == json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"]
    family = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 1, 32, 48) * 2 - 1
    image = still_images_to_comfy(pixels)
    assert image.shape == (2, 32, 48, 3) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # what ComfyUI's VAE.encode does with the image: back to [-1, 1] channels-first, the posterior's mean
    with torch.no_grad():
        raw = family.loaded.vae.encode(image.movedim(-1, 1) * 2.0 - 1.0).latent_dist.mode()
    ours = family.encode_pixels(pixels)
    assert torch.allclose(scale_sd_latents(raw, "sd15"), ours, atol=1e-5) and ours.std() > 0.01
    with pytest.raises(ValueError, match="still images"):
        still_images_to_comfy(torch.zeros(1, 3, 5, 8, 8))


# ---------------------------------------------------------------------------------------------- the adapters


def test_adapters_are_registered_and_check_what_is_connected():
    assert ADAPTERS["sd15"] == ("sd", "comfy_sd15_encoders") and ADAPTERS["sdxl"] == ("sd", "comfy_sdxl_encoders")
    clip = SimpleNamespace(layer_idx=None, cond_stage_model=torch.nn.Linear(2, 2))
    vae = SimpleNamespace(latent_channels=4, latent_dim=2, first_stage_model=torch.nn.Linear(2, 2))
    encoders = for_family("sdxl", clip, vae)
    assert encoders.encode_prompts is not None and encoders.encode_pixels is not None
    assert encoders.identity.startswith("comfy-sdxl-") and for_family("sd15", clip, vae).identity != encoders.identity
    assert for_family("sd15", None, vae).encode_prompts is None
    with pytest.raises(ValueError, match="stop at layer -2"):
        for_family("sd15", SimpleNamespace(layer_idx=-2), None)
    with pytest.raises(ValueError, match="16-channel latents"):
        for_family("sdxl", None, SimpleNamespace(latent_channels=16, latent_dim=3))
    with pytest.raises(ValueError, match="no image encoder"):
        for_family("sd15", None, None, clip_vision=object())


@pytest.fixture(scope="module")
def checkpoints(tiny_sd15_path, tiny_sdxl_path, tmp_path_factory):
    from tests.test_single_file_sd15 import ldm_checkpoint
    from tests.test_single_file_sdxl import ldm_xl_checkpoint

    folder = tmp_path_factory.mktemp("sd_ckpts")
    save_file(ldm_checkpoint(tiny_sd15_path), str(folder / "sd15.safetensors"))
    save_file(ldm_xl_checkpoint(tiny_sdxl_path), str(folder / "sdxl.safetensors"))
    return {"sd15": (folder / "sd15.safetensors", tiny_sd15_path), "sdxl": (folder / "sdxl.safetensors", tiny_sdxl_path)}


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_external_encoders_replace_the_checkpoints_own(checkpoints, name):
    path, folder = checkpoints[name]
    own = get_family(name).load(str(folder), dtype=torch.float32)  # the folder of the same weights
    calls = []

    def encode_prompts(captions, max_length):
        calls.append(("prompts", list(captions), max_length))
        return own.encode_prompts(captions)

    def encode_pixels(pixels):
        calls.append(("pixels", tuple(pixels.shape)))
        return own.encode_pixels(pixels)

    external = ExternalEncoders(encode_prompts=encode_prompts, encode_pixels=encode_pixels, identity="comfy-x")
    # no tokenizer source is given: with an external CLIP none is needed
    family = load_single_file(path, torch.float32, config=folder, family=name, encoders=external)
    assert family.loaded.text_encoders == [] and family.loaded.tokenizers == [] and family.loaded.vae is None
    assert family.resolution_factor == own.resolution_factor
    captions = ["a (red) car", ""]
    got, want = family.encode_prompts(captions), own.encode_prompts(captions)
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    assert all(torch.equal(g[k], w[k]) for g, w in zip(got, want) for k in w)
    pixels = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    assert torch.equal(family.encode_pixels(pixels), own.encode_pixels(pixels))
    assert calls == [("prompts", captions, 77), ("pixels", (1, 3, 1, 32, 32))]
    assert family.cache_identity() == f"{name}:comfy-x"
    # the UNet is the file's, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(family.denoiser.state_dict().values(),
                                                 own.denoiser.state_dict().values()))
    # a CLIP alone: the VAE still comes from the file
    text_only = ExternalEncoders(encode_prompts=encode_prompts, encode_pixels=None, identity="comfy-t")
    family = load_single_file(path, torch.float32, config=folder, family=name, encoders=text_only)
    assert family.loaded.vae is not None and family.loaded.text_encoders == []
    assert torch.allclose(family.encode_pixels(pixels), own.encode_pixels(pixels), atol=1e-6)

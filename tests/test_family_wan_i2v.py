"""Wan 2.1 I2V on a tiny random WanImageToVideoPipeline: first-frame conditioning equals the pipeline's own
prepare_latents / encode_image / denoising-step input, the data pipeline caches it per item, export keys are
ComfyUI's native Wan names, and a short run trains through a phase transition."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fixtures_models import tiny_wan21_i2v_path, tiny_wan21_path  # noqa: F401
from tests.media import textured_frames, write_caption, write_image, write_video
from trainer.data.sources import load_pixels
from trainer.data.training_set import TrainingSet, validate_dataset_config
from trainer.errors import JobError, ModelError
from trainer.export import delta_from_file
from trainer.families import get_family
from trainer.families.base import NoisyBatch
from trainer.families.wan21 import Wan21
from trainer.families.wan21_i2v import Wan21I2V
from trainer.job import DatasetConfig, parse_job
from trainer.loop import train
from trainer.metrics import read_records
from trainer.validation import FixedNoiseProbe
from family_helpers import edit_json

FAST_EXIT = {"loss_improvement_rate_below": 0.005, "min_gradient_stability": 0.3, "max_loss_cv": 1.0}


def quiet(_line):
    pass


@pytest.fixture(scope="module")
def fam(tiny_wan21_i2v_path):
    return Wan21I2V.load(str(tiny_wan21_i2v_path), torch.float32)


@pytest.fixture(scope="module")
def pipe(tiny_wan21_i2v_path):
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline.from_pretrained(tiny_wan21_i2v_path)


def uint8_clip(seed: int, frames: int = 5, height: int = 32, width: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def to_pixels(clip: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> [3, F, H, W] in [-1, 1], as the data pipeline makes them."""
    return torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def folder_of(path, tmp_path, name):
    return shutil.copytree(path, tmp_path / name)



# ---------------------------------------------------------------- the family and its folder

def test_registered_and_loaded_with_its_components(fam, tiny_wan21_i2v_path):
    from diffusers import DiffusionPipeline, WanImageToVideoPipeline
    from transformers import CLIPVisionModel

    assert get_family("wan21_i2v") is Wan21I2V and issubclass(Wan21I2V, Wan21)
    assert isinstance(DiffusionPipeline.from_pretrained(tiny_wan21_i2v_path), WanImageToVideoPipeline)
    assert Wan21I2V.supports_i2v and not getattr(Wan21, "supports_i2v", False)
    assert isinstance(fam.loaded.extra["image_encoder"], CLIPVisionModel)
    assert fam.resolution_factor == 16 and fam.video and fam.flow_shift == 3.0
    for module in (fam.denoiser, fam.loaded.extra["image_encoder"]):
        assert not any(p.requires_grad for p in module.parameters())
    fam2 = Wan21I2V.load(str(tiny_wan21_i2v_path), torch.float32)
    fam2.release_encoders()
    assert "image_encoder" not in fam2.loaded.extra and fam2.loaded.vae is None


def test_wrong_folders_name_the_family_they_are(tmp_path, tiny_wan21_path, tiny_wan21_i2v_path):
    with pytest.raises(ModelError, match="model.family 'wan21'") as e:
        Wan21I2V.load(str(tiny_wan21_path), torch.float32)
    assert str(tiny_wan21_path) in str(e.value)
    with pytest.raises(ModelError, match="max_sequence_length must be 512"):
        Wan21I2V.load(str(tiny_wan21_i2v_path), torch.float32, max_sequence_length=64)

    no_clip = folder_of(tiny_wan21_i2v_path, tmp_path, "no_clip")
    edit_json(no_clip / "model_index.json", image_encoder=[None, None])
    with pytest.raises(ModelError, match="image_encoder"):
        Wan21I2V.load(str(no_clip), torch.float32)

    wrong_dim = folder_of(tiny_wan21_i2v_path, tmp_path, "wrong_dim")
    edit_json(wrong_dim / "transformer" / "config.json", image_dim=8)
    with pytest.raises(ModelError, match="image_dim 8 != image_encoder hidden_size 16"):
        Wan21I2V.load(str(wrong_dim), torch.float32)


# ---------------------------------------------------------------- conditioning equals the pipeline's

def test_first_frame_condition_equals_pipeline_prepare_latents(fam, pipe):
    clip = uint8_clip(0)
    pixels = to_pixels(clip)[None]
    ours = fam.encode_pixels(pixels)
    assert set(ours) == {"latents", "image_condition", "image_embeds"}
    assert ours["latents"].shape == (1, 16, 2, 4, 6) and ours["image_condition"].shape == (1, 20, 2, 4, 6)
    torch.testing.assert_close(ours["latents"], Wan21.encode_pixels(fam, pixels))

    _, condition = pipe.prepare_latents(pixels[:, :, 0], 1, 16, 32, 48, 5, torch.float32, "cpu",
                                        torch.Generator().manual_seed(0))
    # mask: 4 channels, 1 on latent frame 0 only
    assert condition[:, :4, 0].eq(1).all() and condition[:, :4, 1:].eq(0).all()
    torch.testing.assert_close(ours["image_condition"], condition)
    # only the first frame matters: other frames do not reach the condition
    other = pixels.clone()
    other[:, :, 1:] = -other[:, :, 1:]
    torch.testing.assert_close(fam.encode_pixels(other)["image_condition"], ours["image_condition"])


def test_image_embeds_equal_pipeline_encode_image(fam, pipe):
    clips = [uint8_clip(1), uint8_clip(2)]
    pixels = torch.stack([to_pixels(c) for c in clips])
    ours = fam.encode_first_frame_clip(pixels)
    assert ours.shape == (2, 17, 16)  # 32/8 squared patches + class token, CLIP width 16
    for i, clip in enumerate(clips):
        theirs = pipe.encode_image(Image.fromarray(clip[0]), "cpu")
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=0)
    assert not torch.equal(ours[0], ours[1])


def test_predict_is_the_pipeline_denoising_step(fam, pipe):
    clip = uint8_clip(3)
    pixels = to_pixels(clip)[None]
    item = fam.encode_pixels(pixels)
    (text,) = fam.encode_prompts(["a red car drives away"])
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([737.0])
    cond = {"encoder_hidden_states": text["encoder_hidden_states"][None], "image_condition": item["image_condition"],
            "image_embeds": item["image_embeds"]}
    ours = fam.predict(NoisyBatch(model_input=latents, timesteps=t, target=latents), cond)

    # The text part is Wan 2.1's (tested against WanPipeline.encode_prompt in test_families; the I2V pipeline's
    # copy of it calls ftfy unconditionally, which is not installed here).
    prompt_embeds = cond["encoder_hidden_states"]
    image_embeds = pipe.encode_image(Image.fromarray(clip[0]), "cpu")
    _, condition = pipe.prepare_latents(pixels[:, :, 0], 1, 16, 32, 48, 5, torch.float32, "cpu", None)
    theirs = pipe.transformer(hidden_states=torch.cat([latents, condition], dim=1), timestep=t.expand(1),
                              encoder_hidden_states=prompt_embeds, encoder_hidden_states_image=image_embeds,
                              return_dict=False)[0]
    torch.testing.assert_close(ours, theirs)
    # both conditionings reach the output
    for key in ("image_condition", "image_embeds"):
        changed = dict(cond, **{key: cond[key] + 0.5})
        assert not torch.allclose(fam.predict(NoisyBatch(latents, t, latents), changed), ours)


def test_targets_include_image_cross_attention_and_export_native_names(fam):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    targets = fam.target_modules(4, 0)
    # 2 blocks x (4 self-attention + 6 cross-attention incl. add_k/add_v + 2 feed-forward)
    assert len(targets) == 24
    keys = [Wan21I2V.export_prefix(t.name) for t in targets]
    assert "diffusion_model.blocks.0.cross_attn.k_img" in keys and "diffusion_model.blocks.1.cross_attn.v_img" in keys
    for target, key in zip(targets, keys):
        native = key.removeprefix("diffusion_model.")
        (back,) = convert_wan_transformer_to_diffusers({f"{native}.weight": torch.empty(0)})
        assert back == f"{target.name}.weight"


# ---------------------------------------------------------------- data pipeline: per-item conditioning

def clip_folder(tmp_path, name="clips"):
    folder = tmp_path / name
    write_video(folder / "clip.mp4", textured_frames(12, 48, 32), num_frames=12, width=48, height=32, gop=4)
    write_caption(folder / "clip.mp4", "[trigger] waves rolling")
    write_image(folder / "still.png", 48, 32, seed=3)
    write_caption(folder / "still.png", "a still frame")
    return folder


def test_training_set_caches_the_condition_per_item(fam, tmp_path, monkeypatch):
    folder = clip_folder(tmp_path)
    cfg = DatasetConfig(folder_path=str(folder), trigger_word="ohwx", resolution=[32], num_frames=5,
                        do_i2v=True, cache_latents_to_disk=True)
    ts = TrainingSet.build([cfg], fam, seed=0, log=quiet)
    video = next(s for s in ts.samples if s.item.kind == "video")
    still = next(s for s in ts.samples if s.item.kind == "image")
    assert video.item.extra["do_i2v"] and set(video.cond) == {"image_condition", "image_embeds"}
    (pixels,) = load_pixels(video.item, list(video.frame_indices), [video.bucket])
    fresh = fam.encode_pixels(pixels[None])
    torch.testing.assert_close(video.cond["image_condition"], fresh["image_condition"][0])
    torch.testing.assert_close(video.cond["image_embeds"], fresh["image_embeds"][0])
    assert still.cond["image_condition"].shape == (20, 1, *still.latent.shape[2:])  # an image is a 1-frame clip

    batch = ts.collate([ts.samples.index(video)], None)
    assert set(batch["cond"]) == {"encoder_hidden_states", "image_condition", "image_embeds"}
    assert batch["cond"]["image_condition"].shape == (1, 20, *video.latent.shape[1:])

    # a second build reads latents and conditions from disk without running any encoder
    calls = []
    monkeypatch.setattr(fam, "encode_pixels", lambda *a, **k: calls.append(1))
    again = TrainingSet.build([cfg], fam, seed=0, log=quiet)
    assert not calls
    for a, b in zip(ts.samples, again.samples):
        assert torch.equal(a.latent, b.latent) and a.cond.keys() == b.cond.keys()
        assert all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)


def test_do_i2v_on_a_text_to_video_family_is_a_job_error(tmp_path, tiny_wan21_path):
    spec = {"job": "x", "model": {"family": "wan21", "path": str(tiny_wan21_path)},
            "datasets": [{"folder_path": str(tmp_path), "num_frames": 5, "resolution": [32]},
                         {"folder_path": str(tmp_path), "do_i2v": True, "resolution": [32]}]}
    with pytest.raises(JobError) as e:
        parse_job(spec)
    assert e.value.field == "datasets[1].do_i2v" and "wan21" in e.value.message
    with pytest.raises(JobError) as e:
        validate_dataset_config({"folder_path": str(tmp_path), "do_i2v": True, "resolution": [32]}, 0, Wan21)
    assert e.value.field == "datasets[0].do_i2v"
    spec["datasets"][1]["do_i2v"] = "yes"
    with pytest.raises(JobError, match="true or false"):
        parse_job(spec)
    spec["model"]["family"] = "wan21_i2v"
    spec["datasets"][1]["do_i2v"] = True
    assert parse_job(spec).datasets[1].do_i2v is True


# ---------------------------------------------------------------- a short run through a transition

def apply_file_like_comfyui(family, lora_file, linear_rank):
    by_prefix = {type(family).export_prefix(t.name): t.module for t in family.target_modules(linear_rank, 0)}
    deltas = delta_from_file(lora_file)
    assert set(deltas) <= set(by_prefix), set(deltas) - set(by_prefix)
    with torch.no_grad():
        for prefix, d in deltas.items():
            by_prefix[prefix].weight += d.reshape(by_prefix[prefix].weight.shape).float()


def test_i2v_run_learns_transitions_and_exports(tiny_wan21_i2v_path, tmp_path):
    data = clip_folder(tmp_path)
    spec = {
        "job": "wan_i2v", "output_dir": str(tmp_path / "out"),
        "model": {"family": "wan21_i2v", "path": str(tiny_wan21_i2v_path), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32], "num_frames": 5,
                      "do_i2v": True}],
        "network": {"linear": 4, "linear_alpha": 4, "alpha_schedule": {"linear_alpha_phases": {
            "foundation": {"alpha": 4, "min_steps": 100, "exit_criteria": FAST_EXIT},
            "emphasis": {"alpha": 8, "min_steps": 100}}}},
        "train": {"steps": 200, "batch_size": 1, "lr": 3e-3, "seed": 3},
        "save": {"every": 100, "resume": "none"},
    }
    job = parse_job(spec)
    fam = Wan21I2V.load(str(tiny_wan21_i2v_path), torch.float32)
    ts = TrainingSet.build(job.datasets, fam, seed=0, log=quiet)
    probe = FixedNoiseProbe(ts, fam, items=2)
    before = probe.loss()
    result = train(job, family=fam, training_set=ts)

    assert [t["to_phase"] for t in result.transitions] == ["emphasis"]
    assert [r["step"] for r in read_records(job.metrics_path)] == list(range(1, 201))
    sd = load_file(str(result.lora_path))
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    assert any(".cross_attn.k_img." in k for k in sd) and any(".cross_attn.v_img." in k for k in sd)
    alphas = {k: v.item() for k, v in sd.items() if k.endswith(".alpha")}
    assert len(alphas) == 24 and set(alphas.values()) == {8.0}
    apply_file_like_comfyui(fam, result.lora_path, 4)
    after = probe.loss()
    assert after < 0.95 * before, (before, after)


# ---------------------------------------------------------------- real ComfyUI (skips without COMFYUI_ROOT)

def comfyui_sized_wan(seed: int, in_channels: int, out_channels: int = 16, **extra):
    """The smallest Wan ComfyUI detects: dim 128 = 1 head x 128, text_dim 4096 (see tests/e2e/tiny_models)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=in_channels,
        out_channels=out_channels, text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, **extra,
    ).eval()


def probe_family_export_in_comfyui(family, transformer, tmp_path, name, expert=None):
    """Export a LoRA the trainer's way (family targets, scheduled alphas, export.save_lora), load it with real
    ComfyUI on the native model file; returns (probe result, max |ComfyUI delta - ours|)."""
    from tests.e2e import comfy_env
    from tests.e2e.tiny_models import save_safetensors, wan_native_state_dict
    from trainer.export import save_lora
    from trainer.lora import LoRANetwork

    model_file = save_safetensors(wan_native_state_dict(transformer), tmp_path / f"model_{name}.safetensors")
    targets = family.target_modules(4, 4, expert=expert) if expert else family.target_modules(4, 4)
    network = LoRANetwork(targets, linear_rank=4, linear_alpha=4, conv_rank=4, conv_alpha=4)
    network.set_alphas({"linear": 2.5, "conv": 7.0})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in network.lora.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=gen) * 0.1)
    lora_file = save_lora(tmp_path / f"lora_{name}.safetensors", network, family, metadata={})
    expected = {type(family).export_prefix(m.name): m.delta_weight() for m in network.lora.values()}
    (result,) = comfy_env.probe_many(model_file, [lora_file], dump_dir=tmp_path)
    assert result["not_loaded"] == [] and result["not_patched"] == [] and result["model_missing"] == []
    assert sorted(result["lora_targets"]) == sorted(expected) and result["patches_applied"] == len(expected)
    deltas = load_file(result["deltas_file"])
    worst = max(float((deltas[result["lora_targets"][p]].double() - d.double()).abs().max())
                for p, d in expected.items())
    assert worst <= 1e-6
    return result, worst


@pytest.mark.comfyui
def test_comfyui_applies_every_key_of_a_wan21_i2v_export(tmp_path):
    from tests.e2e import comfy_env
    from trainer.families.base import LoadedModel

    comfy_env.require_comfyui()
    # ComfyUI's image projection takes 1280-wide CLIP features; image K/V projections have the model width.
    transformer = comfyui_sized_wan(0, 36, image_dim=1280, added_kv_proj_dim=128)
    result, _ = probe_family_export_in_comfyui(Wan21I2V(LoadedModel(denoiser=transformer)), transformer, tmp_path,
                                               "wan21_i2v")
    assert result["model_config"] == "WAN21_I2V"
    assert any(".cross_attn.k_img" in k for k in result["lora_targets"])

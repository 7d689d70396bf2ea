"""Model families on tiny random pipelines: loading, encoding, the noise objectives, targets, folder checks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import tiny_sd15_path, tiny_sd15_vpred_path, tiny_wan21_path  # noqa: F401
from trainer.errors import JobError, ModelError
from trainer.families import FAMILIES, get_family
from trainer.families.base import ModelFamily
from trainer.families.sd15 import SD15, sd15_target_modules
from trainer.families.wan21 import Wan21, wan_target_modules
from trainer.tiny import build_tiny_sd15, build_tiny_wan21
from family_helpers import edit_json, stack

SD15_FULL_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
WAN21_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)


@pytest.fixture(scope="module")
def sd15(tiny_sd15_path):
    return SD15.load(str(tiny_sd15_path), torch.float32)


@pytest.fixture(scope="module")
def wan(tiny_wan21_path):
    return Wan21.load(str(tiny_wan21_path), torch.float32)



def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst



# ---------------------------------------------------------------- registry

def test_registry_names_and_lazy_classes():
    assert {"sd15", "wan21", "sdxl", "flux"} <= set(FAMILIES)
    assert get_family("sd15") is SD15 and get_family("wan21") is Wan21
    assert all(issubclass(get_family(n), ModelFamily) and get_family(n).name == n for n in FAMILIES)


@pytest.mark.parametrize("bad", ["sd99", "", "SD15", None])
def test_unknown_family_is_a_job_error_on_model_family(bad):
    with pytest.raises(JobError) as e:
        get_family(bad)
    assert e.value.field == "model.family"
    assert "sd15" in e.value.message and "wan21" in e.value.message


# ---------------------------------------------------------------- tiny builders

def test_tiny_folders_are_real_diffusers_pipelines(tiny_sd15_path, tiny_wan21_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, WanPipeline
    from transformers import AutoTokenizer

    assert isinstance(DiffusionPipeline.from_pretrained(tiny_sd15_path), StableDiffusionPipeline)
    assert isinstance(DiffusionPipeline.from_pretrained(tiny_wan21_path), WanPipeline)
    for path, max_length in ((tiny_sd15_path, 77), (tiny_wan21_path, 512)):
        tok = AutoTokenizer.from_pretrained(path / "tokenizer")
        assert tok.model_max_length == max_length
        a, b = tok(["a photo of ohwx"]).input_ids[0], tok(["a photo of a cat"]).input_ids[0]
        assert a != b and a[-1] == tok.eos_token_id


def test_tiny_builds_are_seeded_and_refuse_to_overwrite(tmp_path, tiny_sd15_path):
    again = build_tiny_sd15(tmp_path / "again")
    other = build_tiny_sd15(tmp_path / "other", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    ref, same, diff = (load_file(p / name) for p in (tiny_sd15_path, again, other))
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], diff[k]) for k in ref)
    with pytest.raises(FileExistsError, match="again"):
        build_tiny_sd15(again)
    with pytest.raises(FileExistsError):
        build_tiny_wan21(again)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folder left behind"


def test_tiny_vpred_folder_says_v_prediction(tiny_sd15_vpred_path):
    config = json.loads((tiny_sd15_vpred_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        build_tiny_sd15(tiny_sd15_vpred_path.parent / "x", prediction_type="sample")


# ---------------------------------------------------------------- SD 1.5

def test_sd15_loads_frozen_with_its_facts(sd15):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    assert isinstance(sd15.denoiser, UNet2DConditionModel)
    assert isinstance(sd15.scheduler, DDPMScheduler)
    assert sd15.resolution_factor == 8 and sd15.prediction_type == "epsilon" and not sd15.video
    for m in (sd15.denoiser, sd15.loaded.vae, *sd15.loaded.text_encoders):
        assert not any(p.requires_grad for p in m.parameters())
    assert sd15.describe() == {"family": "sd15", "prediction_type": "epsilon", "num_train_timesteps": 1000}
    assert SD15.valid_num_frames(1) and not SD15.valid_num_frames(5)


def test_sd15_prompts_match_stable_diffusion_pipeline(sd15, tiny_sd15_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path)
    captions = ["a photo of ohwx", "ohwx on a beach, at sunset"]
    ours = sd15.encode_prompts(captions)
    assert [c["encoder_hidden_states"].shape for c in ours] == [torch.Size([77, 32])] * 2
    theirs, _ = pipe.encode_prompt(captions, "cpu", 1, False)
    torch.testing.assert_close(stack(ours)["encoder_hidden_states"], theirs, rtol=0, atol=0)
    assert not torch.equal(ours[0]["encoder_hidden_states"], ours[1]["encoder_hidden_states"])


def test_sd15_pixels_to_scaled_posterior_mean(sd15):
    pixels = torch.rand(2, 3, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sd15.encode_pixels(pixels)
    assert latents.shape == (2, 4, 4, 6) and latents.dtype == torch.float32
    vae = sd15.loaded.vae
    expected = vae.encode(pixels[:, :, 0]).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(sd15.encode_pixels(pixels), latents, rtol=0, atol=0)  # deterministic: cacheable
    with pytest.raises(ValueError, match="F = 1"):
        sd15.encode_pixels(torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="multiple of 8"):
        sd15.encode_pixels(torch.zeros(1, 3, 1, 36, 32))


def _scaled_linear_alphas_cumprod():
    # SD 1.5's betas written out: linspace in sqrt space, squared.
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    out, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        out.append(acc)
    return out


def test_sd15_add_noise_against_hand_formulas(sd15):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 4, 4, 4, generator=gen)
    noise = torch.randn(4, 4, 4, 4, generator=gen)
    u = torch.tensor([0.0, 0.25, 0.5004, 0.99995])
    noisy = sd15.add_noise(x0, noise, u)
    assert noisy.timesteps.tolist() == [0, 250, 500, 999]
    acp = _scaled_linear_alphas_cumprod()
    for i, t in enumerate([0, 250, 500, 999]):
        expected = math.sqrt(acp[t]) * x0[i] + math.sqrt(1 - acp[t]) * noise[i]
        torch.testing.assert_close(noisy.model_input[i], expected)
    torch.testing.assert_close(noisy.target, noise, rtol=0, atol=0)


def test_sd15_v_prediction_target(tiny_sd15_vpred_path):
    family = SD15.load(str(tiny_sd15_vpred_path), torch.float32)
    assert family.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    noisy = family.add_noise(x0, noise, torch.tensor([0.1, 0.7]))
    acp = _scaled_linear_alphas_cumprod()
    for i, t in enumerate([100, 700]):
        v = math.sqrt(acp[t]) * noise[i] - math.sqrt(1 - acp[t]) * x0[i]
        torch.testing.assert_close(noisy.target[i], v)


def test_sd15_predict_shape(sd15):
    latents = torch.randn(2, 4, 4, 4)
    noisy = sd15.add_noise(latents, torch.randn_like(latents), torch.tensor([0.2, 0.8]))
    cond = stack(sd15.encode_prompts(["a", "b"]))
    out = sd15.predict(noisy, cond)
    assert out.shape == latents.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_sd15_target_modules_kohya_selection(sd15):
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    linear = sd15.target_modules(4, 0)
    both = sd15.target_modules(4, 4)
    conv_only = sd15.target_modules(0, 4)
    # tiny UNet: 4 Transformer2DModels (down 0, mid, up 1 x2) x (proj_in, proj_out, 4 attn1, 4 attn2, 2 ff);
    # 8 resnets x (conv1, conv2) + 1 downsampler + 1 upsampler
    assert len(linear) == 48 and {t.group for t in linear} == {"linear"}
    assert len(conv_only) == 18 and {t.group for t in conv_only} == {"conv"}
    names = [t.name for t in both]
    assert len(names) == len(set(names)) == 66 and set(names) == {t.name for t in linear + conv_only}
    assert sd15.target_modules(0, 0) == []
    modules = dict(sd15.denoiser.named_modules())
    for t in both:
        assert modules[t.name] is t.module
    for t in linear:
        assert ".attentions." in t.name
        assert isinstance(t.module, torch.nn.Linear) or t.module.kernel_size == (1, 1)
    for t in conv_only:
        parent = modules[t.name.rsplit(".", 1)[0]]
        assert isinstance(parent, (ResnetBlock2D, Downsample2D, Upsample2D)) and t.module.kernel_size == (3, 3)
    assert not any(n in t.name for t in both for n in ("conv_shortcut", "time_emb_proj", "conv_in", "conv_out"))


def test_sd15_full_size_target_counts_match_kohya():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_FULL_UNET)
    targets = sd15_target_modules(unet, 16, 8)
    # 16 transformer blocks x 12 = the 192 UNet modules of every kohya SD 1.5 LoRA;
    # 22 resnets x 2 convs + 3 downsamplers + 3 upsamplers
    assert sum(t.group == "linear" for t in targets) == 192
    assert sum(t.group == "conv" for t in targets) == 50


def _folder_error(family, path) -> str:
    with pytest.raises(ModelError) as e:
        family.load(str(path), torch.float32)
    assert str(path) in str(e.value)
    return str(e.value)


def test_sd15_bad_folders_name_the_folder_and_the_problem(tmp_path, tiny_sd15_path, tiny_wan21_path):
    assert "no such folder" in _folder_error(SD15, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "model_index.json" in _folder_error(SD15, tmp_path / "empty")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert "is a file" in _folder_error(SD15, tmp_path / "weights.safetensors")
    assert "'wan21'" in _folder_error(SD15, tiny_wan21_path)

    no_unet = copy_model(tiny_sd15_path, tmp_path / "no_unet")
    edit_json(no_unet / "model_index.json", unet=None)
    assert "unet" in _folder_error(SD15, no_unet)

    mismatch = copy_model(tiny_sd15_path, tmp_path / "mismatch")
    edit_json(mismatch / "unet" / "config.json", cross_attention_dim=64)
    assert "cross_attention_dim 64" in _folder_error(SD15, mismatch)

    sdxl_like = copy_model(tiny_sd15_path, tmp_path / "sdxl_like")
    edit_json(sdxl_like / "unet" / "config.json", addition_embed_type="text_time")
    assert "SDXL" in _folder_error(SD15, sdxl_like)

    flow = copy_model(tiny_sd15_path, tmp_path / "flow")
    edit_json(flow / "scheduler" / "scheduler_config.json", prediction_type="flow_prediction")
    assert "prediction_type" in _folder_error(SD15, flow)


# ---------------------------------------------------------------- Wan 2.1

def test_wan_loads_frozen_with_its_facts(wan):
    from diffusers import WanTransformer3DModel

    assert isinstance(wan.denoiser, WanTransformer3DModel)
    assert wan.video and wan.resolution_factor == 16 and Wan21.resolution_factor == 16
    assert wan.flow_shift == 3.0 and wan.max_sequence_length == 512
    assert not any(p.requires_grad for p in wan.denoiser.parameters())
    assert wan.describe() == {"family": "wan21", "flow_shift": 3.0, "max_sequence_length": 512}


@pytest.mark.parametrize("n,ok", [(1, True), (5, True), (9, True), (33, True), (81, True), (0, False),
                                  (2, False), (3, False), (4, False), (8, False), (80, False), (-3, False)])
def test_wan_num_frames_rule(n, ok):
    assert Wan21.valid_num_frames(n) is ok
    assert "4k+1" in Wan21.num_frames_rule()


def test_wan_conv_targets_only_with_conv_rank():
    assert Wan21.has_conv_targets(4) and not Wan21.has_conv_targets(0)


def test_wan_prompts_match_wan_pipeline(wan, tiny_wan21_path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan21_path)
    captions = ["a video of ohwx  &amp; a dog", "x"]
    ours = stack(wan.encode_prompts(captions))["encoder_hidden_states"]
    theirs, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512,
                                   device="cpu")
    assert ours.shape == (2, 512, 32)
    torch.testing.assert_close(ours, theirs)  # float32 round-off only: the pipeline's encoder may pick other kernels
    # "x" + </s> are 2 tokens: everything after them is exactly zero, before them it is not
    assert ours[1, :2].abs().sum(-1).gt(0).all() and ours[1, 2:].eq(0).all()


def test_wan_shorter_text_length_by_option(tiny_wan21_path):
    family = Wan21.load(str(tiny_wan21_path), torch.float32, max_sequence_length=16)
    (cond,) = family.encode_prompts(["a long caption " * 10])
    assert cond["encoder_hidden_states"].shape == (16, 32)
    with pytest.raises(ModelError, match="max_sequence_length"):
        Wan21.load(str(tiny_wan21_path), torch.float32, max_sequence_length=0)


def test_wan_pixels_to_normalized_latents(wan):
    pixels = torch.rand(2, 3, 5, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    latents = wan.encode_pixels(pixels)
    assert latents.shape == (2, 16, 2, 4, 6) and latents.dtype == torch.float32
    vae = wan.loaded.vae
    raw = vae.encode(pixels).latent_dist.mean
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    # WanPipeline's decode-side inverse (latents / (1/std) + mean) gives the raw latents back
    torch.testing.assert_close(latents / (1.0 / std) + mean, raw)
    assert wan.encode_pixels(pixels[:, :, :1]).shape == (2, 16, 1, 4, 6)  # an image is a 1-frame clip
    with pytest.raises(ValueError, match="4k\\+1"):
        wan.encode_pixels(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        wan.encode_pixels(torch.zeros(1, 3, 1, 40, 32))


def test_wan_flow_matching_against_hand_formulas(wan):
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 16, 2, 4, 4, generator=gen)
    noise = torch.randn(4, 16, 2, 4, 4, generator=gen)
    u = torch.tensor([0.0, 0.25, 0.5, 0.9])
    noisy = wan.add_noise(x0, noise, u)
    sigmas = [0.0, 0.5, 0.75, 2.7 / 2.8]  # 3u / (1 + 2u)
    torch.testing.assert_close(noisy.timesteps, torch.tensor([1000 * s for s in sigmas]))
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(noisy.model_input[i], (1 - s) * x0[i] + s * noise[i])
    torch.testing.assert_close(noisy.target, noise - x0, rtol=0, atol=0)


def test_wan_shift_from_scheduler_config(tmp_path, tiny_wan21_path):
    shifted = copy_model(tiny_wan21_path, tmp_path / "shift5")
    edit_json(shifted / "scheduler" / "scheduler_config.json", flow_shift=5.0)
    assert Wan21.load(str(shifted), torch.float32).flow_shift == 5.0

    euler = copy_model(tiny_wan21_path, tmp_path / "euler")
    edit_json(euler / "scheduler" / "scheduler_config.json", flow_shift=None, shift=7.0,
              _class_name="FlowMatchEulerDiscreteScheduler")
    family = Wan21.load(str(euler), torch.float32)
    assert family.flow_shift == 7.0
    torch.testing.assert_close(family.sigmas_from_u(torch.tensor([0.5])), torch.tensor([3.5 / 4.0]))

    absent = copy_model(tiny_wan21_path, tmp_path / "absent")
    edit_json(absent / "scheduler" / "scheduler_config.json", flow_shift=None)
    assert Wan21.load(str(absent), torch.float32).flow_shift == 3.0


def test_wan_predict_shape(wan):
    latents = torch.randn(2, 16, 2, 4, 4)
    noisy = wan.add_noise(latents, torch.randn_like(latents), torch.tensor([0.3, 0.6]))
    out = wan.predict(noisy, stack(wan.encode_prompts(["a", "b"])))
    assert out.shape == latents.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_wan_target_modules(wan):
    linear = wan.target_modules(4, 0)
    both = wan.target_modules(4, 4)
    # 2 blocks x (4 self-attention + 4 cross-attention + 2 feed-forward) Linear layers
    assert len(linear) == 20 and all(t.name.startswith("blocks.") for t in linear)
    assert all(isinstance(t.module, torch.nn.Linear) and t.group == "linear" for t in linear)
    conv = [t for t in both if t.group == "conv"]
    assert [t.name for t in conv] == ["patch_embedding"] and isinstance(conv[0].module, torch.nn.Conv3d)
    assert len(both) == 21 and [t.name for t in wan.target_modules(0, 4)] == ["patch_embedding"]
    modules = dict(wan.denoiser.named_modules())
    assert all(modules[t.name] is t.module for t in both)


def test_wan_full_size_target_counts():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**WAN21_1_3B)
    targets = wan_target_modules(transformer, 16, 0)
    assert len(targets) == 30 * 10


def test_wan_bad_folders_name_the_folder_and_the_problem(tmp_path, tiny_wan21_path, tiny_sd15_path):
    assert "'sd15'" in _folder_error(Wan21, tiny_sd15_path)

    two = copy_model(tiny_wan21_path, tmp_path / "two")
    edit_json(two / "model_index.json", transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    assert "Wan 2.2" in _folder_error(Wan21, two)

    i2v = copy_model(tiny_wan21_path, tmp_path / "i2v")
    edit_json(i2v / "transformer" / "config.json", image_dim=32, added_kv_proj_dim=24)
    assert "image-to-video" in _folder_error(Wan21, i2v)

    no_vae = copy_model(tiny_wan21_path, tmp_path / "no_vae")
    shutil.rmtree(no_vae / "vae")
    assert "vae/" in _folder_error(Wan21, no_vae)


@pytest.mark.parametrize("family_cls,fixture,frames", [(SD15, "tiny_sd15_path", 1), (Wan21, "tiny_wan21_path", 5)])
def test_bf16_weights_keep_a_float32_vae_and_float32_outputs(family_cls, fixture, frames, request):
    family = family_cls.load(str(request.getfixturevalue(fixture)), torch.bfloat16)
    assert family.denoiser.dtype == torch.bfloat16 and family.loaded.text_encoders[0].dtype == torch.bfloat16
    assert family.loaded.vae.dtype == torch.float32
    latents = family.encode_pixels(torch.rand(1, 3, frames, 32, 32) * 2 - 1)
    assert latents.dtype == torch.float32
    noisy = family.add_noise(latents, torch.randn_like(latents), torch.tensor([0.5]))
    out = family.predict(noisy, stack(family.encode_prompts(["a"])))
    assert out.dtype == torch.float32 and out.shape == latents.shape and torch.isfinite(out).all()


def test_cache_identity_tracks_vae_weights(tiny_sd15_path):
    from trainer.families.sd15 import SD15

    fam = SD15.load(str(tiny_sd15_path), dtype=torch.float32)
    a = fam.cache_identity()
    assert a == SD15.load(str(tiny_sd15_path), dtype=torch.float32).cache_identity()
    with torch.no_grad():
        next(fam.loaded.vae.parameters()).add_(0.5)  # a fine-tuned VAE with the same config
    assert fam.cache_identity() != a

"""The SDXL family on a tiny random StableDiffusionXLPipeline: checked against the diffusers pipeline itself
(prompt encoding, the UNet call with its size conditioning), ComfyUI's kohya key naming, and a short training run
through a phase transition that exports a loadable LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import tiny_sd15_path, tiny_sdxl_path  # noqa: F401
from trainer.data.training_set import TrainingSet, scan_datasets
from trainer.demo import make_images
from trainer.errors import DatasetError, JobError, ModelError
from trainer.export import delta_from_file
from trainer.families import FAMILIES, get_family
from trainer.families.base import NoisyBatch
from trainer.families.sd15 import SD15, sd15_target_modules
from trainer.families.sdxl import SDXL
from trainer.job import parse_job
from trainer.loop import train
from trainer.tiny import build_tiny_sdxl
from trainer.validation import FixedNoiseProbe
from family_helpers import edit_json, stack

CAPTIONS = ["a photo of ohwx", "ohwx on a beach, at sunset", ""]
# The UNet of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json), for structure-only checks on meta.
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Loose on purpose: the transition must come at min_steps on any machine, not hinge on a third decimal.
FAST_EXIT = {"loss_improvement_rate_below": 0.02, "min_gradient_stability": 0.3, "max_loss_cv": 1.0}


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return SDXL.load(str(tiny_sdxl_path), torch.float32)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe




def job_spec(model, data, out, steps=130, **dataset):
    return {
        "job": "xl", "output_dir": str(out),
        "model": {"family": "sdxl", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32], **dataset}],
        "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 4, "alpha_schedule": {
            "linear_alpha_phases": {"foundation": {"alpha": 4, "min_steps": 100, "exit_criteria": FAST_EXIT},
                                    "emphasis": {"alpha": 8, "min_steps": 100}}}},
        "train": {"steps": steps, "batch_size": 2, "lr": 2e-3, "seed": 5},
        "save": {"every": 1000, "resume": "none"},
    }


def comfyui_kohya_map(unet) -> dict[str, str]:
    """ComfyUI's kohya names for a diffusers UNet: weight `k` -> "lora_unet_" + k[:-7] with '.' -> '_' (the
    keys of comfy.utils.unet_to_diffusers, which covers every SD/SDXL UNet weight)."""
    return {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k
            for k in unet.state_dict() if k.endswith(".weight")}


# ---------------------------------------------------------------- registry, job file, tiny folder

def test_registered_and_validated_by_the_job_file(tmp_path):
    assert FAMILIES["sdxl"] == "sdxl:SDXL" and get_family("sdxl") is SDXL and issubclass(SDXL, SD15)
    spec = job_spec("/models/xl", tmp_path, tmp_path / "out")
    assert parse_job(spec).model.family == "sdxl"
    spec["datasets"][0]["resolution"] = [36]
    with pytest.raises(JobError) as e:
        parse_job(spec)
    assert e.value.field == "datasets[0].resolution" and "multiple of 8" in e.value.message
    spec["datasets"][0].update(resolution=[32], num_frames=5)
    with pytest.raises(JobError) as e:
        parse_job(spec)
    assert e.value.field == "datasets[0].num_frames"


def test_a_video_in_the_dataset_is_refused_naming_the_file(tmp_path):
    from tests.media import write_video

    write_video(tmp_path / "clip.mp4", num_frames=5, width=32, height=32)
    job = parse_job(job_spec("/models/xl", tmp_path, tmp_path / "out"))
    with pytest.raises(DatasetError, match="clip.mp4"):
        scan_datasets(job.datasets, SDXL, log=lambda m: None)


def test_tiny_folder_is_a_real_sdxl_pipeline(pipe, tiny_sdxl_path, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time" and pipe.vae.config.scaling_factor == 0.13025
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    other = build_tiny_sdxl(tmp_path / "other", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tiny_sdxl_path / name)), load_file(str(other / name))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(UNet2DConditionModel.from_pretrained(other, subfolder="unet"), UNet2DConditionModel)
    with pytest.raises(FileExistsError):
        build_tiny_sdxl(other)


# ---------------------------------------------------------------- loading and encoding

def test_loads_frozen_with_its_facts(sdxl):
    from diffusers import DDPMScheduler

    assert isinstance(sdxl.scheduler, DDPMScheduler) and sdxl.prediction_type == "epsilon"
    assert sdxl.resolution_factor == 8 and sdxl.vae_scale_factor == 8 and not sdxl.video
    assert len(sdxl.loaded.text_encoders) == len(sdxl.loaded.tokenizers) == 2
    for m in (sdxl.denoiser, sdxl.loaded.vae, *sdxl.loaded.text_encoders):
        assert not any(p.requires_grad for p in m.parameters())
    assert sdxl.describe() == {"family": "sdxl", "prediction_type": "epsilon", "num_train_timesteps": 1000,
                               "size_conditioning": "bucket, crop (0, 0)"}
    assert SDXL.has_conv_targets(4) and not SDXL.has_conv_targets(0)


def test_prompts_match_the_sdxl_pipeline_exactly(sdxl, pipe):
    ours = stack(sdxl.encode_prompts(CAPTIONS))
    embeds, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (3, 77, 64) and ours["text_embeds"].shape == (3, 32)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)
    # penultimate layers, both encoders: the halves are encoder 1's and encoder 2's hidden_states[-2]
    tokens = pipe.tokenizer_2(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    second = pipe.text_encoder_2(tokens.input_ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours["encoder_hidden_states"][..., 32:], second, rtol=0, atol=0)


def test_unet_call_matches_the_pipeline_with_bucket_size_conditioning(sdxl, pipe):
    """Run the pipeline for one step at 32x48 and capture its UNet call; our predict on the same sample and
    timestep must call the UNet with the same text, pooled embedding and time ids, and get the same output."""
    calls = []

    def capture(module, args, kwargs, output):
        calls.append((args, kwargs, output[0]))

    unets = (pipe.unet, sdxl.denoiser)
    hooks = [u.register_forward_hook(capture, with_kwargs=True) for u in unets]
    try:
        pipe(prompt=CAPTIONS[0], height=32, width=48, num_inference_steps=1, guidance_scale=1.0,
             output_type="latent")
        (sample, t), theirs, their_out = calls[0]
        ours_out = sdxl.predict(NoisyBatch(sample, t.reshape(1), None), stack(sdxl.encode_prompts(CAPTIONS[:1])))
        _, ours, _ = calls[1]
    finally:
        for h in hooks:
            h.remove()
    assert sample.shape == (1, 4, 4, 6)
    time_ids = theirs["added_cond_kwargs"]["time_ids"]
    assert time_ids.tolist() == [[32.0, 48.0, 0.0, 0.0, 32.0, 48.0]]  # (orig h, w, crop top, left, target h, w)
    torch.testing.assert_close(ours["added_cond_kwargs"]["time_ids"], time_ids, rtol=0, atol=0)
    torch.testing.assert_close(ours["added_cond_kwargs"]["text_embeds"], theirs["added_cond_kwargs"]["text_embeds"],
                               rtol=0, atol=0)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"], rtol=0, atol=0)
    torch.testing.assert_close(ours_out, their_out)


def test_time_ids_follow_the_batch_bucket(sdxl):
    assert sdxl.add_time_ids(128, 96).tolist() == [1024, 768, 0, 0, 1024, 768]
    latents = torch.randn(2, 4, 8, 4)
    cond = stack(sdxl.encode_prompts(CAPTIONS[:2]))
    noisy = sdxl.add_noise(latents, torch.randn_like(latents), torch.tensor([0.1, 0.9]))
    seen = []
    hook = sdxl.denoiser.register_forward_pre_hook(lambda m, a, k: seen.append(k["added_cond_kwargs"]["time_ids"]),
                                                   with_kwargs=True)
    try:
        out = sdxl.predict(noisy, cond)
    finally:
        hook.remove()
    assert out.shape == latents.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen[0].tolist() == [[64.0, 32.0, 0.0, 0.0, 64.0, 32.0]] * 2


def test_pixels_to_scaled_posterior_mean(sdxl):
    pixels = torch.rand(2, 3, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sdxl.encode_pixels(pixels)
    assert latents.shape == (2, 4, 4, 6) and latents.dtype == torch.float32
    expected = sdxl.loaded.vae.encode(pixels[:, :, 0]).latent_dist.mean * 0.13025
    torch.testing.assert_close(latents, expected)
    torch.testing.assert_close(sdxl.encode_pixels(pixels), latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sdxl: trains on still images"):
        sdxl.encode_pixels(torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="multiple of 8"):
        sdxl.encode_pixels(torch.zeros(1, 3, 1, 36, 32))


def test_latents_mean_std_vae_is_normalized_as_the_pipeline_decodes(tmp_path, tiny_sdxl_path):
    """A VAE with latents_mean/std (Playground-style SDXL): the pipeline decodes z * std / scaling + mean, so
    our latents must be (z - mean) * scaling / std."""
    folder = shutil.copytree(tiny_sdxl_path, tmp_path / "xl")
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 1.5, 1.0, 2.0]
    edit_json(folder / "vae" / "config.json", latents_mean=mean, latents_std=std)
    family = SDXL.load(str(folder), torch.float32)
    pixels = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    latents = family.encode_pixels(pixels)
    raw = family.loaded.vae.encode(pixels[:, :, 0]).latent_dist.mean
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    torch.testing.assert_close(latents * s / 0.13025 + m, raw)


def test_ddpm_objective_is_sd15s(sdxl):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    noisy = sdxl.add_noise(x0, noise, torch.tensor([0.0, 0.5, 0.9999]))
    assert noisy.timesteps.tolist() == [0, 500, 999]
    torch.testing.assert_close(noisy.model_input, reference.add_noise(x0, noise, noisy.timesteps))
    torch.testing.assert_close(noisy.target, noise, rtol=0, atol=0)


def test_v_prediction_folder(tmp_path):
    family = SDXL.load(str(build_tiny_sdxl(tmp_path / "v", prediction_type="v_prediction")), torch.float32)
    x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    noisy = family.add_noise(x0, noise, torch.tensor([0.3]))
    torch.testing.assert_close(noisy.target, family.scheduler.get_velocity(x0, noise, noisy.timesteps))


# ---------------------------------------------------------------- LoRA targets and ComfyUI names

def test_target_modules_are_kohyas_selection(sdxl):
    linear, conv = sdxl.target_modules(4, 0), sdxl.target_modules(0, 4)
    # 2 down attentions at level 1, the mid attention, 3 up attentions: 6 attentions of 2 transformer blocks
    # -> 12 blocks x 10 Linear + 6 x (proj_in, proj_out)
    assert len(linear) == 12 * 10 + 6 * 2 and {t.group for t in linear} == {"linear"}
    # 4 down + 2 mid + 6 up resnets x 2 convs + 1 downsampler + 1 upsampler
    assert len(conv) == 12 * 2 + 2 and {t.group for t in conv} == {"conv"}
    assert [t.name for t in sdxl.target_modules(4, 4)] == [t.name for t in sd15_target_modules(sdxl.denoiser, 4, 4)]


def test_full_size_sdxl_targets_and_kohya_keys():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_BASE_UNET)
    targets = sd15_target_modules(unet, 16, 8)
    assert sum(t.group == "linear" for t in targets) == 722  # the UNet module count of every kohya SDXL LoRA
    assert sum(t.group == "conv" for t in targets) == 38
    key_map = comfyui_kohya_map(unet)
    prefixes = [SDXL.export_prefix(t.name) for t in targets]
    assert len(set(prefixes)) == len(prefixes)
    assert all(key_map.get(p) == f"{t.name}.weight" for p, t in zip(prefixes, targets))
    assert "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k" in prefixes
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in prefixes


# ---------------------------------------------------------------- folder checks

def _folder_error(path) -> str:
    with pytest.raises(ModelError) as e:
        SDXL.load(str(path), torch.float32)
    assert str(path) in str(e.value)
    return str(e.value)


def test_bad_folders_name_the_folder_and_the_problem(tmp_path, tiny_sdxl_path, tiny_sd15_path):
    assert "StableDiffusionXLPipeline" in _folder_error(tiny_sd15_path)
    assert "no such folder" in _folder_error(tmp_path / "missing")
    no_te2 = shutil.copytree(tiny_sdxl_path, tmp_path / "no_te2")
    edit_json(no_te2 / "model_index.json", text_encoder_2=[None, None])
    assert "text_encoder_2" in _folder_error(no_te2)
    not_xl = shutil.copytree(tiny_sdxl_path, tmp_path / "not_xl")
    edit_json(not_xl / "unet" / "config.json", addition_embed_type=None)
    assert "text_time" in _folder_error(not_xl)
    dims = shutil.copytree(tiny_sdxl_path, tmp_path / "dims")
    edit_json(dims / "unet" / "config.json", projection_class_embeddings_input_dim=2816)
    assert "projection_class_embeddings_input_dim 2816" in _folder_error(dims)
    context = shutil.copytree(tiny_sdxl_path, tmp_path / "context")
    edit_json(context / "unet" / "config.json", cross_attention_dim=2048)
    assert "cross_attention_dim 2048" in _folder_error(context)


def test_bf16_weights_keep_a_float32_vae_and_float32_outputs(tiny_sdxl_path):
    family = SDXL.load(str(tiny_sdxl_path), torch.bfloat16)
    assert family.denoiser.dtype == torch.bfloat16 and family.loaded.vae.dtype == torch.float32
    latents = family.encode_pixels(torch.rand(1, 3, 1, 32, 32) * 2 - 1)
    noisy = family.add_noise(latents, torch.randn_like(latents), torch.tensor([0.5]))
    out = family.predict(noisy, stack(family.encode_prompts(["a"])))
    assert out.dtype == torch.float32 and out.shape == latents.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------- a training run

@pytest.mark.slow
def test_run_transitions_and_exports_comfyui_kohya_keys(tiny_sdxl_path, tmp_path):
    data = tmp_path / "images"
    make_images(data)
    job = parse_job(job_spec(tiny_sdxl_path, data, tmp_path / "out"))
    family = SDXL.load(str(tiny_sdxl_path), torch.float32)
    training_set = TrainingSet.build(job.datasets, family, seed=0,
                                     log=lambda m: None)
    probe = FixedNoiseProbe(training_set, family, items=4)
    before = probe.loss()
    result = train(job, family=family, training_set=training_set)

    assert [t["to_phase"] for t in result.transitions] == ["emphasis"]
    assert result.transitions[0]["step"] == 100  # the first step the schedule allows
    sd = load_file(str(result.lora_path))
    assert sd.keys() == result.lora_state.keys()
    modules = {t.name: t for t in family.target_modules(4, 4)}
    key_map = comfyui_kohya_map(family.denoiser)
    by_prefix = {SDXL.export_prefix(n): t for n, t in modules.items()}
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert prefixes == set(by_prefix) and prefixes <= set(key_map)
    for prefix in prefixes:
        assert {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"} <= sd.keys()
        assert sd[f"{prefix}.alpha"].item() == (8.0 if by_prefix[prefix].group == "linear" else 4.0)
    assert len(sd) == 3 * len(modules)

    # merged the ComfyUI way (W += alpha / rank * up @ down), the file lowers the fixed-noise loss
    with torch.no_grad():
        for prefix, delta in delta_from_file(result.lora_path).items():
            weight = by_prefix[prefix].module.weight
            weight += delta.reshape(weight.shape).to(weight.dtype)
    after = probe.loss()
    assert after < 0.95 * before, (before, after)


# ---------------------------------------------------------------- real ComfyUI (COMFYUI_ROOT only)

def exported_lora(family, path, seed: int = 1) -> None:
    """A LoRA as training leaves it: the family's targets, alphas moved off the rank, non-zero up weights,
    written by trainer.export (the same save_lora the loop calls)."""
    from trainer.export import save_lora
    from trainer.lora import LoRANetwork

    network = LoRANetwork(family.target_modules(4, 4), linear_rank=4, linear_alpha=4, conv_rank=4, conv_alpha=4)
    network.set_alphas({"linear": 2.5, "conv": 7.0})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.lora.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=gen) * 0.1)
    save_lora(path, network, family, metadata={})


@pytest.mark.comfyui
@pytest.mark.slow
def test_real_comfyui_loads_every_exported_key(tmp_path):
    """ComfyUI detects SDXL-class UNets only at model_channels 320, context 2048, adm 2816 and a known depth
    list; Segmind Vega's ([0, 0, 1, 1, 2, 2]) at 320 channels on every level is the smallest: 115 M
    parameters. The probe renames the diffusers UNet with ComfyUI's own unet_to_diffusers map, loads it, applies
    our file with the stock LoRA loader, and reports what it patched (~25 s on 2 CPU cores)."""
    from diffusers import UNet2DConditionModel

    from tests.e2e import comfy_env
    from trainer.families.base import LoadedModel
    from tests.e2e.tiny_models import save_safetensors

    comfy_env.require_comfyui()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 320, 320),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=5,
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ).eval()
    model_file = save_safetensors(unet.state_dict(), tmp_path / "sdxl_unet.safetensors")
    lora_file = tmp_path / "lora.safetensors"
    exported_lora(SDXL(LoadedModel(denoiser=unet)), lora_file)
    del unet
    (result,) = comfy_env.probe_many(model_file, [lora_file], dump_dir=tmp_path, diffusers_unet=True)

    assert result["model_class"] == "SDXL" and result["model_config"] == "Segmind_Vega"
    assert result["model_missing"] == [] and result["model_unexpected"] == []
    assert result["not_loaded"] == [] and result["not_patched"] == [] and result["changed_without_patch"] == []
    expected = delta_from_file(lora_file)
    assert len(expected) == 192 + 38 and sorted(result["lora_targets"]) == sorted(expected)
    assert result["patches_applied"] == len(expected)
    deltas = load_file(result["deltas_file"])
    for prefix, want in expected.items():
        got = deltas[result["lora_targets"][prefix]].double()
        assert float((got - want.reshape(got.shape)).abs().max()) <= 1e-6, prefix

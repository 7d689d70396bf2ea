"""The FLUX.1 family on tiny random FluxPipelines (dev and schnell): checked against the diffusers pipeline and
scheduler themselves (prompt encoding, packing, ids, the transformer call, the resolution-dependent shift),
against ComfyUI's Flux LoRA key map (transcribed from comfy.utils.flux_to_diffusers, so no ComfyUI is needed),
and by a short training run through a phase transition that exports the LoRA."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import tiny_flux_path, tiny_flux_schnell_path, tiny_sdxl_path  # noqa: F401
from trainer.data.training_set import TrainingSet
from trainer.demo import make_images
from trainer.errors import JobError, ModelError
from trainer.export import delta_from_file
from trainer.families import FAMILIES, get_family
from trainer.families.base import NoisyBatch
from trainer.families.flux import Flux, flux_target_modules, latent_image_ids, pack_latents, unpack_latents
from trainer.job import parse_job
from trainer.loop import train
from trainer.tiny import build_tiny_flux
from trainer.validation import FixedNoiseProbe
from family_helpers import edit_json, stack

CAPTIONS = ["a photo of ohwx", "ohwx on a beach, at sunset", ""]
# black-forest-labs/FLUX.1-dev transformer/config.json, for structure-only checks on the meta device.
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=(16, 56, 56))
FAST_EXIT = {"loss_improvement_rate_below": 0.02, "min_gradient_stability": 0.3, "max_loss_cv": 1.0}

# ComfyUI's Flux LoRA key map, transcribed from comfy/utils.py flux_to_diffusers (v0.8.0): the diffusers weight
# names it lists, per double block ("transformer_blocks.{i}."), per single block ("single_transformer_blocks.{i}.")
# and at the top level. comfy/lora.py model_lora_keys_unet turns each `<name>.weight` into the LoRA key
# "transformer.<name>".
COMFY_DOUBLE = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_out.0", "norm1.linear", "norm1_context.linear", "attn.to_add_out", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "attn.norm_q", "attn.norm_k",
                "attn.norm_added_q", "attn.norm_added_k"]
COMFY_SINGLE = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out", "attn.norm_q",
                "attn.norm_k"]
COMFY_TOP = ["proj_out", "x_embedder", "time_text_embed.timestep_embedder.linear_1",
             "time_text_embed.timestep_embedder.linear_2", "context_embedder", "time_text_embed.text_embedder.linear_1",
             "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
             "time_text_embed.guidance_embedder.linear_2", "norm_out.linear", "controlnet_x_embedder"]


def comfyui_flux_lora_keys(transformer) -> dict[str, str]:
    """{LoRA key prefix ComfyUI accepts: diffusers module it stands for}, with the block counts read from the
    model as ComfyUI reads them (count_blocks over the state dict)."""
    names = {n for n, _ in transformer.named_modules()}
    depth = sum(f"transformer_blocks.{i}" in names for i in range(len(names)))
    single = sum(f"single_transformer_blocks.{i}" in names for i in range(len(names)))
    modules = [f"transformer_blocks.{i}.{k}" for i in range(depth) for k in COMFY_DOUBLE]
    modules += [f"single_transformer_blocks.{i}.{k}" for i in range(single) for k in COMFY_SINGLE]
    modules += COMFY_TOP
    return {"transformer." + m: m for m in modules}


@pytest.fixture(scope="module")
def flux(tiny_flux_path):
    return Flux.load(str(tiny_flux_path), torch.float32)


@pytest.fixture(scope="module")
def pipe(tiny_flux_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe




def job_spec(model, data, out, steps=130, **dataset):
    return {
        "job": "fx", "output_dir": str(out),
        "model": {"family": "flux", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32], **dataset}],
        "network": {"linear": 4, "linear_alpha": 4, "alpha_schedule": {
            "linear_alpha_phases": {"foundation": {"alpha": 4, "min_steps": 100, "exit_criteria": FAST_EXIT},
                                    "emphasis": {"alpha": 8, "min_steps": 100}}}},
        "train": {"steps": steps, "batch_size": 2, "lr": 2e-3, "seed": 5},
        "save": {"every": 1000, "resume": "none"},
    }


# ---------------------------------------------------------------- registry, job file, tiny folders

def test_registered_and_validated_by_the_job_file(tmp_path):
    assert FAMILIES["flux"] == "flux:Flux" and get_family("flux") is Flux
    spec = job_spec("/models/flux", tmp_path, tmp_path / "out")
    assert parse_job(spec).model.family == "flux"
    for field, value, words in (("resolution", [40], "multiple of 16"), ("num_frames", 5, "still images")):
        bad = json.loads(json.dumps(spec))
        bad["datasets"][0][field] = value
        with pytest.raises(JobError) as e:
            parse_job(bad)
        assert e.value.field == f"datasets[0].{field}" and words in e.value.message
    conv = json.loads(json.dumps(spec))
    conv["network"].update(conv=4, conv_alpha=4)
    conv["network"]["alpha_schedule"] = {"conv_alpha_phases": spec["network"]["alpha_schedule"]["linear_alpha_phases"]}
    with pytest.raises(JobError, match="no conv layers"):
        parse_job(conv)


def test_tiny_folders_are_real_flux_pipelines(pipe, tiny_flux_schnell_path, tmp_path):
    from diffusers import FluxPipeline

    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.1159
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.tokenizer_2.model_max_length == 512
    schnell = FluxPipeline.from_pretrained(tiny_flux_schnell_path)
    assert not schnell.transformer.config.guidance_embeds and not schnell.scheduler.config.use_dynamic_shifting
    with pytest.raises(ValueError, match="variant"):
        build_tiny_flux(tmp_path / "x", variant="pro")


# ---------------------------------------------------------------- loading and encoding

def test_loads_frozen_with_its_facts(flux, tiny_flux_schnell_path):
    assert flux.resolution_factor == 16 and not flux.video and flux.variant == "dev"
    assert not Flux.has_conv_targets(4) and Flux.valid_num_frames(1) and not Flux.valid_num_frames(5)
    for m in (flux.denoiser, flux.loaded.vae, *flux.loaded.text_encoders):
        assert not any(p.requires_grad for p in m.parameters())
    assert flux.describe() == {"family": "flux", "variant": "dev", "guidance_scale": 1.0,
                               "shift": "dynamic exponential mu(256..4096 tokens -> 0.5..1.15)",
                               "max_sequence_length": 512}
    schnell = Flux.load(str(tiny_flux_schnell_path), torch.float32)
    assert schnell.describe() == {"family": "flux", "variant": "schnell", "guidance_scale": None, "shift": 1.0,
                                  "max_sequence_length": 512}


def test_prompts_match_the_flux_pipeline(flux, pipe):
    ours = stack(flux.encode_prompts(CAPTIONS))
    embeds, pooled, text_ids = pipe.encode_prompt(CAPTIONS, CAPTIONS, device="cpu", max_sequence_length=512)
    assert ours["encoder_hidden_states"].shape == (3, 512, 32) and ours["pooled_projections"].shape == (3, 32)
    torch.testing.assert_close(ours["pooled_projections"], pooled, rtol=0, atol=0)
    # float32 round-off only: the pipeline runs T5 with autograd on, which may pick other kernels
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds)
    assert text_ids.shape == (512, 3) and not text_ids.any()
    # no attention mask, as the pipeline: padding positions carry T5's outputs for <pad>, not zeros
    assert ours["encoder_hidden_states"][2, -1].abs().sum() > 0


def test_shorter_t5_length_and_guidance_by_option(tiny_flux_path):
    family = Flux.load(str(tiny_flux_path), torch.float32, max_sequence_length=64, guidance_scale=3.5)
    (cond,) = family.encode_prompts(["a long caption " * 20])
    assert cond["encoder_hidden_states"].shape == (64, 32)
    assert family.describe()["guidance_scale"] == 3.5
    for bad in (dict(max_sequence_length=0), dict(guidance_scale=float("nan")), dict(guidance_scale=-1.0)):
        with pytest.raises(ModelError, match=next(iter(bad))):
            Flux.load(str(tiny_flux_path), torch.float32, **bad)


def test_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    for h, w in ((4, 4), (4, 6), (8, 2)):
        latents = torch.randn(2, 16, h, w)
        packed = pack_latents(latents)
        torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, h, w), rtol=0, atol=0)
        assert packed.shape == (2, h * w // 4, 64)
        torch.testing.assert_close(unpack_latents(packed, h, w), latents, rtol=0, atol=0)
        # the pipeline unpacks from pixel sizes (latent x 8)
        torch.testing.assert_close(unpack_latents(packed, h, w),
                                   FluxPipeline._unpack_latents(packed, h * 8, w * 8, 8), rtol=0, atol=0)
        torch.testing.assert_close(latent_image_ids(h // 2, w // 2),
                                   FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32),
                                   rtol=0, atol=0)


def test_pixels_to_shifted_scaled_posterior_mean(flux):
    pixels = torch.rand(2, 3, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = flux.encode_pixels(pixels)
    assert latents.shape == (2, 16, 4, 6) and latents.dtype == torch.float32
    raw = flux.loaded.vae.encode(pixels[:, :, 0]).latent_dist.mean
    torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611)
    torch.testing.assert_close(latents / 0.3611 + 0.1159, raw)  # FluxPipeline's decode-side inverse
    with pytest.raises(ValueError, match="flux: trains on still images"):
        flux.encode_pixels(torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        flux.encode_pixels(torch.zeros(1, 3, 1, 40, 32))


# ---------------------------------------------------------------- objective

def test_dev_sigmas_are_the_schedulers_resolution_dependent_shift(flux, tiny_flux_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_path, subfolder="scheduler")
    u = [0.95, 0.7, 0.5, 0.25, 0.05]
    for seq_len in (4, 256, 1024, 4096):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        assert flux.mu(seq_len) == pytest.approx(mu, rel=1e-12)
        scheduler.set_timesteps(sigmas=u, mu=mu)
        torch.testing.assert_close(flux.sigmas_from_u(torch.tensor(u), seq_len), scheduler.sigmas[:-1])
    # FLUX.1-dev at 1024x1024: 4096 tokens, mu = max_shift = 1.15
    assert flux.sigmas_from_u(torch.tensor([0.5]), 4096).item() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1))
    assert flux.sigmas_from_u(torch.tensor([0.0, 1.0]), 1024).tolist() == [0.0, 1.0]


def test_schnell_sigma_is_the_static_shift(tiny_flux_schnell_path, tmp_path):
    schnell = Flux.load(str(tiny_flux_schnell_path), torch.float32)
    u = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(schnell.sigmas_from_u(u, 4096), u)
    shifted = shutil.copytree(tiny_flux_schnell_path, tmp_path / "shift3")
    edit_json(shifted / "scheduler" / "scheduler_config.json", shift=3.0)
    torch.testing.assert_close(Flux.load(str(shifted), torch.float32).sigmas_from_u(u, 16), 3 * u / (1 + 2 * u))


def test_linear_time_shift_type(tiny_flux_path, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = shutil.copytree(tiny_flux_path, tmp_path / "linear")
    edit_json(folder / "scheduler" / "scheduler_config.json", time_shift_type="linear")
    family = Flux.load(str(folder), torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=[0.8, 0.3], mu=family.mu(1024))
    torch.testing.assert_close(family.sigmas_from_u(torch.tensor([0.8, 0.3]), 1024), scheduler.sigmas[:-1])


def test_flow_matching_against_hand_formulas(flux):
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 16, 4, 6, generator=gen), torch.randn(3, 16, 4, 6, generator=gen)
    u = torch.tensor([0.0, 0.5, 0.9])
    noisy = flux.add_noise(x0, noise, u)
    shift = math.exp(flux.mu(6))  # 4x6 latents -> 2x3 = 6 packed tokens
    sigmas = [shift * x / (1 + (shift - 1) * x) for x in u.tolist()]
    torch.testing.assert_close(noisy.timesteps, torch.tensor(sigmas))  # Flux takes t in [0, 1]: sigma itself
    for i, s in enumerate(sigmas):
        torch.testing.assert_close(noisy.model_input[i], (1 - s) * x0[i] + s * noise[i])
    torch.testing.assert_close(noisy.target, noise - x0, rtol=0, atol=0)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.5])
def test_transformer_call_matches_the_pipeline(tiny_flux_path, pipe, guidance_scale):
    """Run FluxPipeline for one step at 32x48 from known latents and capture its transformer call; our predict on
    the same (unpacked) latents and sigma must pass the same tensors and return the pipeline's output unpacked."""
    family = Flux.load(str(tiny_flux_path), torch.float32, guidance_scale=guidance_scale)
    latents = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))
    calls = []

    def capture(module, args, kwargs, output):
        calls.append((kwargs, output[0]))

    hooks = [m.register_forward_hook(capture, with_kwargs=True) for m in (pipe.transformer, family.denoiser)]
    try:
        pipe(prompt=CAPTIONS[1], height=32, width=48, num_inference_steps=1, guidance_scale=guidance_scale,
             output_type="latent", latents=pack_latents(latents))
        theirs, their_out = calls[0]
        ours_out = family.predict(NoisyBatch(latents, theirs["timestep"].clone(), None),
                                  stack(family.encode_prompts(CAPTIONS[1:2])))
        ours, _ = calls[1]
    finally:
        for h in hooks:
            h.remove()
    assert theirs["timestep"].tolist() == [1.0]  # one step starts at sigma 1: t = 1000, passed as t / 1000
    assert theirs["guidance"].tolist() == [guidance_scale]
    for key in ("hidden_states", "timestep", "guidance", "pooled_projections", "txt_ids", "img_ids"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(ours["encoder_hidden_states"], theirs["encoder_hidden_states"])
    assert ours_out.shape == latents.shape and ours_out.dtype == torch.float32
    torch.testing.assert_close(ours_out, unpack_latents(their_out, 4, 6))


def test_schnell_passes_no_guidance(tiny_flux_schnell_path):
    family = Flux.load(str(tiny_flux_schnell_path), torch.float32)
    seen = []
    hook = family.denoiser.register_forward_pre_hook(lambda m, a, k: seen.append(k["guidance"]), with_kwargs=True)
    latents = torch.randn(2, 16, 2, 2)
    try:
        out = family.predict(family.add_noise(latents, torch.randn_like(latents), torch.tensor([0.2, 0.7])),
                             stack(family.encode_prompts(["a", "b"])))
    finally:
        hook.remove()
    assert seen == [None] and out.shape == latents.shape
    with pytest.raises(ValueError, match="even"):
        family.predict(NoisyBatch(torch.randn(1, 16, 3, 4), torch.tensor([0.5]), None),
                       stack(family.encode_prompts(["a"])))


# ---------------------------------------------------------------- LoRA targets and ComfyUI names

def test_target_modules_are_the_block_linears(flux):
    targets = flux.target_modules(4, 4)
    # 1 double block x 14 + 2 single blocks x 6; no conv group, whatever the conv rank
    assert len(targets) == 14 + 2 * 6 and {t.group for t in targets} == {"linear"}
    assert flux.target_modules(0, 4) == []
    modules = dict(flux.denoiser.named_modules())
    assert all(modules[t.name] is t.module and isinstance(t.module, torch.nn.Linear) for t in targets)
    names = {t.name for t in targets}
    assert {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn.to_add_out",
            "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.0.norm.linear"} <= names
    assert not any(n.startswith(("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"))
                   for n in names)


def test_tiny_export_keys_are_in_comfyuis_flux_map(flux):
    accepted = comfyui_flux_lora_keys(flux.denoiser)
    modules = {n for n, _ in flux.denoiser.named_modules()}
    assert set(accepted.values()) - modules <= {"controlnet_x_embedder"}  # the transcription names real modules
    for target in flux.target_modules(4, 0):
        key = Flux.export_prefix(target.name)
        assert key == "transformer." + target.name and accepted.get(key) == target.name


def test_full_size_flux_targets_and_keys():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX1_DEV)
    targets = flux_target_modules(transformer, 16)
    assert len(targets) == 19 * 14 + 38 * 6 == 494  # ai-toolkit's FLUX.1 LoRA module count
    accepted = comfyui_flux_lora_keys(transformer)
    keys = [Flux.export_prefix(t.name) for t in targets]
    assert len(set(keys)) == len(keys) and all(accepted.get(k) == t.name for k, t in zip(keys, targets))
    assert "transformer.single_transformer_blocks.37.proj_mlp" in keys
    # ComfyUI's map knows every Linear of the model (filters may widen the targets), and each has its export name
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(accepted.get("transformer." + n) == n for n in linears)
    assert all(Flux.export_prefix(n) == "transformer." + n for n in linears)


@pytest.mark.parametrize("name", ["norm_out", "transformer_blocks.0.attn.norm_q", "transformer_blocks.x.attn.to_q",
                                  "single_transformer_blocks.0.attn.to_out.0", "transformer.transformer_blocks.0.attn.to_q",
                                  "blocks.0.attn1.to_q", ""])
def test_names_outside_comfyuis_map_raise(name):
    with pytest.raises(ModelError, match="no key"):
        Flux.export_prefix(name)


# ---------------------------------------------------------------- folder checks

def _folder_error(path) -> str:
    with pytest.raises(ModelError) as e:
        Flux.load(str(path), torch.float32)
    assert str(path) in str(e.value)
    return str(e.value)


def test_bad_folders_name_the_folder_and_the_problem(tmp_path, tiny_flux_path, tiny_sdxl_path):
    assert "FluxPipeline" in _folder_error(tiny_sdxl_path)
    fill = shutil.copytree(tiny_flux_path, tmp_path / "fill")
    edit_json(fill / "transformer" / "config.json", in_channels=384)
    assert "in_channels 384" in _folder_error(fill)
    t5 = shutil.copytree(tiny_flux_path, tmp_path / "t5")
    edit_json(t5 / "transformer" / "config.json", joint_attention_dim=4096)
    assert "joint_attention_dim 4096" in _folder_error(t5)
    karras = shutil.copytree(tiny_flux_path, tmp_path / "karras")
    edit_json(karras / "scheduler" / "scheduler_config.json", use_karras_sigmas=True)
    assert "use_karras_sigmas" in _folder_error(karras)
    no_t5 = shutil.copytree(tiny_flux_path, tmp_path / "no_t5")
    edit_json(no_t5 / "model_index.json", text_encoder_2=[None, None])
    assert "text_encoder_2" in _folder_error(no_t5)


def test_bf16_weights_keep_a_float32_vae_and_float32_outputs(tiny_flux_path):
    family = Flux.load(str(tiny_flux_path), torch.bfloat16)
    assert family.denoiser.dtype == torch.bfloat16 and family.loaded.vae.dtype == torch.float32
    latents = family.encode_pixels(torch.rand(1, 3, 1, 32, 32) * 2 - 1)
    assert latents.dtype == torch.float32
    noisy = family.add_noise(latents, torch.randn_like(latents), torch.tensor([0.5]))
    out = family.predict(noisy, stack(family.encode_prompts(["a"])))
    assert out.dtype == torch.float32 and out.shape == latents.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------- a training run

@pytest.mark.slow
def test_run_transitions_and_exports_comfyui_flux_keys(tiny_flux_path, tmp_path):
    data = tmp_path / "images"
    make_images(data)
    job = parse_job(job_spec(tiny_flux_path, data, tmp_path / "out"))
    family = Flux.load(str(tiny_flux_path), torch.float32)
    training_set = TrainingSet.build(job.datasets, family, seed=0,
                                     log=lambda m: None)
    probe = FixedNoiseProbe(training_set, family, items=4)
    before = probe.loss()
    result = train(job, family=family, training_set=training_set)

    assert [t["to_phase"] for t in result.transitions] == ["emphasis"]
    assert result.transitions[0]["step"] == 100  # the first step the schedule allows
    sd = load_file(str(result.lora_path))
    assert sd.keys() == result.lora_state.keys()
    accepted = comfyui_flux_lora_keys(family.denoiser)
    targets = {Flux.export_prefix(t.name): t for t in family.target_modules(4, 0)}
    prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert prefixes == set(targets) and prefixes <= set(accepted)
    for prefix in prefixes:
        assert {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"} <= sd.keys()
        assert sd[f"{prefix}.alpha"].item() == 8.0
    assert len(sd) == 3 * len(targets) == 3 * 26

    with torch.no_grad():
        for prefix, delta in delta_from_file(result.lora_path).items():
            weight = targets[prefix].module.weight
            weight += delta.reshape(weight.shape).to(weight.dtype)
    after = probe.loss()
    assert after < 0.95 * before, (before, after)


# ---------------------------------------------------------------- real ComfyUI (COMFYUI_ROOT only)

@pytest.mark.comfyui
@pytest.mark.slow
def test_real_comfyui_loads_every_exported_key(tmp_path):
    """ComfyUI builds Flux with 24 heads of 128 (axes 16 + 56 + 56), so the width must be 3072; depth, text and
    pooled widths are read from the weights. One double and one single block: 531 M parameters, a 2.1 GB
    float32 file; ComfyUI converts the diffusers state dict itself (convert_diffusers_mmdit), then the stock
    LoRA loader applies our file (~90 s and ~8 GB of memory on 2 CPU cores). q/k/v (and proj_mlp in single
    blocks) land in slices of the fused qkv / linear1 weights: 20 LoRA modules patch 13 weights."""
    from diffusers import FluxTransformer2DModel

    from tests.e2e import comfy_env
    from tests.e2e.tiny_models import save_safetensors
    from trainer.export import save_lora
    from trainer.families.base import LoadedModel
    from trainer.lora import LoRANetwork

    comfy_env.require_comfyui()
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
    transformer = transformer.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02, generator=gen)
    model_file = save_safetensors(transformer.state_dict(), tmp_path / "flux.safetensors")
    network = LoRANetwork(Flux(LoadedModel(denoiser=transformer)).target_modules(4, 4), linear_rank=4,
                          linear_alpha=4, conv_rank=4, conv_alpha=4)
    network.set_alphas({"linear": 2.5, "conv": 7.0})
    with torch.no_grad():
        for m in network.lora.values():
            m.up.weight.normal_(0, 0.1, generator=gen)
    lora_file = save_lora(tmp_path / "lora.safetensors", network, Flux(LoadedModel(denoiser=transformer)), {})
    del transformer, network
    (result,) = comfy_env.probe_many(model_file, [lora_file], dump_dir=tmp_path)

    assert result["model_class"] == "Flux" and result["unet_config"]["guidance_embed"]
    assert result["model_missing"] == [] and result["model_unexpected"] == []
    assert result["not_loaded"] == [] and result["not_patched"] == [] and result["changed_without_patch"] == []
    expected = delta_from_file(lora_file)
    assert len(expected) == 20 and sorted(result["lora_targets"]) == sorted(expected)
    assert result["patches_applied"] == 13
    deltas = load_file(result["deltas_file"])
    covered = {}
    for prefix, want in expected.items():
        target = result["lora_targets"][prefix]
        if isinstance(target, list):  # [fused weight, [dim, start, size]]
            key, (dim, start, size) = target
            got = deltas[key].double().narrow(dim, start, size)
        else:
            key, size = target, want.shape[0]
            got = deltas[key].double()
        covered[key] = covered.get(key, 0) + size
        assert float((got - want).abs().max()) <= 1e-6, prefix
    assert all(covered[k] == deltas[k].shape[0] for k in covered)  # q, k, v (+ mlp) fill each fused weight

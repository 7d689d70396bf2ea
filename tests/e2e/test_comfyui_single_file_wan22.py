"""Wan 2.2 with real ComfyUI (COMFYUI_ROOT-gated; the conversions themselves are CI-tested in
tests/test_single_file_wan22.py).

1. The Wan 2.2 VAE: a small one built with ComfyUI's own class and saved as a ComfyUI VAE file is loaded by
   ComfyUI (comfy.sd.VAE, as VAELoader; ComfyUI fixes the released widths, so the runner script makes that one
   construction take the tiny widths) and encodes clips through the wan22_5b adapter; the library loads the same
   file (single_file.load_wan22_vae_file) into the TI2V-5B family, whose latents and first-frame latents must agree.
2. Wan 2.2 expert files (A14B T2V / I2V pairs, TI2V-5B) loaded as single files: the LoRAs the family exports per
   expert load in ComfyUI on the expert files with every key applied (0 not loaded).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e import comfy_env

SCRIPT = Path(__file__).with_name("comfy_wan22_vae_encode.py")


def test_comfyui_wan22_vae_latents_equal_the_ti2v_family_latents(tmp_path):
    root, python = comfy_env.require_comfyui()
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 9, 32, 64) * 2 - 1  # two 9-frame clips in [-1, 1]
    save_file({"pixels": pixels}, str(tmp_path / "pixels.safetensors"))
    run = subprocess.run([str(python), str(SCRIPT), str(tmp_path), str(tmp_path / "pixels.safetensors")],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "vae2_2 WanVAE" in run.stdout and "latent_channels 48" in run.stdout, run.stdout
    comfy = load_file(str(tmp_path / "comfy_latents.safetensors"))

    from trainer.families.base import LoadedModel
    from trainer.families.single_file import load_wan22_vae_file
    from trainer.families.wan22_5b import Wan22TI2V

    vae = load_wan22_vae_file(tmp_path / "wan22_vae.safetensors")
    assert (vae.config.base_dim, vae.config.decoder_base_dim) == (8, 12)
    family = Wan22TI2V(LoadedModel(denoiser=torch.nn.Identity(), vae=vae, extra={"dtype": torch.float32}))
    ours = family.encode_pixels(pixels, i2v=True)
    assert ours["latents"].shape == comfy["latents"].shape == (2, 48, 3, 2, 4)
    assert ours["first_frame_latents"].shape == comfy["first_frame"].shape == (2, 48, 1, 2, 4)
    # the adapter's normalization is ComfyUI's own Wan22 latent format's (the statistics of the shipped config)
    assert torch.allclose(comfy["latents"], comfy["process_in"], atol=1e-6)
    for key, theirs in (("latents", comfy["latents"]), ("first_frame_latents", comfy["first_frame"])):
        diff = (ours[key] - theirs).abs().max().item()
        print(f"{key}: max |comfy - diffusers| {diff:.3e} (std {ours[key].std().item():.3f})")
        assert diff < 1e-4 * max(1.0, ours[key].abs().max().item()), (key, diff)
        assert ours[key].std() > 0.05  # not a degenerate encoding


class _NotEncoding:
    """Encoders for a test that only exports: the families must not encode anything here."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("no encoding expected")


@pytest.mark.parametrize("family_name, channels", [("wan22_14b", 16), ("wan22_14b_i2v", 36), ("wan22_5b", 48)])
def test_loras_of_wan22_single_files_load_in_comfyui_on_the_files(family_name, channels, tmp_path):
    comfy_env.require_comfyui()
    from tests.e2e.tiny_models import save_safetensors, wan_native_state_dict
    from tests.test_family_wan_i2v import comfyui_sized_wan, probe_family_export_in_comfyui
    from trainer.comfy_encoders import ExternalEncoders
    from trainer.families.single_file import load_single_file

    out = 48 if channels == 48 else 16
    experts = [comfyui_sized_wan(seed, channels, out) for seed in ((0, 1) if family_name != "wan22_5b" else (0,))]
    files = []
    for expert, model in zip(("high_noise", "low_noise"), experts):
        kind = "i2v" if channels == 36 else "t2v"
        name = f"wan2.2_{kind}_{expert}_tiny.safetensors" if len(experts) == 2 else "wan2.2_ti2v_tiny.safetensors"
        files.append(save_safetensors(wan_native_state_dict(model), tmp_path / name))
    encoders = ExternalEncoders(encode_prompts=_NotEncoding(), encode_pixels=_NotEncoding(), identity="export-only")
    family = load_single_file(files[0], torch.float32, config=dict(experts[0].config), family=family_name,
                              encoders=encoders, low_noise_path=files[1] if len(files) == 2 else None)
    assert family.name == family_name
    if len(files) == 1:
        result, worst = probe_family_export_in_comfyui(family, family.denoiser, tmp_path, family_name)
        print(family_name, result["model_config"], result["patches_applied"], "patches, worst", worst)
        return
    for expert in ("high_noise", "low_noise"):
        module = family.experts[expert]
        result, worst = probe_family_export_in_comfyui(family, module, tmp_path, f"{family_name}_{expert}",
                                                       expert=expert)
        print(family_name, expert, result["model_config"], result["patches_applied"], "patches, not loaded",
              len(result["not_loaded"]), "worst", worst)


# ---------------------------------------------------------------------------------------------- a graph of files

from tests.e2e.test_comfyui_single_file import (  # noqa: E402,F401  (the tiny umt5 / Wan 2.1 VAE ComfyUI setup)
    _graph,
    _losses,
    _start,
    _with_defaults,
    models,
)

HIGH_FILE, LOW_FILE = "wan2.2_t2v_high_noise_tiny.safetensors", "wan2.2_t2v_low_noise_tiny.safetensors"
A14B_FOLDER = "tiny-wan22-a14b-diffusers"


def test_graph_of_an_a14b_expert_pair_trains_like_the_diffusers_folder(models):
    """Load Training Model (ComfyUI file) with model_file = the high-noise expert and low_noise_file = the
    low-noise one, ComfyUI's CLIP and VAE: the same loss curve as the A14B diffusers folder of the same weights,
    and both expert LoRAs load on their expert files in ComfyUI with 0 keys not loaded."""
    import json
    import shutil

    from tests.e2e.tiny_models import save_safetensors, tiny_wan_transformer, wan_native_state_dict

    base = models["base"]
    high, low = tiny_wan_transformer(seed=10), tiny_wan_transformer(seed=11)
    for model, name in ((high, HIGH_FILE), (low, LOW_FILE)):
        save_safetensors(wan_native_state_dict(model), base / "models" / "diffusion_models" / name)
    folder = base / "models" / "diffusers" / A14B_FOLDER
    shutil.copytree(models["folder"], folder)
    shutil.rmtree(folder / "transformer")
    high.save_pretrained(folder / "transformer")
    low.save_pretrained(folder / "transformer_2")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875)
    (folder / "model_index.json").write_text(json.dumps(index))

    file_model = {"class_type": "PhaseTrainerLoadModelFile", "inputs": {
        "model_file": f"diffusion_models/{HIGH_FILE}", "low_noise_file": f"diffusion_models/{LOW_FILE}",
        "dtype": "fp32", "config": str(folder / "transformer" / "config.json")}}
    folder_model = {"class_type": "PhaseTrainerLoadModel", "inputs": {
        "family": "wan22_14b", "diffusers_folder": A14B_FOLDER, "dtype": "fp32"}}
    with _start(models) as server:
        info = server.object_info()
        options = info["PhaseTrainerLoadModelFile"]["input"]["optional"]["low_noise_file"]
        assert f"diffusion_models/{LOW_FILE}" in json.dumps(options)
        server.run_prompt(_with_defaults(_graph(file_model, job="a14b_files", encoders=True), info), timeout=900)
        server.run_prompt(_with_defaults(_graph(folder_model, job="a14b_folder", encoders=False), info),
                          timeout=900)
    files_curve, folder_curve = _losses(base, "a14b_files"), _losses(base, "a14b_folder")
    print("A14B loss from ComfyUI files:", files_curve)
    print("A14B loss from diffusers folder:", folder_curve)
    worst = max(abs(a - b) for a, b in zip(files_curve, folder_curve))
    print(f"max |loss difference| {worst:.3e}")
    assert len(files_curve) == len(folder_curve) == 6 and worst < 1e-4 * max(1.0, max(folder_curve)), worst
    loras = base / "models" / "loras"
    for expert, model_file in (("high_noise", HIGH_FILE), ("low_noise", LOW_FILE)):
        (lora,) = [p for p in loras.glob(f"a14b_files*_{expert}.safetensors") if "_step" not in p.name]
        result = comfy_env.probe(base / "models" / "diffusion_models" / model_file, lora)
        print(expert, lora.name, result["model_config"], result["patches_applied"], "patches,",
              len(result["not_loaded"]), "not loaded")
        assert result["not_loaded"] == [] and result["not_patched"] == [] and result["patches_applied"] > 0

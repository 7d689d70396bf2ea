"""ComfyUI's VAE through trainer.comfy_encoders gives exactly the latents the Wan 2.1 family's diffusers path
gives (COMFYUI_ROOT-gated; the conversion functions themselves are tested in tests/test_single_file.py).

A small Wan 2.1 VAE is built with ComfyUI's own WanVAE class and saved as a ComfyUI VAE file; ComfyUI loads it
(comfy.sd.VAE, as VAELoader) and encodes a clip through the adapter; the library loads the same file with
diffusers' converter (single_file.load_wan_vae_file) and encodes the clip as WanPipeline would (posterior mode,
(z - mean) / std). The two must agree within float32 tolerance."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.e2e import comfy_env

SCRIPT = Path(__file__).with_name("comfy_vae_encode.py")


def test_comfyui_vae_latents_equal_the_family_latents(tmp_path):
    root, python = comfy_env.require_comfyui()
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 9, 32, 48) * 2 - 1  # two 9-frame clips in [-1, 1]
    save_file({"pixels": pixels}, str(tmp_path / "pixels.safetensors"))
    run = subprocess.run([str(python), str(SCRIPT), str(tmp_path), str(tmp_path / "pixels.safetensors")],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    comfy = load_file(str(tmp_path / "comfy_latents.safetensors"))["latents"]

    from trainer.families.base import LoadedModel
    from trainer.families.single_file import load_wan_vae_file
    from trainer.families.wan21 import Wan21

    vae = load_wan_vae_file(tmp_path / "wan_vae.safetensors")
    family = Wan21(LoadedModel(denoiser=torch.nn.Identity(), vae=vae, extra={"dtype": torch.float32}))
    ours = family.encode_pixels(pixels)
    assert ours.shape == comfy.shape == (2, 16, 3, 4, 6)
    diff = (ours - comfy).abs().max().item()
    print(f"max |comfy - diffusers| latent difference {diff:.3e} (latent std {ours.std().item():.3f})")
    assert diff < 1e-4 * max(1.0, ours.abs().max().item()), diff
    assert ours.std() > 0.05  # not a degenerate encoding


def test_load_model_file_node_lists_comfyui_model_files(tmp_path):
    """In a real ComfyUI server with this pack: the node is listed, offering the files of models/diffusion_models
    and models/checkpoints, and the Train node has the optional CLIP and VAE inputs."""
    comfy_env.require_comfyui()
    from tests.e2e.tiny_models import save_safetensors, tiny_wan_transformer, wan_native_state_dict

    base = comfy_env.prepare_base_dir(tmp_path / "base", custom_nodes={"phase-trainer": Path(__file__).parents[2]})
    save_safetensors(wan_native_state_dict(tiny_wan_transformer()),
                     base / "models" / "diffusion_models" / "tiny_wan.safetensors")
    with comfy_env.start_server(base) as server:
        info = server.object_info()
    node = info["PhaseTrainerLoadModelFile"]
    spec = node["input"]["required"]["model_file"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # the V3 schema's COMBO form
    assert "diffusion_models/tiny_wan.safetensors" in options, options
    train_optional = info["PhaseTrainerTrain"]["input"]["optional"]
    assert train_optional["clip"][0] == "CLIP" and train_optional["vae"][0] == "VAE"

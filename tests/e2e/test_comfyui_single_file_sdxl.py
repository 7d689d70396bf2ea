"""An SDXL checkpoint from models/checkpoints trains through the node graph in a real ComfyUI (COMFYUI_ROOT; skips
cleanly without it) with the graph's own CLIP and VAE, and the LoRA loads back onto that same checkpoint with
zero unloaded keys.

The checkpoint (tests/e2e/sd_checkpoints.py) has SDXL's full-size random CLIP-L, OpenCLIP bigG and VAE, and the
smallest UNet ComfyUI detects as an SDXL-class model (Segmind Vega's depth list at 320 channels, 115 M
parameters; ~2 GB in fp16). Graph: Load Training Model (ComfyUI file) + CheckpointLoaderSimple of the same file,
whose CLIP and VAE go to Train (so the trainer reads only the UNet from the file) -> LoRA in models/loras ->
CheckpointLoaderSimple + LoraLoader + one KSampler step with the LoRA'd model and CLIP -> VAE Decode -> image.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e import comfy_env
from tests.e2e.sd_checkpoints import build_checkpoint
from tests.e2e.test_comfyui_single_file_sd15 import run_training, train_prompt

REPO = Path(__file__).resolve().parents[2]
CKPT = "tiny_sdxl.safetensors"
IMAGES = "sdxl_images"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, python = comfy_env.require_comfyui()
    from tests.e2e.test_comfyui_nodes import make_image_folder

    ckpt = build_checkpoint("sdxl", tmp_path_factory.getbasetemp() / "sd_checkpoints")
    base = comfy_env.prepare_base_dir(tmp_path_factory.mktemp("sdxl_single_file") / "base", {"phase-trainer": REPO})
    os.symlink(ckpt["path"], base / "models" / "checkpoints" / CKPT)  # 2 GB: linked, not copied
    make_image_folder(base / "input" / IMAGES, count=2, size=32)
    return {"root": root, "python": python, "base": base, "unet_config": ckpt["config"]}


def sample_with_lora(lora: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a red square"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "sdxl_lora_check"}},
    }


def test_sdxl_checkpoint_trains_with_the_graphs_clip_and_vae_and_the_lora_loads_back(setup):
    base = setup["base"]
    with comfy_env.start_server(base, root=setup["root"], python=setup["python"]) as server:
        lora, losses = run_training(server, train_prompt(CKPT, setup["unet_config"], IMAGES, "sdxl_comfy_encoders",
                                                         comfy_encoders=True), base / "models" / "loras")
        entry, _ = server.run_prompt(sample_with_lora(lora.name), timeout=900)
        log = server.log()
    print("losses:", losses)
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert "lora key not loaded" not in log, [line for line in log.splitlines() if "not loaded" in line][:5]
    (image,) = entry["outputs"]["7"]["images"]
    assert (base / "output" / image["subfolder"] / image["filename"]).is_file()
    result = comfy_env.probe(base / "models" / "checkpoints" / CKPT, lora)
    print("probe:", {k: result[k] for k in ("model_class", "model_config", "patches_applied")})
    assert result["model_class"] == "SDXL" and result["model_config"] == "Segmind_Vega"
    assert result["not_loaded"] == [] and result["not_patched"] == [] and result["patches_applied"] > 0
    assert all(v > 0 for v in result["max_abs_delta"].values())

"""An SD 1.5 checkpoint as ComfyUI users have it (models/checkpoints, original ldm format) trains through the
node graph in a real ComfyUI (COMFYUI_ROOT; skips cleanly without it), and the LoRA loads back onto that same
checkpoint with zero unloaded keys.

ComfyUI builds its SD 1.5 CLIP and VAE at the released sizes whatever the file holds, so the checkpoint has a
full-size random CLIP ViT-L text tower and VAE (the shipped configs) and a small UNet that ComfyUI still detects
as SD15 (context 768, 320 channels, two levels). The UNet's size is given to the node as a JSON config; the
tokenizer is ComfyUI's own comfy/sd1_tokenizer, which the node passes in.

The same graph runs twice: the trainer encoding with the checkpoint's own text encoder and VAE, and with
CheckpointLoaderSimple's CLIP and VAE connected to the Train node (trainer/comfy_encoders/sd.py). Same seed, so
the two loss curves must agree within float tolerance (the encodings differ by ~1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.e2e import comfy_env

REPO = Path(__file__).resolve().parents[2]
CKPT = "tiny_sd15_checkpoint.safetensors"
IMAGES = "sd15_images"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root, python = comfy_env.require_comfyui()
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.e2e.test_comfyui_nodes import make_image_folder
    from tests.e2e.tiny_models import tiny_sd15_unet
    from tests.test_single_file_sd15 import ldm_state_dict
    from trainer.families.single_file import load_sd15_configs

    work = tmp_path_factory.mktemp("sd15_single_file")
    base = comfy_env.prepare_base_dir(work / "base", {"phase-trainer": REPO})
    configs, _ = load_sd15_configs()
    torch.manual_seed(0)
    unet = tiny_sd15_unet(seed=0)
    vae = AutoencoderKL.from_config({k: v for k, v in configs["vae"].items() if not k.startswith("_")})
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"}))
    state = {k: v.half() if v.is_floating_point() else v for k, v in ldm_state_dict(unet, vae, text).items()}
    save_file(state, str(base / "models" / "checkpoints" / CKPT))
    unet_config = work / "unet_config.json"
    unet_config.write_text(json.dumps({"unet": dict(unet.config)}))
    make_image_folder(base / "input" / IMAGES, count=2, size=32)
    return {"root": root, "python": python, "base": base, "unet_config": unet_config}


def train_prompt(ckpt: str, config, images: str, job: str, comfy_encoders: bool, steps: int = 3) -> dict:
    """Load Training Model (ComfyUI file) -> image dataset -> LoRA network -> Train; with `comfy_encoders`
    CheckpointLoaderSimple's CLIP and VAE of the same file go to Train's clip / vae inputs."""
    prompt = {
        "1": {"class_type": "PhaseTrainerLoadModelFile", "inputs": {
            "model_file": f"checkpoints/{ckpt}", "dtype": "fp32", "config": str(config)}},
        "2": {"class_type": "PhaseTrainerImageFolderDataset", "inputs": {
            "folder": images, "resolution": "32", "trigger_word": "", "caption_ext": "txt", "default_caption": "",
            "caption_dropout_rate": 0.0, "num_repeats": 1}},
        "3": {"class_type": "PhaseTrainerLoRANetwork", "inputs": {"linear": 4, "linear_alpha": 4, "conv": 2,
                                                                  "conv_alpha": 2}},
        "4": {"class_type": "PhaseTrainerTrain", "inputs": {
            "model": ["1", 0], "dataset": ["2", 0], "network": ["3", 0], "job_name": job,
            "steps": steps, "learning_rate": 1e-3, "optimizer": "adamw", "lr_scheduler": "constant",
            "warmup_steps": 0, "batch_size": 2, "gradient_accumulation": 1, "seed": 7, "save_every": 10,
            "resume": False, "gradient_checkpointing": False}},
    }
    if comfy_encoders:
        prompt["5"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
        prompt["4"]["inputs"].update({"clip": ["5", 1], "vae": ["5", 2]})
    return prompt


def fill_defaults(server, prompt: dict) -> dict:
    """Widgets the graph leaves out take the defaults ComfyUI's /object_info gives."""
    info = server.object_info()
    for node in prompt.values():
        for section in ("required", "optional"):
            for name, entry in info[node["class_type"]]["input"].get(section, {}).items():
                if name not in node["inputs"] and len(entry) > 1 and isinstance(entry[1], dict) \
                        and "default" in entry[1]:
                    node["inputs"][name] = entry[1]["default"]
    return prompt


def run_training(server, prompt: dict, loras: Path) -> tuple[Path, list[float]]:
    """(the final LoRA file, the loss per step from the Train node's ui output) of one training graph."""
    entry, _ = server.run_prompt(fill_defaults(server, prompt), timeout=900)
    train = next(k for k, v in prompt.items() if v["class_type"] == "PhaseTrainerTrain")
    job = prompt[train]["inputs"]["job_name"]
    ui = entry["outputs"][train]["phase_trainer_metrics"][0]
    losses = [row[ui["columns"].index("loss")] for row in ui["rows"]]
    (lora,) = sorted(p for p in loras.glob(f"{job}_*.safetensors") if "_step" not in p.name and "_best" not in p.name)
    return lora, losses


def lora_check_prompt(ckpt: str, lora: str) -> dict:
    """ComfyUI's own checkpoint loader reads the file and its LoraLoader applies `lora` to the model and CLIP."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CheckpointSave", "inputs": {"model": ["2", 0], "clip": ["2", 1], "vae": ["1", 2],
                                                         "filename_prefix": "checkpoints/merged"}},
    }


def test_checkpoint_trains_through_the_node_graph_and_the_lora_loads_back(setup):
    base = setup["base"]
    loras = base / "models" / "loras"
    with comfy_env.start_server(base, root=setup["root"], python=setup["python"]) as server:
        lora, losses = run_training(server, train_prompt(CKPT, setup["unet_config"], IMAGES, "sd15_from_checkpoint",
                                                         comfy_encoders=False), loras)
        lora_comfy, losses_comfy = run_training(server, train_prompt(
            CKPT, setup["unet_config"], IMAGES, "sd15_comfy_encoders", comfy_encoders=True), loras)
        server.run_prompt(lora_check_prompt(CKPT, lora.name), timeout=900)
        log = server.log()
    print(f"losses, own encoders: {losses}; ComfyUI's CLIP/VAE: {losses_comfy}")
    assert len(losses) == len(losses_comfy) == 3 and all(loss > 0 for loss in losses)
    assert torch.allclose(torch.tensor(losses_comfy), torch.tensor(losses), rtol=1e-4, atol=1e-6), \
        (losses, losses_comfy)
    assert "lora key not loaded" not in log, [line for line in log.splitlines() if "not loaded" in line][:5]
    results = comfy_env.probe_many(base / "models" / "checkpoints" / CKPT, [lora, lora_comfy])
    for result in results:
        print("probe:", {k: result[k] for k in ("model_config", "patches_applied")})
        assert result["model_config"] == "SD15"
        assert result["not_loaded"] == [] and result["not_patched"] == [] and result["patches_applied"] > 0
        assert all(v > 0 for v in result["max_abs_delta"].values())

"""A tiny CLIP vision tower that both ComfyUI (CLIPVisionLoader) and the Wan 2.1 I2V family can load, from the
same weights.

Real Wan 2.1 I2V users have ``models/clip_vision/clip_vision_h.safetensors``: CLIP ViT-H/14's vision tower under
Hugging Face names (vision_model.* and visual_projection.weight, as CLIPVisionModelWithProjection), in fp16.
Here the same layout at test size: 32 layers (ComfyUI recognizes ViT-H by a block 30), 224-pixel images in
14-pixel patches (257 tokens, as the real model), width 16, GELU, layer-norm eps 1e-5. The weights are rounded
to fp16, so ComfyUI (which keeps text/vision encoders in fp16 on CPU and computes in float32) and the family's
float32 CLIPVisionModel hold the same numbers.

ComfyUI builds the tower from its fixed clip_vision_config_h.json whatever the file holds, so the same facts are
also written as a ComfyUI config (`comfy_config`) for tests/e2e/comfy_tiny_clip_vision, which points ComfyUI at
it. The diffusers side gets `image_encoder/` (CLIPVisionModel) and `image_processor/` (the shipped Wan I2V one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LAYERS = 32
WIDTH = 16
HEADS = 2
MLP = 24
IMAGE_SIZE = 224
PATCH = 14


def comfy_config() -> dict:
    """The tiny tower in ComfyUI's clip_vision_config_h.json form (same keys, tiny sizes)."""
    return {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": WIDTH,
            "image_size": IMAGE_SIZE, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": MLP, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
            "num_attention_heads": HEADS, "num_channels": 3, "num_hidden_layers": LAYERS, "patch_size": PATCH,
            "projection_dim": WIDTH, "torch_dtype": "float32"}


def build_tiny_clip_vision(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write out/image_encoder, out/image_processor (diffusers folder parts), out/tiny_clip_vision_h.safetensors
    (the ComfyUI file, fp16) and out/tiny_clip_vision_comfy_config.json. Returns their paths by those names."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    from trainer.comfy_encoders.wan_image import WAN_I2V_IMAGE_PROCESSOR

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH,
                              projection_dim=WIDTH, hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(p.half().float())  # fp16 values, as clip_vision_h.safetensors holds
    tensors = {k: v.detach().half().contiguous() for k, v in full.state_dict().items()}
    comfy_file = out / "tiny_clip_vision_h.safetensors"
    save_file(tensors, str(comfy_file))
    encoder = CLIPVisionModel(config).eval()
    # transformers 5 names CLIPVisionModel's weights without the vision_model. prefix (older versions with it)
    prefix = "" if any(k.startswith("vision_model.") for k in encoder.state_dict()) else "vision_model."
    missing, unexpected = encoder.load_state_dict(
        {k[len(prefix):]: v for k, v in full.state_dict().items() if k.startswith("vision_model.")}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"CLIPVisionModel keys differ: {missing[:3]} {unexpected[:3]}")
    encoder.save_pretrained(str(out / "image_encoder"))
    shutil.copytree(WAN_I2V_IMAGE_PROCESSOR, out / "image_processor", dirs_exist_ok=True)
    config_file = out / "tiny_clip_vision_comfy_config.json"
    config_file.write_text(json.dumps(comfy_config(), indent=1))
    return {"image_encoder": out / "image_encoder", "image_processor": out / "image_processor",
            "comfy_file": comfy_file, "comfy_config": config_file}

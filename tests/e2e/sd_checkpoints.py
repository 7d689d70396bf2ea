"""SD 1.5 and SDXL original-format checkpoints that a real ComfyUI loads with CheckpointLoaderSimple.

ComfyUI builds an SD checkpoint's CLIP towers and VAE at the released sizes whatever the file holds (its configs
are fixed: sd1_clip_config.json, clip_config_bigg.json), so the text towers and the VAE here are full-size with
random weights (the shipped configs in trainer/configs/sd15|sdxl), and only the UNet is small:
- SD 1.5: tests/e2e/tiny_models.tiny_sd15_unet (36.7 M parameters, detected as SD15);
- SDXL: the smallest UNet ComfyUI detects as an SDXL-class model, Segmind Vega's depth list at 320 channels
  on every level (115 M parameters, detected as Segmind_Vega, an SDXL subclass), with SDXL's CLIP-L and
  OpenCLIP bigG (694 M parameters: the file is ~2 GB in fp16).
Everything is stored in fp16, as released checkpoints are. The UNet's size reaches the trainer as a
component config (`{"unet": {...}}` JSON, the node's / job file's model.config). Builds are memoized per
pytest base temp folder, so two test modules share one file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_BUILT: dict[tuple[str, str], dict] = {}


def vega_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 320, 320),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=5,
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    ).eval()


def _half(state: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def build_checkpoint(family: str, folder: Path, seed: int = 0) -> dict:
    """Write `folder`/tiny_<family>.safetensors and `folder`/<family>_unet_config.json; returns {"path",
    "config"} (memoized on `folder`)."""
    key = (family, str(folder))
    if key in _BUILT:
        return _BUILT[key]
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.families.single_file import load_sd_configs

    folder.mkdir(parents=True, exist_ok=True)
    configs, _ = load_sd_configs(None, family)
    torch.manual_seed(seed)
    with torch.no_grad():
        vae = AutoencoderKL.from_config(_plain(configs["vae"])).eval()
        text = CLIPTextModel(CLIPTextConfig(**_plain(configs["text_encoder"]))).eval().half()
        if family == "sd15":
            from tests.e2e.tiny_models import tiny_sd15_unet
            from tests.test_single_file_sd15 import ldm_state_dict

            unet = tiny_sd15_unet(seed=seed)
            state = _half(ldm_state_dict(unet, vae, text))
        else:
            from tests.test_single_file_sdxl import ldm_xl_state_dict

            unet = vega_unet(seed=seed)
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_plain(configs["text_encoder_2"]))).eval().half()
            state = _half(ldm_xl_state_dict(unet, vae, text, text_2))
            del text_2
    path = folder / f"tiny_{family}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    config = folder / f"{family}_unet_config.json"
    config.write_text(json.dumps({"unet": dict(unet.config)}))
    _BUILT[key] = {"path": path, "config": config}
    return _BUILT[key]

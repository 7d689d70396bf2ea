"""Test-only ComfyUI custom node pack: let ComfyUI build a small FLUX.1 from small files.

ComfyUI builds Flux's text encoders from fixed configs (sd1_clip_config.json, t5_config_xxl.json) whatever the
files hold, and fixes a Flux model's head count at FLUX.1's 24. Test models cannot be that size, so:
- when PT_TINY_FLUX_TE names a JSON file of ComfyUI model_options (its own config overrides: "model_config"
  for clip_l, "t5xxl_model_config"; see tests/e2e/flux_tiny_models.py), comfy.sd.load_clip passes them for
  CLIPType.FLUX (what DualCLIPLoader type flux calls);
- a Flux model narrower than FLUX.1's 3072 gets width / 128 heads (FLUX.1's head size, the rope axes'
  16 + 56 + 56) in comfy.model_detection.detect_unet_config.
Nothing else changes: tokenizers, model classes, weight loading, LoRA key maps and patching are ComfyUI's.
Imported as a module it patches too (for scripts run under ComfyUI's python)."""

import json
import os

import comfy.model_detection
import comfy.sd

_load_clip = comfy.sd.load_clip
_detect = comfy.model_detection.detect_unet_config


def _load_clip_tiny_flux(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                         model_options={}):
    tiny = os.environ.get("PT_TINY_FLUX_TE")
    if tiny and clip_type == comfy.sd.CLIPType.FLUX:
        with open(tiny) as f:
            model_options = {**model_options, **json.load(f)}
    return _load_clip(ckpt_paths, embedding_directory=embedding_directory, clip_type=clip_type,
                      model_options=model_options)


def _detect_narrow_flux(state_dict, key_prefix, *args, **kwargs):
    config = _detect(state_dict, key_prefix, *args, **kwargs)
    if isinstance(config, dict) and config.get("image_model") == "flux" and config.get("hidden_size", 3072) < 3072:
        config["num_heads"] = config["hidden_size"] // 128
    return config


if getattr(comfy.sd.load_clip, "__name__", "") != "_load_clip_tiny_flux":
    comfy.sd.load_clip = _load_clip_tiny_flux
    comfy.model_detection.detect_unet_config = _detect_narrow_flux

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

"""Test-only ComfyUI custom node pack: build ComfyUI's CLIP vision model from a tiny config.

ComfyUI's CLIPVisionLoader (comfy.clip_vision.load -> load_clipvision_from_sd) detects a CLIP ViT-H file by the
key vision_model.encoder.layers.30.layer_norm1.weight and then builds the model from the fixed
comfy/clip_vision_config_h.json (32 layers x 1280, 632 M parameters), whatever the file holds. A test model
cannot be that size, so when PT_TINY_CLIP_VISION_CONFIG names a JSON file with the same keys, this pack makes
that one construction read it instead. Nothing else changes: detection, the key handling, the model classes,
encode_image (preprocessing, penultimate layer), devices and dtypes are ComfyUI's.
Imported as a module it patches too (for scripts run under ComfyUI's python)."""

import os

import comfy.clip_vision

_original_init = comfy.clip_vision.ClipVisionModel.__init__


def _init_with_tiny_clip_vision(self, json_config):
    tiny = os.environ.get("PT_TINY_CLIP_VISION_CONFIG")
    if tiny and os.path.basename(str(json_config)) == "clip_vision_config_h.json":
        json_config = tiny
    return _original_init(self, json_config)


if getattr(comfy.clip_vision.ClipVisionModel.__init__, "__name__", "") != "_init_with_tiny_clip_vision":
    comfy.clip_vision.ClipVisionModel.__init__ = _init_with_tiny_clip_vision

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

"""Test-only ComfyUI custom node pack: build ComfyUI's UMT5 text encoder from a tiny config.

ComfyUI's CLIPLoader (type "wan") detects a UMT5-XXL-class file by its keys and shapes and then builds the model
from the fixed comfy/text_encoders/umt5_config_xxl.json (5.7 B parameters), whatever the file holds. A test
model cannot be that size, so when PT_TINY_UMT5_CONFIG names a JSON file with the same keys, this pack makes
that one construction read it instead. Nothing else changes: detection, the tokenizer (from the file's
spiece_model), the T5 class, attention masks, zeroing of padded positions and the CLIP wrapper are ComfyUI's.
Imported as a module it patches too (for scripts run under ComfyUI's python)."""

import os

import comfy.sd1_clip

_original_init = comfy.sd1_clip.SDClipModel.__init__


def _init_with_tiny_umt5(self, *args, **kwargs):
    tiny = os.environ.get("PT_TINY_UMT5_CONFIG")
    config = kwargs.get("textmodel_json_config")
    if tiny and isinstance(config, str) and os.path.basename(config) == "umt5_config_xxl.json":
        kwargs["textmodel_json_config"] = tiny
    return _original_init(self, *args, **kwargs)


if getattr(comfy.sd1_clip.SDClipModel.__init__, "__name__", "") != "_init_with_tiny_umt5":
    comfy.sd1_clip.SDClipModel.__init__ = _init_with_tiny_umt5

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

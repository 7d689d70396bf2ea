"""ComfyUI's CLIP vision (clip_vision_h) as the Wan 2.1 I2V family's image encoder, beside its umt5 and VAE.

What WanImageToVideoPipeline.encode_image does with the first frame (a PIL image): its CLIPImageProcessor
resizes the shortest edge to 224 (PIL bicubic), center-crops 224x224, scales by 1/255 and normalizes with
CLIP's mean/std; then CLIPVisionModel's hidden_states[-2] (the output of the second-to-last encoder layer, after
pre_layrnorm, without post_layernorm) is the image embedding.

What ComfyUI's ClipVisionModel.encode_image(image, crop) does: resize + crop with torch (antialiased bicubic on
float pixels, which is not PIL's resampling), round to 8 bits, normalize with the same mean/std, and return
`penultimate_hidden_states`: its encoder's output at intermediate_output=-2, i.e. after layer L-2 of L, also
after pre_layrnorm and without post_layernorm -- the same tensor as transformers' hidden_states[-2].

So the only difference is the resize. The adapter resizes and crops with the family's own processor (the Wan
I2V release's image_processor, shipped in trainer/configs/wan21_i2v/image_processor: no diffusers folder
needed) and hands ComfyUI images already at its input size: ComfyUI skips its resize when the size matches,
its 8-bit rounding leaves k/255 unchanged, and it normalizes and runs its vision tower with its own device
and dtype handling. What remains is float rounding of the normalization (0 with the PIL processor backend,
<= 2.4e-7 with transformers' torchvision backend, which fuses scaling and normalization).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import ExternalEncoders, module_fingerprint
from .wan import comfy_wan_encoders

WAN_I2V_IMAGE_PROCESSOR = Path(__file__).resolve().parents[1] / "configs" / "wan21_i2v" / "image_processor"


def wan_image_processor(folder: str | Path = WAN_I2V_IMAGE_PROCESSOR):
    """The CLIPImageProcessor of the Wan 2.1 I2V release (the class the family loads from a folder)."""
    from ..families.wan21_i2v import clip_image_processor_class

    return clip_image_processor_class().from_pretrained(str(folder))


def processor_input_size(processor) -> tuple[int, int]:
    """(height, width) of the crops `processor` makes."""
    crop = processor.crop_size
    return int(crop["height"]), int(crop["width"])


def crop_like_processor(processor, images: list) -> torch.Tensor:
    """The processor's resize and center crop of `images` ([H, W, 3] uint8 arrays), without its scaling and
    normalization: ComfyUI's IMAGE layout [B, h, w, 3] with the crop's 8-bit values as k / 255."""
    raw = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    return (raw.float() / 255.0).permute(0, 2, 3, 1).contiguous()


def check_comfy_clip_vision(clip_vision: Any, processor) -> None:
    """ValueError unless ComfyUI's CLIP vision model takes the processor's crops with the same normalization
    (clip_vision_h does: 224 pixels, CLIP mean/std); e.g. a SigLIP or 336-pixel CLIP vision model does not."""
    size = getattr(clip_vision, "image_size", None)
    height, width = processor_input_size(processor)
    problems = []
    if size != height or size != width:
        problems.append(f"it takes {size}-pixel images, Wan 2.1 I2V's CLIP takes {height}x{width}")
    for name in ("image_mean", "image_std"):
        theirs = [float(v) for v in getattr(clip_vision, name, ())]
        ours = [float(v) for v in getattr(processor, name)]
        if len(theirs) != len(ours) or any(abs(a - b) > 1e-6 for a, b in zip(theirs, ours)):
            problems.append(f"its {name} is {theirs}, Wan 2.1 I2V's CLIP uses {ours}")
    if problems:
        raise ValueError("the CLIP vision input is not the CLIP ViT-H model Wan 2.1 I2V uses (load "
                         "clip_vision_h.safetensors with CLIPVisionLoader): " + "; ".join(problems))


def comfy_wan_image_encoders(clip: Any = None, vae: Any = None, *, clip_vision: Any = None,
                             processor=None) -> ExternalEncoders:
    """ExternalEncoders for Wan 2.1 I2V from ComfyUI objects: `clip` (umt5) and `vae` as comfy_wan_encoders,
    plus `clip_vision` (comfy.clip_vision.ClipVisionModel, as CLIPVisionLoader returns it: .encode_image,
    .image_size, .image_mean, .image_std) as `encode_image`. Any of them may be None. `processor` defaults to
    the shipped Wan I2V image processor."""
    processor = processor if processor is not None else wan_image_processor()
    if clip_vision is not None:
        check_comfy_clip_vision(clip_vision, processor)
    parts = [getattr(clip, "cond_stage_model", None), getattr(vae, "first_stage_model", None)]
    if clip_vision is not None:
        parts.append(getattr(clip_vision, "model", clip_vision))
    encoders = comfy_wan_encoders(clip, vae, identity=module_fingerprint(*parts))

    def encode_image(images: list) -> torch.Tensor:
        out = clip_vision.encode_image(crop_like_processor(processor, images), crop=False)
        return out["penultimate_hidden_states"].float().cpu()

    if clip_vision is not None:
        encoders.encode_image = encode_image
        encoders.objects.append(clip_vision)
    return encoders

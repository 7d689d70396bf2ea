"""Run under ComfyUI's python (cwd = ComfyUI root): load a CLIP vision file as CLIPVisionLoader does
(comfy.clip_vision.load) and encode first frames through trainer.comfy_encoders (the wan21_i2v adapter).

    python comfy_clip_vision_encode.py CLIP_VISION_FILE TINY_CONFIG_JSON FOLDER IMAGES.safetensors OUT.safetensors

IMAGES: "image{i}" = [H, W, 3] uint8 first frames. FOLDER: holds image_encoder/ and image_processor/ (the same
weights in diffusers layout). OUT gets, per image stacked on dim 0:
- "adapter": the adapter's embeddings (the Train node's path);
- "family": the family's own path in this same process (its PIL CLIPImageProcessor + transformers CLIPVisionModel,
  hidden_states[-2], as WanImageToVideoPipeline.encode_image);
- "comfy_own": ComfyUI's encode_image with its own resize and crop (CLIPVisionEncode, crop "center"), to
  show what the adapter's preprocessing changes.
First, before the tiny config is switched on, ComfyUI's ClipVisionModel is built from its real ViT-H config
(clip_vision_config_h.json: 32 x 1280, uninitialized) and the adapter's check accepts it (input size, mean, std)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.getcwd())


def main(cv_file: str, config_json: str, folder: str, images_file: str, out: str) -> None:
    from comfy.cli_args import args

    args.cpu = True
    import importlib.util  # ComfyUI has its own `tests` package: load the patch by path

    import comfy.clip_vision

    from trainer.comfy_encoders.wan_image import check_comfy_clip_vision, wan_image_processor

    os.environ.pop("PT_TINY_CLIP_VISION_CONFIG", None)
    real = comfy.clip_vision.ClipVisionModel(str(Path(comfy.clip_vision.__file__).with_name("clip_vision_config_h.json")))
    check_comfy_clip_vision(real, wan_image_processor())
    print("real ViT-H config accepted:", real.image_size, "layers", len(real.model.vision_model.encoder.layers),
          "width", real.model.vision_model.post_layernorm.weight.shape[0])
    del real
    os.environ["PT_TINY_CLIP_VISION_CONFIG"] = config_json

    spec = importlib.util.spec_from_file_location(
        "comfy_tiny_clip_vision", Path(__file__).with_name("comfy_tiny_clip_vision") / "__init__.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModel

    from trainer.comfy_encoders import for_family
    from trainer.families.base import LoadedModel
    from trainer.families.wan21_i2v import Wan21I2V, clip_image_processor_class

    clip_vision = comfy.clip_vision.load(cv_file)
    if clip_vision is None:
        raise SystemExit("ComfyUI did not recognize the CLIP vision file")
    raw = load_file(images_file)
    images = [raw[f"image{i}"].numpy() for i in range(len(raw))]
    adapter = for_family("wan21_i2v", clip_vision=clip_vision)
    got = adapter.encode_image(images)

    encoder = CLIPVisionModel.from_pretrained(folder, subfolder="image_encoder", torch_dtype=torch.float32).eval()
    processor = clip_image_processor_class().from_pretrained(folder, subfolder="image_processor")
    family = Wan21I2V(LoadedModel(denoiser=torch.nn.Identity(), extra={
        "dtype": torch.float32, "image_encoder": encoder, "image_processor": processor}))
    pixels = [torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1.0 for im in images]
    want = torch.cat([family.encode_first_frame_clip(p[None, :, None]) for p in pixels])
    own = torch.cat([clip_vision.encode_image(torch.from_numpy(im)[None].float() / 255.0, crop=True)
                     ["penultimate_hidden_states"].float() for im in images])
    save_file({"adapter": got.contiguous(), "family": want.contiguous(), "comfy_own": own.contiguous()}, out)
    print("comfy clip vision:", type(clip_vision.model).__name__, "dtype", clip_vision.dtype, "layers",
          len(clip_vision.model.vision_model.encoder.layers), "processor", type(processor).__name__)


if __name__ == "__main__":
    main(*sys.argv[1:6])

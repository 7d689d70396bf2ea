"""Run under ComfyUI's python (cwd = ComfyUI root): load an SD 1.5 / SDXL checkpoint as CheckpointLoaderSimple does
(comfy.sd.load_checkpoint_guess_config with the embeddings folders) and encode captions and pixels through
trainer.comfy_encoders (for_family: the adapter the Train node uses).

    python comfy_sd_encode.py FAMILY CHECKPOINT CAPTIONS_JSON PIXELS.safetensors OUT.safetensors

OUT gets, per caption i: "h{i}" (and "p{i}" for SDXL) = the adapter's encoder_hidden_states / text_embeds;
"raw{i}" / "rawp{i}" = ComfyUI's own encode_from_tokens(clip.tokenize(caption), return_pooled=True) (what a
CLIPTextEncode node gives, to show what the adapter changes); "last{i}" = the adapter's hidden states with the
CLIP set to the pipeline's layer by CLIPSetLastLayer (-1 for SD 1.5, -2 for SDXL); "latents" = the adapter's
latents of PIXELS ("pixels": [B, 3, 1, H, W] in [-1, 1]). Also "refused" = 1 when a CLIP set to another layer
was refused by the adapter."""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.getcwd())


def main(family: str, checkpoint: str, captions_json: str, pixels_file: str, out: str) -> None:
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    import folder_paths
    import torch
    from safetensors.torch import load_file, save_file

    from trainer.comfy_encoders import for_family

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        checkpoint, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    print("comfy model:", type(model.model.model_config).__name__, "clip:", type(clip.cond_stage_model).__name__)
    captions = json.loads(Path(captions_json).read_text())
    encoders = for_family(family, clip, vae)
    tensors = {}
    for i, item in enumerate(encoders.encode_prompts(captions, 77)):
        tensors[f"h{i}"] = item["encoder_hidden_states"].contiguous()
        if "text_embeds" in item:
            tensors[f"p{i}"] = item["text_embeds"].contiguous()
    for i, caption in enumerate(captions):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        tensors[f"raw{i}"] = cond[0].float().contiguous()
        if pooled is not None:
            tensors[f"rawp{i}"] = pooled[0].float().contiguous()
    # CLIPSetLastLayer to the pipeline's own layer changes nothing; another layer is refused
    pipeline_layer, other_layer = (-1, -2) if family == "sd15" else (-2, -1)
    at_layer = clip.clone()
    at_layer.clip_layer(pipeline_layer)
    for i, item in enumerate(for_family(family, at_layer, None).encode_prompts(captions, 77)):
        tensors[f"last{i}"] = item["encoder_hidden_states"].contiguous()
    other = clip.clone()
    other.clip_layer(other_layer)
    try:
        for_family(family, other, None)
        refused = 0
    except ValueError as e:
        print("refused:", e)
        refused = 1
    tensors["refused"] = torch.tensor([refused])
    tensors["latents"] = encoders.encode_pixels(load_file(pixels_file)["pixels"]).contiguous()
    save_file(tensors, out)


if __name__ == "__main__":
    main(*sys.argv[1:6])

"""Run under ComfyUI's python (cwd = ComfyUI root): load clip_l + t5xxl as DualCLIPLoader(type="flux") does
(comfy.sd.load_clip with CLIPType.FLUX; the tiny sizes through ComfyUI's own model_options config override) and
ae.safetensors as VAELoader does (comfy.utils.load_torch_file -> comfy.sd.VAE), then encode through
trainer.comfy_encoders.for_family("flux", clip, vae), the Train node's adapter.

    python comfy_flux_encode.py CLIP_L T5XXL AE CAPTIONS_JSON PIXELS.safetensors OUT.safetensors LENGTH...

OUT gets, per max_sequence_length L and caption i, "h{L}_{i}" [L, d] and "p{L}_{i}" [768-like]; "latents";
"clip_ids_{i}": the clip_l token ids the adapter encodes."""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, os.getcwd())


def main(clip_l, t5xxl, ae, captions_json, pixels_file, out, *lengths):
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    import importlib.util  # ComfyUI has its own `tests` package: load ours by path

    spec = importlib.util.spec_from_file_location("flux_tiny_models", Path(__file__).with_name("flux_tiny_models.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    from trainer.comfy_encoders import escape_comfy_weights, for_family
    from trainer.comfy_encoders.flux import flux_tokens_like_pipeline

    clip = comfy.sd.load_clip(ckpt_paths=[clip_l, t5xxl], clip_type=comfy.sd.CLIPType.FLUX,
                              model_options=json.loads(json.dumps(tiny.COMFY_MODEL_OPTIONS)))
    # ComfyUI loads text encoders with strict=False: check every tensor of both files really arrived
    for part, path in (("clip_l", clip_l), ("t5xxl", t5xxl)):
        model = getattr(clip.cond_stage_model, part).transformer.state_dict()
        for key, value in load_file(path).items():
            if key not in model or not torch.equal(model[key].to(value.dtype), value):
                raise SystemExit(f"ComfyUI did not load {part} tensor {key} from {path}")
    sd, metadata = comfy.utils.load_torch_file(ae, return_metadata=True)
    vae = comfy.sd.VAE(sd=sd, metadata=metadata)
    encoders = for_family("flux", clip, vae)
    captions = json.loads(Path(captions_json).read_text())
    tensors = {}
    for length in map(int, lengths):
        for i, item in enumerate(encoders.encode_prompts(captions, length)):
            tensors[f"h{length}_{i}"] = item["encoder_hidden_states"].contiguous()
            tensors[f"p{length}_{i}"] = item["pooled_projections"].contiguous()
    for i, caption in enumerate(captions):
        ours = flux_tokens_like_pipeline(clip.tokenize(escape_comfy_weights(caption)), 512)["l"][0]
        tensors[f"clip_ids_{i}"] = torch.tensor([t[0] for t in ours])
    tensors["latents"] = encoders.encode_pixels(load_file(pixels_file)["pixels"]).contiguous()
    save_file(tensors, out)
    print("comfy clip:", type(clip.cond_stage_model).__name__, "vae:", type(vae.first_stage_model).__name__,
          "vae dtype", vae.vae_dtype, "latent channels", vae.latent_channels)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Tiny FLUX.1 weights that both real ComfyUI and the trainer's Flux family load, from the same tensors.

What a FLUX.1 user has, at test size:
- ``clip_l.safetensors`` (CLIP ViT-L text tower under Hugging Face names + text_projection, fp16) and
  ``t5xxl.safetensors`` (T5 v1.1 encoder under Hugging Face names, fp16), for DualCLIPLoader type flux. ComfyUI
  builds them from its fixed sd1_clip_config.json / t5_config_xxl.json, whose sizes its own model_options
  override (`COMFY_MODEL_OPTIONS`: clip_l's through "model_config", t5xxl's through "t5xxl_model_config"); the
  vocabularies stay the real ones (49408 / 32128) because ComfyUI's tokenizers are the real ones. The weights are
  rounded to fp16, as ComfyUI stores text encoders on CPU, so both sides compute in float32 from equal weights.
- ``ae.safetensors``: the FLUX.1 VAE at its released size (ComfyUI fixes the widths 128..512), random, in BFL's
  (ldm) layout.
- ``flux_tiny.safetensors``: a FLUX.1-dev-style transformer under BFL's names, 2 heads x 128 (ComfyUI fixes the
  head size to the rope axes 16 + 56 + 56; the test-only patch in comfy_flux_probe.py sets its head count, which
  ComfyUI fixes at FLUX.1's 24), 1 double + 1 single block.
- a FLUX.1 diffusers folder of the same weights with ComfyUI's own tokenizer files (tokenizer/, tokenizer_2/).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

CLIP = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2)
T5 = dict(d_model=32, d_kv=8, num_heads=2, d_ff=64, num_layers=2)
# ComfyUI's load_clip rebuilds "clip_l_model_config" from "model_config" plus the file's position count
# (comfy/text_encoders/long_clipl.py), so the CLIP sizes go in "model_config".
COMFY_MODEL_OPTIONS = {"model_config": dict(CLIP), "t5xxl_model_config": dict(T5)}
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                   num_attention_heads=2, joint_attention_dim=T5["d_model"], pooled_projection_dim=CLIP["hidden_size"],
                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def _fp16_exact(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def build(out: Path, comfy_root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the files listed in the module docstring under `out`; returns their paths by name."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.test_single_file_flux import bfl_state_dict
    from tests.test_single_file_sd15 import ldm_vae_key
    from trainer.families.single_file.flux import FLUX_CONFIG_DIR, flux_vae_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip = _fp16_exact(CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=CLIP["hidden_size"], **CLIP))).eval()
    t5 = _fp16_exact(T5EncoderModel(T5Config(
        vocab_size=32128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
        relative_attention_max_distance=128, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, **T5))).eval()
    transformer = FluxTransformer2DModel(**TRANSFORMER).eval()
    vae = AutoencoderKL.from_config({k: v for k, v in flux_vae_config().items() if not k.startswith("_")}).eval()
    tokenizer_dir, tokenizer_2_dir = out / "comfy_tokenizer", out / "comfy_tokenizer_2"
    for src, dst in ((comfy_root / "comfy" / "sd1_tokenizer", tokenizer_dir),
                     (comfy_root / "comfy" / "text_encoders" / "t5_tokenizer", tokenizer_2_dir)):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    scheduler_doc = __import__("json").loads((FLUX_CONFIG_DIR / "flux_dev.json").read_text())["scheduler"]
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_doc), vae=vae, text_encoder=clip,
        tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77), text_encoder_2=t5,
        tokenizer_2=AutoTokenizer.from_pretrained(str(tokenizer_2_dir), model_max_length=512), transformer=transformer)
    folder = out / "flux-tiny-diffusers"
    pipe.save_pretrained(str(folder))

    files = {"folder": folder, "clip_l": out / "clip_l.safetensors", "t5xxl": out / "t5xxl.safetensors",
             "ae": out / "ae.safetensors", "flux": out / "flux_tiny.safetensors"}
    # ComfyUI's clip_l files keep Hugging Face's text_model. prefix (transformers 5 saves the tower without it)
    clip_sd = {("" if k.startswith("text_model.") else "text_model.") + k: v.half().contiguous()
               for k, v in clip.state_dict().items()}
    clip_sd["text_projection.weight"] = torch.randn(CLIP["hidden_size"], CLIP["hidden_size"]).half()
    save_file(clip_sd, str(files["clip_l"]))
    save_file({k: v.half().contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(files["t5xxl"]))
    save_file({ldm_vae_key(k, vae.config): (v[:, :, None, None] if "attentions" in k and v.ndim == 2 else v)
               .detach().contiguous() for k, v in vae.state_dict().items()}, str(files["ae"]))
    save_file(bfl_state_dict(transformer), str(files["flux"]))
    return files

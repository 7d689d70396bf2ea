"""Run under ComfyUI's Python (cwd = ComfyUI root): build a small Wan 2.1 VAE with ComfyUI's own WanVAE class,
save it as a ComfyUI VAE file, load it back with comfy.sd.VAE (what VAELoader does) and encode the given pixels
through trainer.comfy_encoders (the adapter the Train node uses).

    python comfy_vae_encode.py OUT_DIR PIXELS.safetensors
writes OUT_DIR/wan_vae.safetensors and OUT_DIR/comfy_latents.safetensors ({"latents"})."""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(REPO))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before model_management is imported: no accelerator probing

import comfy.ldm.wan.vae  # noqa: E402
import comfy.sd  # noqa: E402

from trainer.comfy_encoders import comfy_wan_encoders  # noqa: E402

out, pixels_file = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
# The Wan 2.1 VAE layout ComfyUI builds for any base width (dim_mult, res blocks and z_dim are fixed there).
model = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                 temperal_downsample=[False, True, True], dropout=0.0)
with torch.no_grad():  # ComfyUI's ops skip weight init (torch.empty): fill every weight ourselves
    for name, p in model.named_parameters():
        fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
        if name.endswith("gamma"):
            p.copy_(1 + 0.1 * torch.randn_like(p))
        elif p.ndim > 1:
            p.copy_(torch.randn_like(p) / fan_in ** 0.5)
        else:
            p.copy_(0.05 * torch.randn_like(p))
state = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(state, str(out / "wan_vae.safetensors"))
vae = comfy.sd.VAE(sd=load_file(str(out / "wan_vae.safetensors")))
print("comfy vae", type(vae.first_stage_model).__name__, "dtype", vae.vae_dtype, "latent_channels",
      vae.latent_channels)
encoders = comfy_wan_encoders(vae=vae)
latents = encoders.encode_pixels(load_file(pixels_file)["pixels"])
save_file({"latents": latents.contiguous()}, str(out / "comfy_latents.safetensors"))
print("latents", tuple(latents.shape))

"""Run under ComfyUI's Python (cwd = ComfyUI root): build a small Wan 2.2 VAE with ComfyUI's own class
(comfy/ldm/wan/vae2_2.py), save it as a ComfyUI VAE file, load it back with comfy.sd.VAE (what VAELoader does)
and encode the given pixels, and their first frames alone, through trainer.comfy_encoders (the wan22_5b adapter
the Train node uses).

    python comfy_wan22_vae_encode.py OUT_DIR PIXELS.safetensors
writes OUT_DIR/wan22_vae.safetensors and OUT_DIR/comfy_latents.safetensors ({"latents", "first_frame"}: the
adapter's; "process_in": ComfyUI's own latent_formats.Wan22 normalization of the raw latents).

ComfyUI builds the Wan 2.2 VAE at the released widths (dim 160, decoder 256) whatever the file holds; a test VAE
cannot be that size (~700 M parameters), so the one construction comfy.sd makes takes the tiny widths below
instead. Everything else is ComfyUI's: the detection by key, the class, its layout, dtype choice and encode."""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path.cwd()))
sys.path.insert(0, str(REPO))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before model_management is imported: no accelerator probing

import comfy.ldm.wan.vae2_2 as vae2_2  # noqa: E402
import comfy.sd  # noqa: E402

from trainer.comfy_encoders import for_family  # noqa: E402

DIM, DEC_DIM = 8, 12
_released_init = vae2_2.WanVAE.__init__


def _tiny_init(self, *args, **kwargs):
    kwargs.update(dim=DIM, dec_dim=DEC_DIM)
    _released_init(self, *args, **kwargs)


out, pixels_file = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
# The layout comfy.sd builds for the Wan 2.2 VAE (z 48, dim_mult 1,2,4,4, 2 res blocks, temporal F,T,T).
model = vae2_2.WanVAE(dim=DIM, dec_dim=DEC_DIM, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
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
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "wan22_vae.safetensors"))

vae2_2.WanVAE.__init__ = _tiny_init
vae = comfy.sd.VAE(sd=load_file(str(out / "wan22_vae.safetensors")))
vae2_2.WanVAE.__init__ = _released_init
print("comfy vae", type(vae.first_stage_model).__module__, type(vae.first_stage_model).__name__, "dtype",
      vae.vae_dtype, "latent_channels", vae.latent_channels)
encoders = for_family("wan22_5b", vae=vae)
pixels = load_file(pixels_file)["pixels"]
latents = encoders.encode_pixels(pixels)
first = encoders.encode_pixels(pixels[:, :, :1])
# ComfyUI's own normalization of the raw latents (what its sampler feeds a Wan 2.2 model): latent_formats.Wan22
import comfy.latent_formats  # noqa: E402
from trainer.comfy_encoders.wan import wan_pixels_to_comfy  # noqa: E402

raw = torch.cat([vae.encode(frames).float() for frames in wan_pixels_to_comfy(pixels)])
process_in = comfy.latent_formats.Wan22().process_in(raw)
save_file({"latents": latents.contiguous(), "first_frame": first.contiguous(), "process_in": process_in.contiguous()},
          str(out / "comfy_latents.safetensors"))
print("latents", tuple(latents.shape), "first", tuple(first.shape))

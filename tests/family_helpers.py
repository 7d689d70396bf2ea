"""Small helpers the family tests share."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def stack(conds: list[dict]) -> dict:
    """Per-caption conditioning dicts -> one batch dict."""
    return {k: torch.stack([c[k] for c in conds]) for k in conds[0]}


def edit_json(path: Path, **changes) -> None:
    """Change keys of a JSON config file in place; a None value removes the key."""
    path = Path(path)
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------- Wan single files
# ComfyUI's native key layout for Wan weights, written from diffusers models (ComfyUI itself is not in CI).


def native_wan_key(key: str) -> str:
    """diffusers WanTransformer3DModel parameter -> Wan's original (ComfyUI) key."""
    from trainer.families.wan21 import native_wan_name

    if key == "scale_shift_table":
        return "head.modulation"
    if key.endswith(".scale_shift_table"):
        return key[: -len("scale_shift_table")] + "modulation"
    module, param = key.rsplit(".", 1)
    return f"{native_wan_name(module)}.{param}"


def native_state_dict(transformer, prefix: str = "") -> dict:
    return {prefix + native_wan_key(k): v.detach().clone().contiguous() for k, v in transformer.state_dict().items()}


def header_only_file(path, shapes: dict, metadata: dict | None = None) -> None:
    """A .safetensors file whose header declares `shapes` (float8, so tensor bytes stay small) -- enough for
    detect_variant, which never reads tensor data. Real sizes would be gigabytes. `metadata`: the header's
    __metadata__ entry (e.g. ComfyUI's _quantization_metadata)."""
    import struct

    header, offset = ({"__metadata__": metadata} if metadata is not None else {}), 0
    for key, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        header[key] = {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)  # sparse: no real bytes written


def meta_shapes(config: dict, prefix: str = "") -> tuple[dict, object]:
    """Native {key: shape} of a WanTransformer3DModel built from `config` on the meta device, and the model."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        model = WanTransformer3DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return {prefix + native_wan_key(k): tuple(v.shape) for k, v in model.state_dict().items()}, model


_VAE_RESNET = (("norm1.", "residual.0."), ("conv1.", "residual.2."), ("norm2.", "residual.3."),
               ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))


def native_wan22_vae_state(vae) -> dict:
    """A diffusers Wan 2.2 AutoencoderKLWan (is_residual) state dict under Wan's / ComfyUI's VAE key names
    (comfy/ldm/wan/vae2_2.py: encoder.downsamples.i.downsamples.j..., the block's resample last)."""
    import re

    def resnet(part: str) -> str:
        for new, old in _VAE_RESNET:
            if part.startswith(new):
                return old + part[len(new):]
        raise KeyError(part)

    state = vae.state_dict()
    resnets = {}
    for key in state:
        m = re.match(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.", key)
        if m:
            resnets[(m.group(1), m.group(2))] = max(resnets.get((m.group(1), m.group(2)), 0), int(m.group(3)) + 1)
    out = {}
    for key, value in state.items():
        side = key.split(".", 1)[0]
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = ("conv1." if key.startswith("quant_conv.") else "conv2.") + key.split(".", 1)[1]
        elif m := re.match(r"^(encoder|decoder)\.conv_in\.(.+)$", key):
            new = f"{side}.conv1.{m.group(2)}"
        elif m := re.match(r"^(encoder|decoder)\.norm_out\.(.+)$", key):
            new = f"{side}.head.0.{m.group(2)}"
        elif m := re.match(r"^(encoder|decoder)\.conv_out\.(.+)$", key):
            new = f"{side}.head.2.{m.group(2)}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)$", key):
            new = f"{side}.middle.{2 * int(m.group(2))}.{resnet(m.group(3))}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$", key):
            new = f"{side}.middle.1.{m.group(2)}"
        elif m := re.match(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.resnets\.(\d+)\.(.+)$", key):
            outer = "encoder.downsamples" if side == "encoder" else "decoder.upsamples"
            inner = outer.split(".")[1]
            new = f"{outer}.{m.group(2)}.{inner}.{m.group(3)}.{resnet(m.group(4))}"
        elif m := re.match(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(?:downsampler|upsampler)\.(.+)$",
                           key):
            outer = "encoder.downsamples" if side == "encoder" else "decoder.upsamples"
            inner = outer.split(".")[1]
            new = f"{outer}.{m.group(2)}.{inner}.{resnets[(m.group(1), m.group(2))]}.{m.group(3)}"
        else:
            raise KeyError(f"no native name for {key}")
        out[new] = value.detach().clone().contiguous()
    return out


def tiny_wan22_vae(seed: int = 0, base_dim: int = 4, decoder_base_dim: int = 6):
    """The released Wan 2.2 VAE architecture (shipped config: z 48, dim_mult 1,2,4,4, 2 res blocks, its
    statistics) at tiny widths, with seeded random weights."""
    from diffusers import AutoencoderKLWan

    from trainer.families.single_file.wan22 import wan22_vae_config

    config = {k: v for k, v in wan22_vae_config().items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan.from_config(dict(config, base_dim=base_dim, decoder_base_dim=decoder_base_dim))
        with torch.no_grad():  # the RMS norm gammas start at one: make them count
            for name, p in vae.named_parameters():
                if name.endswith("gamma"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
    return vae.eval()

"""Tiny real diffusers denoisers, saved in the layout ComfyUI loads, plus LoRA files with known deltas.

Sizes are the smallest ComfyUI's model detection accepts (see shared/notes/real-comfyui.md):
- Wan 2.1: detection sets num_heads = dim // 128 and fixes text_dim 4096, freq_dim 256, patch (1, 2, 2), so
  dim 128 = 1 head x 128, 2 layers, ffn 256: 1.1 M parameters.
- SD 1.5: detection needs model_channels 320 and context_dim 768; channel_mult and depths are read from the
  weights. Two levels at 320 channels (plain, then cross-attention) keep every kind of UNet module kohya
  names -- resnets, transformers, a downsampler, an upsampler after attention, the mid block -- at 33 M
  parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from trainer.families.wan21 import native_wan_name

WAN_PARAMETER_RENAMES = {"scale_shift_table": "head.modulation"}  # the head's modulation is a bare parameter


def tiny_wan_transformer(seed: int = 0) -> nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()


def wan_native_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel weights under Wan's original names (what ComfyUI's UNETLoader reads)."""
    out = {}
    for key, value in transformer.state_dict().items():
        if key in WAN_PARAMETER_RENAMES:
            native = WAN_PARAMETER_RENAMES[key]
        elif key.endswith(".scale_shift_table"):  # per-block modulation, also a bare parameter
            native = key[: -len("scale_shift_table")] + "modulation"
        else:
            module, param = key.rsplit(".", 1)
            native = f"{native_wan_name(module)}.{param}"
        out[native] = value.detach().clone().contiguous()
    return out


def tiny_sd15_unet(seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 320),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def random_lora(targets: dict[str, nn.Module], rank: int, seed: int = 0,
                naming=lambda name: name) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """kohya-layout LoRA tensors for `targets` ({module name: nn.Linear / ConvNd}) with a different alpha per
    module (so a loader that ignores `.alpha`, or reads one alpha for all, gets the deltas wrong).
    Returns (file tensors keyed by naming(name), expected weight delta per module name)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for i, (name, module) in enumerate(sorted(targets.items())):
        weight = module.weight
        if isinstance(module, nn.Linear):
            down_shape, up_shape = (rank, weight.shape[1]), (weight.shape[0], rank)
        else:
            ones = (1,) * (weight.ndim - 2)
            down_shape, up_shape = (rank, *weight.shape[1:]), (weight.shape[0], rank, *ones)
        down = torch.randn(down_shape, generator=gen) * 0.1
        up = torch.randn(up_shape, generator=gen) * 0.1
        alpha = float(rank) * (0.5 + 0.25 * (i % 4))
        prefix = naming(name)
        tensors[f"{prefix}.lora_down.weight"] = down
        tensors[f"{prefix}.lora_up.weight"] = up
        tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
        delta = (up.flatten(1).double() @ down.flatten(1).double()) * (alpha / rank)
        expected[name] = delta.reshape(weight.shape)
    return tensors, expected


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return path

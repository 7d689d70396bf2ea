"""Export key names checked against ComfyUI's naming rules, without ComfyUI.

Wan: ComfyUI knows a Wan LoRA key only as `diffusion_model.<native Wan weight name>` and ignores diffusers names
without a word. Diffusers' own native -> diffusers converter is the reference: every key we export, run through
it, must land on exactly the diffusers module it came from, for the tiny model and for full-size configs (built
on the meta device, so they cost nothing).

SD 1.5: ComfyUI maps `lora_unet_<diffusers weight name without .weight, '.' -> '_'>` for every UNet weight;
building that map from the UNet's state dict the same way, every exported prefix must be in it, point back at
its own module, and be unique.
"""

from __future__ import annotations

import pytest
import torch

from fixtures_models import tiny_sd15_path, tiny_wan21_path  # noqa: F401
from trainer.errors import ModelError
from trainer.families.sd15 import SD15, sd15_target_modules
from trainer.families.wan21 import Wan21, native_wan_name, wan_target_modules

WAN_PREFIX = "diffusion_model."
WAN_CONFIGS = {
    "1.3B-T2V": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14B-T2V": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    # I2V adds image cross-attention (add_k_proj / add_v_proj) and the image embedder: names we must also know.
    "14B-I2V": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, image_dim=1280,
                    added_kv_proj_dim=5120),
}
WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
DIFFUSERS_ONLY = ("attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "ffn.net", "add_k_proj", "add_v_proj",
                  "condition_embedder", "proj_out", "transformer.")
SD15_FULL_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def meta_wan(name):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        return WanTransformer3DModel(**WAN_COMMON, **WAN_CONFIGS[name])


def meta_sd15_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_FULL_UNET)


def diffusers_name_of(native_key: str) -> str:
    """What diffusers' single-file loader makes of a native Wan weight name."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({native_key: torch.empty(0)})
    (name,) = converted
    return name


def assert_wan_round_trip(transformer, module_names):
    weights = {n for n, _ in transformer.named_parameters()}
    keys = []
    for name in module_names:
        key = Wan21.export_prefix(name)
        assert key.startswith(WAN_PREFIX), key
        native = key[len(WAN_PREFIX):]
        assert diffusers_name_of(f"{native}.weight") == f"{name}.weight", (name, native)
        assert f"{name}.weight" in weights
        assert not any(part in native for part in DIFFUSERS_ONLY), native
        keys.append(key)
    assert len(keys) == len(set(keys)), "two modules share an export key"
    return keys


# ---------------------------------------------------------------- Wan

def test_wan_tiny_targets_are_exact_inverse_of_diffusers_conversion(tiny_wan21_path):
    family = Wan21.load(str(tiny_wan21_path), torch.float32)
    targets = family.target_modules(4, 4)
    keys = assert_wan_round_trip(family.denoiser, [t.name for t in targets])
    assert len(keys) == 21
    assert "diffusion_model.blocks.0.self_attn.q" in keys and "diffusion_model.blocks.1.cross_attn.o" in keys
    assert "diffusion_model.blocks.1.ffn.0" in keys and "diffusion_model.patch_embedding" in keys


@pytest.mark.parametrize("config", sorted(WAN_CONFIGS))
def test_wan_full_size_targets_are_exact_inverse(config):
    transformer = meta_wan(config)
    targets = wan_target_modules(transformer, 16, 8)
    per_block = 12 if "I2V" in config else 10
    assert len(targets) == WAN_CONFIGS[config]["num_layers"] * per_block + 1
    keys = assert_wan_round_trip(transformer, [t.name for t in targets])
    if "I2V" in config:
        assert "diffusion_model.blocks.39.cross_attn.k_img" in keys
        assert "diffusion_model.blocks.0.cross_attn.v_img" in keys


def test_wan_every_weight_carrying_module_round_trips():
    """Beyond the default targets (filters may widen them): embedders, head, norms of the largest config."""
    transformer = meta_wan("14B-I2V")
    names = [n for n, m in transformer.named_modules() if isinstance(getattr(m, "weight", None), torch.nn.Parameter)]
    assert "condition_embedder.time_proj" in names and "blocks.0.norm2" in names
    assert_wan_round_trip(transformer, names)
    assert native_wan_name("blocks.3.norm2") == "blocks.3.norm3"  # diffusers swapped norm2 and norm3
    assert native_wan_name("proj_out") == "head.head"


@pytest.mark.parametrize("name", ["blocks.0.attn1.to_qkv", "blocks.0.attn2.to_kv", "blocks.0.scale_shift_table",
                                  "blocks.x.attn1.to_q", "transformer.blocks.0.attn1.to_q", "attn1.to_q",
                                  "blocks.0.attn1.to_q.lora_A", "rope", "", "unet.conv_in"])
def test_wan_unknown_names_raise(name):
    with pytest.raises(ModelError, match="no ComfyUI"):
        Wan21.export_prefix(name)


# ---------------------------------------------------------------- SD 1.5

def comfyui_sd_unet_key_map(unet) -> dict[str, str]:
    """ComfyUI's kohya map for a UNet: every diffusers weight name `k` -> "lora_unet_" + k[:-7] with '.' -> '_'."""
    return {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in unet.state_dict() if k.endswith(".weight")
    }


def assert_sd15_keys(unet, targets):
    key_map = comfyui_sd_unet_key_map(unet)
    prefixes = [SD15.export_prefix(t.name) for t in targets]
    assert len(prefixes) == len(set(prefixes)), "two modules share an export key"
    for target, prefix in zip(targets, prefixes):
        assert prefix in key_map, prefix
        assert key_map[prefix] == f"{target.name}.weight"
    return prefixes


def test_sd15_tiny_keys_are_comfyui_kohya_keys(tiny_sd15_path):
    family = SD15.load(str(tiny_sd15_path), torch.float32)
    prefixes = assert_sd15_keys(family.denoiser, family.target_modules(4, 4))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in prefixes
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in prefixes
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in prefixes


def test_sd15_full_size_keys_are_comfyui_kohya_keys():
    unet = meta_sd15_unet()
    key_map = comfyui_sd_unet_key_map(unet)
    assert len(key_map) == sum(k.endswith(".weight") for k in unet.state_dict()), "the map itself is unambiguous"
    prefixes = assert_sd15_keys(unet, sd15_target_modules(unet, 16, 8))
    assert len(prefixes) == 192 + 50
    # a well-known key of every kohya SD 1.5 LoRA
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0" in prefixes

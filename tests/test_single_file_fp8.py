"""ComfyUI's scaled-fp8 single files (the *_fp8_scaled downloads): each format ComfyUI v0.8.0 reads is written the
way its quantizer writes it (per-tensor absmax scale, float8 cast) and must load dequantized exactly as ComfyUI
computes it (weight.to(dtype) * scale.to(dtype)), detect as the same variant, and train; formats the trainer
cannot dequantize are refused by name before any weight loads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from family_helpers import header_only_file, meta_shapes, native_state_dict, native_wan_key
from fixtures_models import tiny_flux_path, tiny_wan21_path  # noqa: F401
from tests.media import textured_frames, write_caption, write_video
from trainer.errors import ModelError
from trainer.families.single_file import detect_variant, known_variants, load_single_file, read_shapes
from trainer.families.single_file.common import _read_tensors
from trainer.families.single_file.quantized import LEGACY, MIXED_METADATA, MIXED_TENSORS, file_quantization
from trainer.job import parse_job
from trainer.loop import train

FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def quantize(weight: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale) as ComfyUI's quantizer makes them (comfy/quant_ops.py "recalculate" scale,
    comfy_kitchen's eager quantize_per_tensor_fp8)."""
    lp_max = torch.finfo(fp8).max
    scale = torch.amax(weight.abs()).to(torch.float32) / lp_max
    q = torch.clamp(weight * (1.0 / scale).to(weight.dtype), -lp_max, lp_max).to(fp8)
    return q, scale


def quantized_layers(state: dict) -> list[str]:
    """The layers ComfyUI's fp8_scaled Wan files quantize: the Linear weights of the blocks."""
    return sorted(k[:-len(".weight")] for k, v in state.items()
                  if k.startswith(("blocks.", "model.diffusion_model.blocks.")) and k.endswith(".weight") and v.ndim == 2)


def write_scaled(path, state: dict, style: str, fmt: str = "float8_e4m3fn", layers=None) -> dict:
    """`state` written as a scaled-fp8 file of `style`; returns {weight key: (fp8 weight, scale)}."""
    layers = quantized_layers(state) if layers is None else layers
    out, quantized = dict(state), {}
    for layer in layers:
        q, scale = quantize(state[f"{layer}.weight"], FP8[fmt])
        out[f"{layer}.weight"] = q
        quantized[f"{layer}.weight"] = (q, scale)
        if style == LEGACY:
            out[f"{layer}.scale_weight"] = scale
            out[f"{layer}.scale_input"] = torch.tensor(1.0)
        else:
            out[f"{layer}.weight_scale"] = scale
            out[f"{layer}.input_scale"] = torch.tensor(0.5)
            if style == MIXED_TENSORS:
                conf = json.dumps({"format": fmt}).encode("utf-8")
                out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    metadata = None
    if style == LEGACY:
        prefix = "model.diffusion_model." if layers and layers[0].startswith("model.diffusion_model.") else ""
        out[f"{prefix}scaled_fp8"] = torch.empty(0, dtype=FP8[fmt])
    elif style == MIXED_METADATA:
        metadata = {"_quantization_metadata": json.dumps(
            {"format_version": "1.0", "layers": {layer: {"format": fmt} for layer in layers}})}
    save_file(out, str(path), metadata=metadata)
    return quantized


@pytest.fixture(scope="module")
def tiny_wan(tiny_wan21_path):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(tiny_wan21_path, subfolder="transformer")


def dequantized_reference(transformer, quantized: dict, prefix: str = "") -> dict:
    """The diffusers state dict the file must load as: fp8.to(f32) * scale for each scaled weight."""
    out = {}
    for k, v in transformer.state_dict().items():
        native = prefix + native_wan_key(k)
        out[k] = quantized[native][0].to(torch.float32) * quantized[native][1] if native in quantized else v
    return out


# ---------------------------------------------------------------------------------------------- supported formats


@pytest.mark.parametrize("style,fmt,prefix", [
    (LEGACY, "float8_e4m3fn", ""),
    (LEGACY, "float8_e4m3fn", "model.diffusion_model."),
    (MIXED_METADATA, "float8_e4m3fn", ""),
    (MIXED_METADATA, "float8_e5m2", ""),
    (MIXED_TENSORS, "float8_e4m3fn", "model.diffusion_model."),
], ids=["legacy", "legacy-prefixed", "metadata", "metadata-e5m2", "comfy_quant-prefixed"])
def test_scaled_fp8_wan_file_loads_dequantized_exactly(tiny_wan, tiny_wan21_path, tmp_path, style, fmt, prefix):
    state = native_state_dict(tiny_wan, prefix)
    path = tmp_path / "tiny_wan_fp8_scaled.safetensors"
    quantized = write_scaled(path, state, style, fmt)
    assert len(quantized) == 2 * 10  # per block: q k v o of both attentions, ffn.0 and ffn.2

    found = file_quantization(path)
    assert found.style == style and set(found.scales) == set(quantized)
    assert set(found.formats.values()) == {fmt}
    # detection sees the model's weights only: the same keys and shapes as the plain file
    assert read_shapes(path) == {k: tuple(v.shape) for k, v in state.items()}
    assert detect_variant(path, config=tiny_wan21_path / "transformer").family == "wan21"

    family = load_single_file(path, torch.float32, config=tiny_wan21_path / "transformer",
                              encoders_from=tiny_wan21_path)
    want = dequantized_reference(tiny_wan, quantized, prefix)
    got = family.denoiser.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k  # bit-exact: scaled layers dequantized, the others unchanged
    # the scales matter: a plain cast of the fp8 weight is far off
    weight, (q, scale) = next(iter(quantized.items()))
    assert scale.item() < 0.1 and not torch.allclose(q.float(), q.float() * scale)

    # in a half dtype the order is ComfyUI's: both cast to the dtype, then multiplied
    names = {k: k for k in quantized}
    bf16 = _read_tensors(path, names, torch.bfloat16)
    for k, (q, scale) in quantized.items():
        assert torch.equal(bf16[k], q.to(torch.bfloat16) * scale.to(torch.bfloat16)), k


def test_training_from_a_scaled_fp8_file(tiny_wan, tiny_wan21_path, tmp_path):
    path = tmp_path / "tiny_wan_fp8_scaled.safetensors"
    write_scaled(path, native_state_dict(tiny_wan), LEGACY)
    data = tmp_path / "clips"
    write_video(data / "clip.mp4", textured_frames(8, 32, 32), num_frames=8, width=32, height=32, gop=4)
    write_caption(data / "clip.mp4", "waves rolling")
    job = parse_job({
        "job": "fp8", "output_dir": str(tmp_path / "out"),
        "model": {"family": "wan21", "path": str(path), "dtype": "fp32", "config": str(tiny_wan21_path / "transformer"),
                  "encoders_from": str(tiny_wan21_path)},
        "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": 4, "batch_size": 1, "lr": 1e-3, "seed": 5},
        "save": {"every": 100, "resume": "none"},
    })
    run = train(job)
    losses = [r["loss"] for r in run.records]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    from safetensors import safe_open

    with safe_open(str(run.lora_path), framework="pt") as f:
        keys = list(f.keys())
        assert keys and all(torch.isfinite(f.get_tensor(k)).all() for k in keys)
    # the LoRA covers the scaled (fp8) layers: e.g. the first block's self-attention query
    assert any("blocks.0.self_attn.q" in k for k in keys), keys[:5]


def test_scaled_fp8_flux_file_loads_dequantized_exactly(tiny_flux_path, tmp_path):
    from diffusers import FluxTransformer2DModel

    from test_single_file_flux import bfl_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer")
    state = bfl_state_dict(transformer, "model.diffusion_model.")
    layers = sorted(k[:-len(".weight")] for k, v in state.items()
                    if k.startswith(("model.diffusion_model.double_blocks.", "model.diffusion_model.single_blocks."))
                    and k.endswith(".weight") and v.ndim == 2)
    path = tmp_path / "tiny_flux_fp8_scaled.safetensors"
    quantized = write_scaled(path, state, LEGACY, layers=layers)
    plain = tmp_path / "tiny_flux_dequantized.safetensors"
    save_file({k: quantized[k][0].float() * quantized[k][1] if k in quantized else v for k, v in state.items()},
              str(plain))
    got = load_single_file(path, torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path)
    want = load_single_file(plain, torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path)
    a, b = got.denoiser.state_dict(), want.denoiser.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in b)
    # the fused qkv of the double blocks is made of dequantized parts, so they differ from the bf16 weights
    assert not torch.equal(a["transformer_blocks.0.attn.to_q.weight"],
                           transformer.state_dict()["transformer_blocks.0.attn.to_q.weight"])


def test_released_sizes_are_detected_from_fp8_scaled_headers(tmp_path):
    """wan2.1_t2v_14B_fp8_scaled, wan2.2_t2v_*_noise_14B_fp8_scaled, ...: the header of each released variant
    with ComfyUI's scales added detects as that variant (the scales are not weights)."""
    from test_single_file_flux import released_shapes

    for v in known_variants():
        shapes, _ = meta_shapes(v.config, prefix="model.diffusion_model." if "i2v" in v.name else "")
        scaled = {f"{k[:-len('.weight')]}.scale_weight": () for k, shape in shapes.items()
                  if ".blocks." in f".{k}" and k.endswith(".weight") and len(shape) == 2}
        assert len(scaled) >= 10 * 20
        marker = "model.diffusion_model.scaled_fp8" if "i2v" in v.name else "scaled_fp8"
        file = tmp_path / f"{v.name}_fp8_scaled.safetensors"
        header_only_file(file, {**shapes, **scaled, marker: (0,)})
        assert detect_variant(file, family=v.family).name == v.name
        assert file_quantization(file).style == LEGACY and len(file_quantization(file).scales) == len(scaled)
    dev = released_shapes("flux1_dev")
    scales = {f"{k[:-len('.weight')]}.weight_scale": () for k, shape in dev.items()
              if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and len(shape) == 2}
    file = tmp_path / "flux1-dev-fp8-mixed.safetensors"
    layers = {k[:-len(".weight_scale")]: {"format": "float8_e4m3fn"} for k in scales}
    header_only_file(file, {**dev, **scales}, {"_quantization_metadata": json.dumps({"layers": layers})})
    assert detect_variant(file).name == "flux1_dev"
    assert file_quantization(file).style == MIXED_METADATA


# ---------------------------------------------------------------------------------------------- refused


def test_formats_the_trainer_cannot_dequantize_are_refused_by_name(tiny_wan, tiny_wan21_path, tmp_path):
    state = native_state_dict(tiny_wan)
    layer = "blocks.0.self_attn.q"

    def refused(path, match):
        with pytest.raises(ModelError, match=match):
            detect_variant(path, config=tiny_wan21_path / "transformer")
        with pytest.raises(ModelError, match=match):
            load_single_file(path, torch.float32, config=tiny_wan21_path / "transformer",
                             encoders_from=tiny_wan21_path)

    # nvfp4 (block-scaled fp4 in uint8, two scales) and mxfp8, declared in the metadata
    nvfp4 = tmp_path / "nvfp4.safetensors"
    out = dict(state)
    out[f"{layer}.weight"] = torch.zeros(128, 64, dtype=torch.uint8)
    out[f"{layer}.weight_scale"] = torch.zeros(128, 8, dtype=torch.uint8)
    out[f"{layer}.weight_scale_2"] = torch.tensor(1.0)
    save_file(out, str(nvfp4), metadata={"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {layer: {"format": "nvfp4"}}})})
    refused(nvfp4, r"quantized as nvfp4 \(ComfyUI's mixed-precision format.*layer blocks.0.self_attn.q\).*cannot "
                   r"dequantize")
    mixed = tmp_path / "mxfp8.safetensors"
    out = dict(state)
    conf = json.dumps({"format": "mxfp8"}).encode()
    out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    save_file(out, str(mixed))
    refused(mixed, r"quantized as mxfp8 \(ComfyUI's mixed-precision format \(<layer>.comfy_quant")

    # fp8 declared but stored in a uint8 container (ComfyUI v0.8.0 would cast it by value)
    container = tmp_path / "uint8.safetensors"
    q, scale = quantize(state[f"{layer}.weight"], torch.float8_e4m3fn)
    save_file({**state, f"{layer}.weight": q.view(torch.uint8), f"{layer}.weight_scale": scale},
              str(container), metadata={"_quantization_metadata": json.dumps(
                  {"layers": {layer: {"format": "float8_e4m3fn"}}})})
    refused(container, "blocks.0.self_attn.q.weight is stored as U8, not float8")

    # block scales on an fp8 layer, scales with no config, and a broken metadata entry
    block = tmp_path / "block.safetensors"
    save_file({**state, f"{layer}.weight": q, f"{layer}.weight_scale": torch.ones(128, 2)}, str(block),
              metadata={"_quantization_metadata": json.dumps({"layers": {layer: {"format": "float8_e4m3fn"}}})})
    refused(block, r"weight_scale has shape \[128, 2\], not one scale per tensor.*block-scaled formats")
    orphan = tmp_path / "orphan.safetensors"
    save_file({**state, f"{layer}.weight": q, f"{layer}.scale_weight": scale}, str(orphan))
    refused(orphan, "no quantization config .*no scaled_fp8 marker")
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata={"_quantization_metadata": "{not json"})
    refused(broken, "_quantization_metadata metadata is not ComfyUI's quantization metadata")

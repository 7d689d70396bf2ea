"""ComfyUI's scaled-fp8 diffusion-model files in a real ComfyUI (COMFYUI_ROOT; skips cleanly without it).

One tiny Wan 2.1 transformer (the ComfyUI-loadable one of tests/e2e/tiny_models.py) is written as a scaled-fp8
file in each format ComfyUI v0.8.0 reads (legacy scaled_fp8 / scale_weight; weight_scale with
_quantization_metadata; weight_scale with comfy_quant tensors), as CI's tests/test_single_file_fp8.py writes
them. Checked:
- ComfyUI's UNETLoader path (comfy.sd.load_diffusion_model) loads each file with the same layers quantized,
  and the weights its ops compute (comfy.ops.cast_bias_weight -> the layout's dequantize) equal the trainer's
  dequantized weights exactly, in float32 (ComfyUI's CPU compute dtype) and in bfloat16;
- a LoRA the trainer trains from the fp8 file (its own job, CPU) applies to that fp8 file in ComfyUI with 0
  unloaded keys and every module patched.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e import comfy_env

HERE = Path(__file__).resolve().parent
FORMATS = ("legacy", "metadata", "tensors")


def _styles():
    from trainer.families.single_file.quantized import LEGACY, MIXED_METADATA, MIXED_TENSORS

    return dict(zip(FORMATS, (LEGACY, MIXED_METADATA, MIXED_TENSORS)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{format: fp8 file}, the diffusers folder training reads encoders from, and the ComfyUI setup."""
    root, python = comfy_env.require_comfyui()
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.e2e.tiny_models import tiny_wan_transformer, wan_native_state_dict
    from tests.test_single_file_fp8 import write_scaled
    from trainer.tiny import build_tiny_wan21

    work = tmp_path_factory.mktemp("fp8_files")
    folder = build_tiny_wan21(work / "folder")
    # ComfyUI builds Wan with text_dim 4096 whatever the file holds: the ComfyUI-loadable transformer, and a text
    # encoder of that width so the trainer's own pipeline feeds it.
    transformer = tiny_wan_transformer(seed=0)
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer")
    config = UMT5Config.from_pretrained(folder / "text_encoder")
    config.d_model = 4096
    torch.manual_seed(1)
    encoder = UMT5EncoderModel(config)
    shutil.rmtree(folder / "text_encoder")
    encoder.save_pretrained(folder / "text_encoder")

    native = wan_native_state_dict(transformer)
    paths, quantized = {}, {}
    for name, style in _styles().items():
        paths[name] = work / f"tiny_wan_{name}_fp8_scaled.safetensors"
        quantized[name] = write_scaled(paths[name], native, style)
    return {"root": root, "python": python, "work": work, "folder": folder, "paths": paths, "quantized": quantized}


def _comfy_weights(files, name):
    out = files["work"] / f"comfy_{name}"
    done = subprocess.run([str(files["python"]), str(HERE / "comfy_fp8_weights.py"), str(files["paths"][name]),
                           f"{out}.safetensors", f"{out}.json"], cwd=files["root"], capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load_file(f"{out}.safetensors"), json.loads(Path(f"{out}.json").read_text())


@pytest.mark.comfyui
@pytest.mark.parametrize("name", FORMATS)
def test_comfyui_computes_the_weights_the_trainer_loads(files, name):
    from tests.e2e.tiny_models import wan_native_state_dict
    from trainer.families.single_file import detect_variant, load_wan_transformer, read_shapes
    from trainer.families.single_file.common import _read_tensors

    path = files["paths"][name]
    comfy, info = _comfy_weights(files, name)
    assert info["model_class"] == "WAN21" and not info["missing"] and not info["unexpected"], info
    assert set(info["quantized"]) == set(files["quantized"][name])  # ComfyUI quantizes the same layers
    variant = detect_variant(path, config=files["folder"] / "transformer")
    ours = wan_native_state_dict(load_wan_transformer(path, variant, torch.float32))
    assert set(ours) == {k for k in comfy if "@" not in k}
    worst = {"quantized": 0.0, "plain": 0.0, "bf16": 0.0}
    for k, v in ours.items():
        kind = "quantized" if k in info["quantized"] else "plain"
        assert comfy[k].dtype == torch.float32 == v.dtype, k  # ComfyUI's compute dtype on CPU
        worst[kind] = max(worst[kind], (comfy[k] - v).abs().max().item())
        if kind == "quantized":
            assert torch.equal(comfy[k + "@f32"], comfy[k]), k
            # (a plain cast without the scale would be ~1/scale off)
            assert (comfy[k] - files["quantized"][name][k][0].float()).abs().max() > 1.0, k
    shapes = read_shapes(path)
    bf16 = _read_tensors(path, {k: k for k in info["quantized"] if k in shapes}, torch.bfloat16)
    for k, v in bf16.items():
        worst["bf16"] = max(worst["bf16"], (comfy[k + "@bf16"].float() - v.float()).abs().max().item())
    print(f"{name}: max |ComfyUI - trainer| weight difference {worst} over {len(info['quantized'])} fp8 layers")
    assert worst == {"quantized": 0.0, "plain": 0.0, "bf16": 0.0}


@pytest.mark.comfyui
def test_lora_trained_from_fp8_file_applies_to_it_in_comfyui(files):
    from tests.media import textured_frames, write_caption, write_video
    from trainer.job import parse_job
    from trainer.loop import train

    data = files["work"] / "clips"
    write_video(data / "clip.mp4", textured_frames(8, 32, 32), num_frames=8, width=32, height=32, gop=4)
    write_caption(data / "clip.mp4", "waves rolling")
    loras = {}
    for name in ("legacy", "metadata"):
        job = parse_job({
            "job": f"fp8_{name}", "output_dir": str(files["work"] / f"out_{name}"),
            "model": {"family": "wan21", "path": str(files["paths"][name]), "dtype": "fp32",
                      "config": str(files["folder"] / "transformer"), "encoders_from": str(files["folder"])},
            "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
            "network": {"linear": 4, "linear_alpha": 4},
            "train": {"steps": 3, "batch_size": 1, "lr": 1e-3, "seed": 5},
            "save": {"every": 100, "resume": "none"},
        })
        run = train(job)
        assert len(run.records) == 3 and all(math.isfinite(r["loss"]) for r in run.records)
        loras[name] = run.lora_path
    for name, lora in loras.items():
        keys = load_file(str(lora))
        modules = {k[:-len(".lora_down.weight")] for k in keys if k.endswith(".lora_down.weight")}
        assert modules
        (files["work"] / f"deltas_{name}").mkdir(exist_ok=True)
        result = comfy_env.probe(files["paths"][name], lora, dump_dir=files["work"] / f"deltas_{name}")
        assert result["model_class"] == "WAN21", result["model_class"]
        assert result["not_loaded"] == [] and result["not_patched"] == [], result["not_loaded"][:5]
        assert result["patches_applied"] == len(modules)
        fp8_targets = [t for t in result["lora_targets"].values()
                       if t.removeprefix("diffusion_model.") in files["quantized"][name]]
        assert fp8_targets  # the LoRA patches ComfyUI's fp8 layers too
        # ComfyUI folds a LoRA into an fp8 layer as dequantize + delta + re-quantize (stochastic rounding), so
        # there the delta it applies is the LoRA's plus fp8 rounding: measured, not asserted (ComfyUI's choice).
        deltas, ratios, corr = load_file(result["deltas_file"]), [], []
        for module, target in result["lora_targets"].items():
            up, down = keys[module + ".lora_up.weight"].double(), keys[module + ".lora_down.weight"].double()
            want = (up @ down) * keys[module + ".alpha"].double() / up.shape[1]
            got = deltas[target].double()
            ratios.append(((got - want).abs().max() / want.abs().max()).item())
            corr.append(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1].item())
        print(f"{name}: {len(modules)} LoRA modules, {result['patches_applied']} patched "
              f"({len(fp8_targets)} on fp8 layers), 0 unloaded keys; ComfyUI's applied delta vs the LoRA's on fp8 "
              f"layers: max|diff|/max|delta| median {sorted(ratios)[len(ratios) // 2]:.2f}, "
              f"correlation median {sorted(corr)[len(corr) // 2]:.3f}")

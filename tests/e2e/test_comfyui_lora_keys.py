"""Does real ComfyUI apply our LoRA files, every key, with exactly the delta we intend?

ComfyUI's LoraLoader logs "lora key not loaded" for keys it cannot map and still succeeds, so a wrongly named
export looks fine in a workflow. These tests build tiny real diffusers models here, save them the way ComfyUI
loads them, write LoRA files (hand-made with known deltas, and made by trainer.export), and ask a real
ComfyUI (COMFYUI_ROOT; see tests/e2e/comfy_env.py) what it applied. Without COMFYUI_ROOT they skip, except the
first test, which checks our Wan name conversion against diffusers' own converter and needs no ComfyUI.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.e2e import comfy_env
from tests.e2e.tiny_models import (
    random_lora,
    save_safetensors,
    tiny_sd15_unet,
    tiny_wan_transformer,
    wan_native_state_dict,
)
from trainer.export import save_lora
from trainer.families.base import LoadedModel
from trainer.families.sd15 import SD15
from trainer.families.wan21 import Wan21
from trainer.lora import LoRANetwork

RANK = 4
DIFFUSERS_PREFIXES = ("transformer.", "diffusion_model.")  # diffusers module names under either prefix
DELTA_ATOL = 1e-6


def weight_modules(model: nn.Module, kinds=(nn.Linear, nn.Conv2d, nn.Conv3d)) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def trainer_lora(model: nn.Module, family, path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA as our trainer writes it: the family's targets, LoRANetwork, alphas moved off the rank (as a
    phase schedule does), non-zero up weights (fresh ones are zero), trainer.export.save_lora.
    Returns the delta each module adds, keyed by export prefix."""
    network = LoRANetwork(family.target_modules(RANK, RANK), linear_rank=RANK, linear_alpha=RANK,
                          conv_rank=RANK, conv_alpha=RANK)
    network.set_alphas({"linear": 2.5, "conv": 7.0})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in network.lora.values():
            m.up.weight.copy_(torch.randn(m.up.weight.shape, generator=gen) * 0.1)
    save_lora(path, network, family, metadata={})
    return {type(family).export_prefix(m.name): m.delta_weight() for m in network.lora.values()}


def assert_applies_exactly(result: dict, expected: dict[str, torch.Tensor]) -> float:
    """Every LoRA module mapped and patched, nothing else touched, ComfyUI's delta = ours. Returns max error."""
    assert result["model_missing"] == [] and result["model_unexpected"] == []
    assert result["not_loaded"] == [], f"ComfyUI ignored {len(result['not_loaded'])} keys: {result['not_loaded'][:5]}"
    assert result["not_patched"] == []
    assert result["changed_without_patch"] == []
    assert sorted(result["lora_targets"]) == sorted(expected)
    assert result["patches_applied"] == len(expected)
    assert sorted(result["lora_targets"].values()) == result["patched_keys"]
    deltas = load_file(result["deltas_file"])
    worst = 0.0
    for prefix, want in expected.items():
        got = deltas[result["lora_targets"][prefix]].double()
        assert got.shape == want.shape, prefix
        worst = max(worst, float((got - want).abs().max()))
    assert worst <= DELTA_ATOL, f"ComfyUI's weight delta differs from alpha/rank * up @ down by {worst}"
    return worst


def lora_modules_of(keys) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}


# ---- Wan 2.1 ----

def test_wan_native_names_round_trip_through_diffusers_converter():
    """Our native Wan state dict must be what diffusers' single-file loader maps back to the same model."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    transformer = tiny_wan_transformer()
    native = wan_native_state_dict(transformer)
    assert "head.modulation" in native and "blocks.0.self_attn.q.weight" in native
    back = convert_wan_transformer_to_diffusers(dict(native))
    original = transformer.state_dict()
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    comfy_env.require_comfyui()
    tmp = tmp_path_factory.mktemp("wan")
    transformer = tiny_wan_transformer()
    model_file = save_safetensors(wan_native_state_dict(transformer), tmp / "tiny_wan.safetensors")

    modules = weight_modules(transformer)  # every Linear and the Conv3d patch embedding, blocks and embedders
    every, every_expected = random_lora(modules, RANK, naming=Wan21.export_prefix)
    every_file = save_safetensors(every, tmp / "every_module.safetensors")
    trainer_file = tmp / "trainer.safetensors"
    trainer_expected = trainer_lora(transformer, Wan21(LoadedModel(denoiser=transformer)), trainer_file)
    diffusers_files = []
    for prefix in DIFFUSERS_PREFIXES:
        tensors, _ = random_lora(modules, RANK, naming=lambda n, p=prefix: p + n)
        diffusers_files.append(save_safetensors(tensors, tmp / f"diffusers_names_{prefix[:-1]}.safetensors"))

    files = [every_file, trainer_file, *diffusers_files]
    results = comfy_env.probe_many(model_file, files, dump_dir=tmp)
    return {
        "dir": tmp, "model_file": model_file, "native": load_file(str(model_file)),
        "every": (results[0], {Wan21.export_prefix(n): d for n, d in every_expected.items()}),
        "trainer": (results[1], trainer_expected, trainer_file),
        "diffusers": list(zip(DIFFUSERS_PREFIXES, results[2:], diffusers_files)),
        "modules": modules,
    }


@pytest.mark.comfyui
def test_wan_tiny_model_is_detected_as_wan21(wan):
    result = wan["every"][0]
    assert result["model_config"] == "WAN21_T2V"
    assert result["model_missing"] == [] and result["model_unexpected"] == []
    config = result["unet_config"]
    assert (config["dim"], config["num_heads"], config["num_layers"], config["ffn_dim"]) == (128, 1, 2, 256)


@pytest.mark.comfyui
def test_wan_lora_on_every_module_applies_exactly(wan):
    result, expected = wan["every"]
    assert len(expected) == 27  # 2 blocks x 10 Linear + patch embedding + 6 embedder/head Linear
    assert_applies_exactly(result, expected)


@pytest.mark.comfyui
def test_wan_trainer_export_applies_exactly(wan):
    result, expected, _ = wan["trainer"]
    assert any(k.endswith("patch_embedding") for k in expected)
    assert_applies_exactly(result, expected)


@pytest.mark.comfyui
def test_wan_diffusers_names_are_silently_ignored(wan):
    """The negative control: ComfyUI maps no diffusers-named Wan module. Only `patch_embedding`, whose name is
    the same in both conventions, applies under the `diffusion_model.` prefix."""
    same_name = {n for n in wan["modules"] if Wan21.export_prefix(n) == "diffusion_model." + n}
    assert same_name == {"patch_embedding"}
    for prefix, result, lora_file in wan["diffusers"]:
        applies = same_name if prefix == "diffusion_model." else set()
        assert set(result["lora_targets"]) == {prefix + n for n in applies}
        assert result["patches_applied"] == len(applies)
        ignored = {prefix + n for n in wan["modules"]} - set(result["lora_targets"])
        assert lora_modules_of(result["not_loaded"]) == ignored
        assert len(result["not_loaded"]) == len(load_file(str(lora_file))) - 3 * len(applies)


@pytest.mark.comfyui
def test_wan_lora_through_comfyui_server_lora_loader_node(wan, tmp_path):
    """The stock nodes over HTTP: UNETLoader -> LoraLoaderModelOnly -> ModelSave; the saved weights must be the
    base plus our delta. Exercises comfy_env's server, /prompt, ws messages and /history."""
    _, expected, trainer_file = wan["trainer"]
    base = comfy_env.prepare_base_dir(tmp_path / "base")
    shutil.copy(wan["model_file"], base / "models" / "diffusion_models" / "tiny_wan.safetensors")
    shutil.copy(trainer_file, base / "models" / "loras" / "phase_trainer_wan.safetensors")
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": "phase_trainer_wan.safetensors", "strength_model": 1.0}},
        "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "e2e/wan_lora"}},
    }
    with comfy_env.start_server(base) as server:
        assert "LoraLoaderModelOnly" in server.object_info()
        entry, messages = server.run_prompt(prompt, timeout=300)
        log = server.log()
    types = [m["type"] for m in messages]
    assert "execution_start" in types and types[-1] == "execution_success"
    assert {m["data"]["node"] for m in messages if m["type"] == "executing"} >= {"1", "2", "3"}
    assert entry["status"]["status_str"] == "success"
    assert "lora key not loaded" not in log

    saved_files = list((base / "output" / "e2e").glob("wan_lora_*.safetensors"))
    assert len(saved_files) == 1
    saved = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(saved_files[0])).items()}
    native = wan["native"]
    assert sorted(saved) == sorted(native)
    patched = {prefix.removeprefix("diffusion_model.") + ".weight": d for prefix, d in expected.items()}
    for key, weight in native.items():
        delta = saved[key].double() - weight.double()
        want = patched.get(key)
        if want is None:
            assert torch.equal(saved[key], weight), key
        else:
            assert float((delta - want).abs().max()) <= DELTA_ATOL, key


# ---- SD 1.5 ----

@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    comfy_env.require_comfyui()
    tmp = tmp_path_factory.mktemp("sd15")
    unet = tiny_sd15_unet()
    diffusers_file = save_safetensors(unet.state_dict(), tmp / "tiny_sd15_diffusers.safetensors")

    modules = weight_modules(unet)  # every Linear and Conv2d of the UNet, kohya-named
    every, every_expected = random_lora(modules, RANK, naming=SD15.export_prefix)
    every_file = save_safetensors(every, tmp / "every_module.safetensors")
    trainer_file = tmp / "trainer.safetensors"
    trainer_expected = trainer_lora(unet, SD15(LoadedModel(denoiser=unet)), trainer_file)
    peft, _ = random_lora(modules, RANK, naming=lambda n: "unet." + n)
    peft_file = save_safetensors(peft, tmp / "peft_names.safetensors")

    ldm_file = tmp / "tiny_sd15_ldm.safetensors"
    results = comfy_env.probe_many(diffusers_file, [every_file, trainer_file, peft_file], dump_dir=tmp,
                                   diffusers_unet=True, save_converted=ldm_file)
    return {
        "every": (results[0], {SD15.export_prefix(n): d for n, d in every_expected.items()}),
        "trainer": (results[1], trainer_expected),
        "peft": (results[2], peft_file, modules),
        "ldm_file": ldm_file,
    }


@pytest.mark.comfyui
def test_sd15_tiny_unet_is_detected_as_sd15(sd15):
    result = sd15["every"][0]
    assert result["model_config"] == "SD15"
    assert result["model_missing"] == [] and result["model_unexpected"] == []
    config = result["unet_config"]
    assert (config["model_channels"], config["context_dim"], config["channel_mult"]) == (320, 768, [1, 1])
    assert load_file(str(sd15["ldm_file"]))  # the converted UNet ComfyUI's UNETLoader can read


@pytest.mark.comfyui
def test_sd15_kohya_lora_on_every_module_applies_exactly(sd15):
    result, expected = sd15["every"]
    assert any("downsamplers" in k for k in expected) and any("upsamplers" in k for k in expected)
    assert_applies_exactly(result, expected)


@pytest.mark.comfyui
def test_sd15_trainer_export_applies_exactly(sd15):
    result, expected = sd15["trainer"]
    assert any("resnets_0_conv1" in k for k in expected) and any("attn2_to_k" in k for k in expected)
    assert_applies_exactly(result, expected)


@pytest.mark.comfyui
def test_sd15_peft_names_lose_exactly_the_attention_projections(sd15):
    """PEFT-style `unet.<diffusers path>` is a partial trap: ComfyUI's map has `unet.<path>` for every module
    except attention projections, which it only knows as `...attnN.processor.to_q` etc. So resnets, proj_in/out
    and ff apply while every to_q/to_k/to_v/to_out.0 is dropped with a log line."""
    result, peft_file, modules = sd15["peft"]
    attention = {n for n in modules if any(f".to_{p}" in n for p in ("q", "k", "v", "out"))}
    assert attention
    assert lora_modules_of(result["not_loaded"]) == {"unet." + n for n in attention}
    assert result["patches_applied"] == len(modules) - len(attention)

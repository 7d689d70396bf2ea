"""Single-file SD 1.5 checkpoints (ComfyUI models/checkpoints, original ldm format): detection from shapes,
strict loading through diffusers' ldm conversions with the shipped configs, the tokenizer sources, the errors,
and training equivalence with the diffusers folder of the same weights.

The checkpoint is made here from the tiny diffusers folder by the inverse of diffusers' ldm -> diffusers key
mapping (diffusers ships that direction only, in scripts/ that are not part of the package), so a loaded file
equal to the folder bit for bit shows the two directions agree."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from family_helpers import header_only_file
from fixtures_models import tiny_sd15_path  # noqa: F401
from tests.media import write_caption
from trainer.errors import ModelError
from trainer.families import get_family
from trainer.families.single_file import (
    SD15_CONFIG_DIR,
    detect_variant,
    load_sd15_configs,
    load_single_file,
    sd_facts_from_configs,
)
from trainer.job import parse_job
from trainer.loop import train

# ---------------------------------------------------------------------------------------------- diffusers -> ldm

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_unet_key(key: str, config: dict) -> str:
    n = config["layers_per_block"]
    crossattn_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    module, param = key.rsplit(".", 1)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = f"input_blocks.{i * (n + 1) + j + 1}"
        return f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = f"output_blocks.{i * (n + 1) + j}"
        return f"{block}.0.{_resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{i * (n + 1) + n}.{2 if crossattn_up[i] else 1}.conv.{m[2]}"
    raise KeyError(key)


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        rest = rest.replace(new, old)
    return rest


def ldm_vae_key(key: str, config: dict) -> str:
    levels = len(config["block_out_channels"])
    key = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2]
        for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                         ("to_out.0", "proj_out")):
            rest = rest.replace(new, old)
        return f"{m[1]}.mid.attn_1.{rest}"
    top = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    module, param = key.rsplit(".", 1)
    return f"{top.get(module, module)}.{param}"  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def ldm_checkpoint(folder) -> dict:
    """The original-format state dict of a diffusers SD folder, as an ldm / ComfyUI checkpoint stores it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return ldm_state_dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                          AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                          CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"))


def ldm_state_dict(unet, vae, text) -> dict:
    """The original-format state dict of diffusers SD models (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)."""
    out = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + ldm_unet_key(k, unet.config)] = v
    for k, v in vae.state_dict().items():
        key = ldm_vae_key(k, vae.config)
        if ".mid.attn_1." in key and key.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # ldm's attention projections are 1x1 convs
        out["first_stage_model." + key] = v
    for k, v in text.state_dict().items():
        out["cond_stage_model.transformer.text_model." + k] = v
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(
        text.config.max_position_embeddings)[None]
    # what original checkpoints also carry: the DDPM schedule buffers (ignored by the loader)
    out["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def released_ldm_shapes():
    """{ldm key: shape} of the released SD 1.5 architecture (the shipped configs, built on the meta device)."""
    from trainer.families.single_file import _sd_meta_models

    configs, _ = load_sd15_configs()
    unet, vae, text = _sd_meta_models(configs)
    shapes = {"model.diffusion_model." + ldm_unet_key(k, unet.config): tuple(v.shape)
              for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        key = ldm_vae_key(k, vae.config)
        shapes["first_stage_model." + key] = tuple(v.shape) + ((1, 1) if ".mid.attn_1." in key and v.ndim == 2
                                                               and key.endswith("weight") else ())
    shapes.update({"cond_stage_model.transformer.text_model." + k: tuple(v.shape) for k, v in text.state_dict().items()})
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in (("unet", unet), ("vae", vae),
                                                                          ("text", text))}
    return shapes, sizes


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_sd15_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd15file") / "tiny_sd15.safetensors"
    save_file(ldm_checkpoint(tiny_sd15_path), str(path))
    return path


# ---------------------------------------------------------------------------------------------- shipped configs


def test_released_sd15_is_detected_from_its_header(tmp_path):
    shapes, sizes = released_ldm_shapes()
    # the released sizes: UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text tower 123.1 M parameters
    assert 859e6 < sizes["unet"] < 860e6 and 83e6 < sizes["vae"] < 84e6 and 123e6 < sizes["text"] < 123.2e6
    assert len(shapes) == 686 + 248 + 196
    file = tmp_path / "v1-5-pruned-emaonly.safetensors"
    header_only_file(file, {**shapes, "model_ema.decay": (), "alphas_cumprod": (1000,)})
    variant = detect_variant(file)
    assert variant.name == "sd15" and variant.family == "sd15" and "epsilon" in variant.description
    assert detect_variant(file, config="v_prediction").config["scheduler"]["prediction_type"] == "v_prediction"
    assert get_family("sd15").name == "sd15"


def test_shipped_configs_are_the_release_architecture():
    configs, _ = load_sd15_configs()
    assert sd_facts_from_configs(configs) == {
        "in_channels": 4, "model_channels": 320, "out_channels": 4, "levels": 4, "res_blocks": 2,
        "context_dim": 768, "text_hidden": 768, "text_layers": 12, "vae_channels": 128, "latent_channels": 4}
    assert configs["scheduler"]["prediction_type"] == "epsilon" and configs["vae"]["scaling_factor"] == 0.18215
    assert sum(p.stat().st_size for p in SD15_CONFIG_DIR.rglob("*.json")) < 8192


def test_sdxl_sd2_inpainting_and_partial_files_are_refused(tmp_path):
    shapes, _ = released_ldm_shapes()
    cases = {
        "sdxl": ({**shapes, "conditioner.embedders.1.model.ln_final.weight": (1280,),
                  "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}, "SDXL checkpoint"),
        "sd2": ({**{k: s for k, s in shapes.items() if not k.startswith("cond_stage_model.")},
                 "cond_stage_model.model.ln_final.weight": (1024,)}, "SD 2.x checkpoint"),
        "inpaint": ({**shapes, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
        "novae": ({k: s for k, s in shapes.items() if not k.startswith("first_stage_model.")}, "without first_stage"),
    }
    for name, (case, message) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        header_only_file(file, case)
        with pytest.raises(ModelError, match=message) as err:
            detect_variant(file)
        assert str(file) in str(err.value)
        if name in ("sdxl", "sd2"):
            assert "not supported as a single file yet" in str(err.value) and "Found: " not in str(err.value)
            assert "context_dim=" in str(err.value)
    # a UNet alone is neither Wan nor a full checkpoint
    unet_only = tmp_path / "unet.safetensors"
    header_only_file(unet_only, {k: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")})
    with pytest.raises(ModelError, match="not a model file the trainer knows.*full SD 1.5"):
        detect_variant(unet_only)


def test_a_missing_tensor_is_named_before_loading(tmp_path):
    shapes, _ = released_ldm_shapes()
    del shapes["model.diffusion_model.middle_block.1.proj_in.weight"]
    file = tmp_path / "broken.safetensors"
    header_only_file(file, shapes)
    with pytest.raises(ModelError, match=r"unet: 1 parameters missing \(e.g. \['mid_block.attentions.0.proj_in"):
        detect_variant(file)


# ---------------------------------------------------------------------------------------------- loading


def test_tiny_checkpoint_loads_bit_exactly(tiny_checkpoint, tiny_sd15_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    with pytest.raises(ModelError, match="does not match the shipped SD 1.5 configs.*context_dim: file 32 vs "
                                         "config 768.*give its diffusers SD folder"):
        detect_variant(tiny_checkpoint)
    family = load_single_file(tiny_checkpoint, torch.float32, config=tiny_sd15_path, encoders_from=tiny_sd15_path)
    assert family.name == "sd15" and family.loaded.extra["variant"] == "custom"
    assert family.prediction_type == "epsilon" and family.resolution_factor == 8
    references = {
        "unet": (family.denoiser, UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet")),
        "vae": (family.loaded.vae, AutoencoderKL.from_pretrained(tiny_sd15_path, subfolder="vae")),
        "text": (family.loaded.text_encoders[0],
                 CLIPTextModel.from_pretrained(tiny_sd15_path, subfolder="text_encoder")),
    }
    for name, (got, want) in references.items():
        got_sd, want_sd = got.state_dict(), want.state_dict()
        assert set(got_sd) == set(want_sd), name
        for k in want_sd:
            assert torch.equal(got_sd[k], want_sd[k]), f"{name}: {k}"
        assert not any(p.requires_grad for p in got.parameters()) and not got.training
    # same prompt embeddings and latents as the folder's family
    folder = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
    captions = ["a red fox", ""]
    for a, b in zip(family.encode_prompts(captions), folder.encode_prompts(captions)):
        assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])
    pixels = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    assert torch.equal(family.encode_pixels(pixels), folder.encode_pixels(pixels))


def test_dtypes_prediction_override_and_classmethod(tiny_checkpoint, tiny_sd15_path, tmp_path):
    family = get_family("sd15").from_single_file(str(tiny_checkpoint), torch.bfloat16, config=tiny_sd15_path,
                                                 encoders_from=tiny_sd15_path)
    assert {p.dtype for p in family.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in family.loaded.text_encoders[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in family.loaded.vae.parameters()} == {torch.float32}  # SD's VAE overflows in fp16
    # v-prediction is not in the file: a config says so (here a JSON file with the tiny components and the type)
    configs, _ = load_sd15_configs(tiny_sd15_path)
    doc = tmp_path / "vpred.json"
    doc.write_text(json.dumps({**{k: configs[k] for k in ("unet", "vae", "text_encoder")},
                               "prediction_type": "v_prediction"}))
    vpred = load_single_file(tiny_checkpoint, torch.float32, config=doc, encoders_from=tiny_sd15_path)
    assert vpred.prediction_type == "v_prediction" and vpred.scheduler.config.prediction_type == "v_prediction"
    assert load_sd15_configs("v_prediction")[0]["scheduler"]["prediction_type"] == "v_prediction"
    assert load_sd15_configs(tmp_path / "v_prediction")[0]["scheduler"]["prediction_type"] == "v_prediction"
    with pytest.raises(ModelError, match="unknown keys"):
        load_sd15_configs({"unet_config": {}})
    with pytest.raises(ModelError, match="prediction_type 'sample'"):
        load_sd15_configs({"prediction_type": "sample"})
    with pytest.raises(ModelError, match="trained by model.family 'sd15', not 'wan21'"):
        load_single_file(tiny_checkpoint, torch.float32, config=tiny_sd15_path, encoders_from=tiny_sd15_path,
                         family="wan21")


def test_tokenizer_sources(tiny_checkpoint, tiny_sd15_path, tmp_path):
    with pytest.raises(ModelError, match="holds no tokenizer files.*encoders_from.*comfy/sd1_tokenizer"):
        load_single_file(tiny_checkpoint, torch.float32, config=tiny_sd15_path)
    # a plain tokenizer folder (as ComfyUI's comfy/sd1_tokenizer is) passed as tokenizer_from
    family = load_single_file(tiny_checkpoint, torch.float32, config=tiny_sd15_path,
                              tokenizer_from=tiny_sd15_path / "tokenizer")
    assert family.loaded.tokenizers[0]("a fox").input_ids[0] == family.loaded.tokenizers[0].bos_token_id
    with pytest.raises(ModelError, match="no CLIP tokenizer there"):
        load_single_file(tiny_checkpoint, torch.float32, config=tiny_sd15_path, encoders_from=tmp_path)


def test_fp16_checkpoint_and_separate_vae_file(tiny_checkpoint, tiny_sd15_path, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_checkpoint))
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(half))
    vae_file = tmp_path / "vae.safetensors"  # models/vae files have the VAE's keys without first_stage_model.
    save_file({k.removeprefix("first_stage_model."): v * 2 for k, v in state.items()
               if k.startswith("first_stage_model.")}, str(vae_file))
    family = load_single_file(half, torch.float32, config=tiny_sd15_path, encoders_from=tiny_sd15_path,
                              vae_file=vae_file)
    conv = family.denoiser.conv_in.weight
    assert torch.equal(conv, state["model.diffusion_model.input_blocks.0.0.weight"].half().float())
    assert torch.equal(family.loaded.vae.encoder.conv_in.weight, state["first_stage_model.encoder.conv_in.weight"] * 2)


# ---------------------------------------------------------------------------------------------- training


def test_training_from_checkpoint_equals_training_from_folder(tiny_checkpoint, tiny_sd15_path, tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        rng = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(32, 32, 3, generator=rng) * 255).byte().numpy()).save(data / f"{i}.png")
        write_caption(data / f"{i}.png", f"pattern {i}")

    def job(name, **model):
        return parse_job({
            "job": name, "output_dir": str(tmp_path / name),
            "model": {"family": "sd15", "path": str(tiny_sd15_path), "dtype": "fp32", **model},
            "datasets": [{"folder_path": str(data), "resolution": [32]}],
            "network": {"linear": 4, "linear_alpha": 4, "conv": 2, "conv_alpha": 2},
            "train": {"steps": 10, "batch_size": 1, "lr": 1e-3, "seed": 3},
            "save": {"every": 100, "resume": "none"},
        })

    folder_run = train(job("folder"))
    single = load_single_file(tiny_checkpoint, torch.float32, config=tiny_sd15_path, encoders_from=tiny_sd15_path)
    file_run = train(job("file"), family=single)
    # the job file alone, as `python -m trainer run` and Export Job do it
    cli_run = train(job("cli", path=str(tiny_checkpoint), config=str(tiny_sd15_path),
                        encoders_from=str(tiny_sd15_path)))
    losses = [[r["loss"] for r in run.records] for run in (folder_run, file_run, cli_run)]
    assert len(losses[0]) == 10
    assert losses[1] == losses[0] and losses[2] == losses[0]  # same weights, same arithmetic: identical
    for k, v in folder_run.lora_state.items():
        assert torch.equal(v, file_run.lora_state[k]) and torch.equal(v, cli_run.lora_state[k]), k


# ---------------------------------------------------------------------------------------------- node helpers


def test_node_spec_names_the_tokenizer_and_loads(tiny_checkpoint, tiny_sd15_path, tmp_path):
    from trainer import comfy_bridge as cb
    from trainer.comfy_bridge import Dataset

    configs_only = tmp_path / "configs_only"
    for name in ("unet", "vae", "text_encoder"):
        (configs_only / name).mkdir(parents=True)
        (configs_only / name / "config.json").write_bytes((tiny_sd15_path / name / "config.json").read_bytes())
    with pytest.raises(ModelError, match="holds no tokenizer files"):  # at the load node, not at Train time
        cb.single_file_model(tiny_checkpoint, "fp32", str(configs_only))
    with pytest.raises(ModelError, match="vae_channels: file 8 vs config 128"):  # a unet config.json alone
        cb.single_file_model(tiny_checkpoint, "fp32", str(tiny_sd15_path / "unet" / "config.json"))
    # the config folder's tokenizer is the user's choice and wins over ComfyUI's copy
    comfy_copy = tmp_path / "sd1_tokenizer"
    comfy_copy.mkdir()
    for f in (tiny_sd15_path / "tokenizer").iterdir():
        (comfy_copy / f.name).write_bytes(f.read_bytes())
    spec = cb.single_file_model(tiny_checkpoint, "fp32", str(tiny_sd15_path), tokenizer_from=comfy_copy)
    assert spec["family"] == "sd15" and spec["encoders_from"] == str(tiny_sd15_path / "tokenizer")
    spec = cb.single_file_model(tiny_checkpoint, "fp32", str(configs_only), tokenizer_from=comfy_copy)
    assert spec["encoders_from"] == str(comfy_copy)
    family = cb.load_model_for_nodes(spec, torch.float32)
    assert family.name == "sd15" and family.loaded.tokenizers[0].name_or_path == str(comfy_copy)
    mapping = cb.build_job_mapping(job_name="j", model=spec, dataset=Dataset(configs=({"folder_path": "/x"},)),
                                   network={"linear": 4, "linear_alpha": 4}, schedule=None, train={"steps": 2},
                                   output_dir=tmp_path, resume=False, save_every=10)
    assert mapping["model"] == {"family": "sd15", "path": str(tiny_checkpoint), "dtype": "fp32",
                                "config": str(configs_only), "encoders_from": str(comfy_copy)}

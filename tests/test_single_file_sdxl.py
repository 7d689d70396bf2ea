"""Single-file SDXL base checkpoints (ComfyUI models/checkpoints, original ldm format): detection of the shipped
SDXL architecture from a header, strict bit-exact loading of a tiny SDXL through diffusers' ldm / OpenCLIP
conversions, training equivalence with the diffusers folder, and the refusals.

The checkpoint is made here from the tiny diffusers folder by the inverse mapping (the SD 1.5 test's UNet / VAE
key inverse, plus label_emb and the OpenCLIP tower: fused in_proj, transposed text_projection)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fixtures_models import tiny_sdxl_path  # noqa: F401
from tests.media import write_caption
from family_helpers import header_only_file
from tests.test_single_file_sd15 import ldm_unet_key, ldm_vae_key
from trainer.errors import ModelError
from trainer.families import get_family
from trainer.families.single_file import (
    _sd_meta_model_dict,
    detect_variant,
    load_sd_configs,
    load_single_file,
    sd_facts_from_configs,
)
from trainer.job import parse_job
from trainer.loop import train

_OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def xl_unet_key(key: str, config) -> str:
    for new, old in (("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")):
        if key.startswith(new):
            return old + key[len(new):]
    return ldm_unet_key(key, config)


def open_clip_state(text_2) -> dict:
    """CLIPTextModelWithProjection -> OpenCLIP names (conditioner.embedders.1.model.*)."""
    sd = text_2.state_dict()
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T,  # OpenCLIP multiplies x @ text_projection
           "logit_scale": torch.tensor(4.6052)}  # carried by real files, unused by the text tower
    for i in range(text_2.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for new, old in _OPEN_CLIP_LAYER:
                out[f"{dst}{old}.{kind}"] = sd[f"{src}{new}.{kind}"]
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


def ldm_xl_state_dict(unet, vae, text, text_2) -> dict:
    out = {"model.diffusion_model." + xl_unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        key = ldm_vae_key(k, vae.config)
        if ".mid.attn_1." in key and key.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out["first_stage_model." + key] = v
    out.update({"conditioner.embedders.0.transformer.text_model." + k: v for k, v in text.state_dict().items()})
    out.update(open_clip_state(text_2))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def ldm_xl_checkpoint(folder) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return ldm_xl_state_dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                             AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                             CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                             CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_sdxl_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxlfile") / "tiny_sdxl.safetensors"
    save_file(ldm_xl_checkpoint(tiny_sdxl_path), str(path))
    return path


def released_xl_shapes() -> dict:
    models = _sd_meta_model_dict(load_sd_configs(None, "sdxl")[0])
    shapes = {k: tuple(v.shape) for k, v in ldm_xl_state_dict(*models.values()).items()}
    return shapes, {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


# ---------------------------------------------------------------------------------------------- shipped configs


def test_released_sdxl_is_detected_from_its_header(tmp_path):
    shapes, sizes = released_xl_shapes()
    # the released sizes: UNet 2.567 G, VAE 83.7 M, CLIP-L 123.1 M, OpenCLIP bigG text tower 694.7 M parameters
    assert 2.56e9 < sizes["unet"] < 2.57e9 and 83e6 < sizes["vae"] < 84e6
    assert 123e6 < sizes["text_encoder"] < 123.2e6 and 694e6 < sizes["text_encoder_2"] < 695e6
    assert sd_facts_from_configs(load_sd_configs(None, "sdxl")[0]) == {
        "in_channels": 4, "model_channels": 320, "out_channels": 4, "levels": 3, "res_blocks": 2,
        "context_dim": 2048, "text_hidden": 768, "text_layers": 12, "vae_channels": 128, "latent_channels": 4,
        "text_2_hidden": 1280, "text_2_layers": 32, "adm_in_channels": 2816}
    file = tmp_path / "sd_xl_base_1.0.safetensors"
    header_only_file(file, shapes)
    variant = detect_variant(file)
    assert variant.name == "sdxl" and variant.family == "sdxl" and "Stable Diffusion XL" in variant.description
    assert variant.config["vae"]["scaling_factor"] == 0.13025
    assert detect_variant(file, config="v_prediction").config["scheduler"]["prediction_type"] == "v_prediction"


def test_wrong_kinds_are_refused_by_name(tmp_path, tiny_checkpoint, tiny_sdxl_path):
    shapes, _ = released_xl_shapes()
    refiner = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): s for k, s in shapes.items()
               if not k.startswith("conditioner.embedders.0.")}
    cases = {
        "refiner": (refiner, "an SDXL refiner checkpoint.*not supported as a single file yet"),
        "noclipg": ({k: s for k, s in shapes.items() if not k.startswith("conditioner.embedders.1.")},
                    r"without conditioner\.embedders\.1\.model\.\*"),
        "novae": ({k: s for k, s in shapes.items() if not k.startswith("first_stage_model.")},
                  r"an SDXL checkpoint without first_stage_model\.\*"),
        "inpaint": ({**shapes, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
        "deeper": ({**shapes, "conditioner.embedders.1.model.transformer.resblocks.32.ln_1.weight": (1280,)},
                   "does not match the shipped SDXL configs.*text_2_layers: file 33 vs config 32"),
    }
    for name, (case, message) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        header_only_file(file, case)
        with pytest.raises(ModelError, match=message) as err:
            detect_variant(file)
        assert str(file) in str(err.value)
    # an SDXL file given to another family is refused naming both
    with pytest.raises(ModelError, match="Stable Diffusion XL.*trained by model.family 'sdxl', not 'sd15'"):
        load_single_file(tiny_checkpoint, torch.float32, config=tiny_sdxl_path, encoders_from=tiny_sdxl_path,
                         family="sd15")


# ---------------------------------------------------------------------------------------------- loading


def test_tiny_checkpoint_loads_bit_exactly(tiny_checkpoint, tiny_sdxl_path):
    with pytest.raises(ModelError, match="does not match the shipped SDXL configs.*context_dim: file 64 vs config "
                                         "2048.*give its diffusers SDXL folder"):
        detect_variant(tiny_checkpoint)
    family = get_family("sdxl").from_single_file(str(tiny_checkpoint), torch.float32, config=tiny_sdxl_path,
                                                 encoders_from=tiny_sdxl_path)
    folder = get_family("sdxl").load(str(tiny_sdxl_path), dtype=torch.float32)
    assert family.name == "sdxl" and family.loaded.extra["variant"] == "custom"
    assert family.vae_scale_factor == 8 and family.resolution_factor == 8 and family.prediction_type == "epsilon"
    pairs = {"unet": (family.denoiser, folder.denoiser), "vae": (family.loaded.vae, folder.loaded.vae),
             "text": (family.loaded.text_encoders[0], folder.loaded.text_encoders[0]),
             "text_2": (family.loaded.text_encoders[1], folder.loaded.text_encoders[1])}
    for name, (got, want) in pairs.items():
        assert type(got) is type(want), name
        got_sd, want_sd = got.state_dict(), want.state_dict()
        assert set(got_sd) == set(want_sd), name
        for k in want_sd:
            assert torch.equal(got_sd[k], want_sd[k]), f"{name}: {k}"
        assert not any(p.requires_grad for p in got.parameters()) and not got.training
    captions = ["a red fox", ""]
    for a, b in zip(family.encode_prompts(captions), folder.encode_prompts(captions)):
        assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])
        assert torch.equal(a["text_embeds"], b["text_embeds"])
    pixels = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    assert torch.equal(family.encode_pixels(pixels), folder.encode_pixels(pixels))
    # a plain CLIP tokenizer folder (ComfyUI's comfy/sd1_tokenizer): tokenizer 2 is the same vocabulary padded "!"
    plain = load_single_file(tiny_checkpoint, torch.bfloat16, config=tiny_sdxl_path,
                             tokenizer_from=tiny_sdxl_path / "tokenizer")
    ids = [t(["a fox"], padding="max_length", max_length=16).input_ids for t in plain.loaded.tokenizers]
    want = [t(["a fox"], padding="max_length", max_length=16).input_ids for t in folder.loaded.tokenizers]
    assert ids == want and ids[0] != ids[1]
    assert {p.dtype for p in plain.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in plain.loaded.text_encoders[1].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in plain.loaded.vae.parameters()} == {torch.float32}


# ---------------------------------------------------------------------------------------------- training


def test_training_from_checkpoint_equals_training_from_folder(tiny_checkpoint, tiny_sdxl_path, tmp_path):
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
            "model": {"family": "sdxl", "path": str(tiny_sdxl_path), "dtype": "fp32", **model},
            "datasets": [{"folder_path": str(data), "resolution": [32]}],
            "network": {"linear": 4, "linear_alpha": 4, "conv": 2, "conv_alpha": 2},
            "train": {"steps": 8, "batch_size": 1, "lr": 1e-3, "seed": 3},
            "save": {"every": 100, "resume": "none"},
        })

    folder_run = train(job("folder"))
    cli_run = train(job("file", path=str(tiny_checkpoint), config=str(tiny_sdxl_path),
                        encoders_from=str(tiny_sdxl_path)))
    losses = [[r["loss"] for r in run.records] for run in (folder_run, cli_run)]
    assert len(losses[0]) == 8 and losses[1] == losses[0]  # same weights, same arithmetic: identical
    for k, v in folder_run.lora_state.items():
        assert torch.equal(v, cli_run.lora_state[k]), k


def test_node_spec_finds_the_tokenizer_and_loads(tiny_checkpoint, tiny_sdxl_path, tmp_path):
    # The Load Training Model (ComfyUI file) node: an SDXL checkpoint has no tokenizer files, so the spec names
    # ComfyUI's CLIP tokenizer folder (the node passes comfy/sd1_tokenizer as tokenizer_from), checked at once.
    from trainer import comfy_bridge as cb

    configs_only = tmp_path / "configs_only"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        (configs_only / name).mkdir(parents=True)
        for f in (tiny_sdxl_path / name).glob("*.json"):
            (configs_only / name / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelError, match="holds no tokenizer files"):  # at the load node, not at Train time
        cb.single_file_model(tiny_checkpoint, "fp32", str(configs_only))
    comfy_copy = tmp_path / "sd1_tokenizer"
    comfy_copy.mkdir()
    for f in (tiny_sdxl_path / "tokenizer").iterdir():
        (comfy_copy / f.name).write_bytes(f.read_bytes())
    spec = cb.single_file_model(tiny_checkpoint, "fp32", str(configs_only), tokenizer_from=comfy_copy)
    assert spec["family"] == "sdxl" and spec["encoders_from"] == str(comfy_copy)
    family = cb.load_model_for_nodes(spec, torch.float32)
    assert family.name == "sdxl" and family.loaded.tokenizers[1].pad_token == "!"

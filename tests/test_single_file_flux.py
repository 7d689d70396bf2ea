"""Single-file FLUX.1 (ComfyUI models/diffusion_models, Black Forest Labs' layout): detection from the header,
strict loading through diffusers' conversion, the refusals, training equivalence with the diffusers folder of the
same weights, the FLUX.1 VAE file, and the ComfyUI encoder adapter's pure conversions.

The BFL file is written here from a diffusers FluxTransformer2DModel by the inverse of diffusers' conversion
(`bfl_state_dict`; diffusers ships only BFL -> diffusers), so a loaded file equal to the model bit for bit shows
the two directions agree."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from family_helpers import header_only_file
from fixtures_models import tiny_flux_path, tiny_flux_schnell_path  # noqa: F401
from tests.media import write_caption
from trainer.errors import ModelError
from trainer.families.flux import Flux
from trainer.families.single_file import (
    convert_flux_file,
    detect_variant,
    flux_facts_from_config,
    known_flux_variants,
    load_flux_vae_file,
    load_single_file,
)
from trainer.job import parse_job
from trainer.loop import train

# ---------------------------------------------------------------------------------------------- diffusers -> BFL

_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def bfl_state_dict(transformer, prefix: str = "") -> dict:
    """The FLUX.1 state dict of a diffusers FluxTransformer2DModel under BFL's original names."""
    sd = {k: v.detach() for k, v in transformer.state_dict().items()}
    out = {}
    for param in ("weight", "bias"):
        for new, old in _TOP.items():
            if f"{new}.{param}" in sd:
                out[f"{old}.{param}"] = sd[f"{new}.{param}"]
        shift_scale = sd[f"norm_out.linear.{param}"].chunk(2)  # diffusers: scale, shift; BFL: shift, scale
        out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift_scale[1], shift_scale[0]])
    for i in range(transformer.config.num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for param in ("weight", "bias"):
            for new, old in _DOUBLE.items():
                out[f"{b}{old}.{param}"] = sd[f"{d}{new}.{param}"]
            out[f"{b}img_attn.qkv.{param}"] = torch.cat([sd[f"{d}attn.to_{x}.{param}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{param}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{param}"] for x in "qkv"])
        for new, old in _DOUBLE_NORMS.items():
            out[f"{b}{old}.scale"] = sd[f"{d}{new}.weight"]
    for i in range(transformer.config.num_single_layers):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for param in ("weight", "bias"):
            out[f"{b}modulation.lin.{param}"] = sd[f"{d}norm.linear.{param}"]
            out[f"{b}linear1.{param}"] = torch.cat([sd[f"{d}attn.to_{x}.{param}"] for x in "qkv"]
                                                   + [sd[f"{d}proj_mlp.{param}"]])
            out[f"{b}linear2.{param}"] = sd[f"{d}proj_out.{param}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}


def released_shapes(variant_name: str, prefix: str = "") -> dict:
    """{BFL key: shape} of a released FLUX.1 transformer (its shipped config built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    variant = next(v for v in known_flux_variants() if v.name == variant_name)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config({k: v for k, v in variant.config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in bfl_state_dict(model, prefix).items()}  # cat / chunk work on meta


@pytest.fixture(scope="module")
def tiny_file(tiny_flux_path, tmp_path_factory):
    """(the tiny dev transformer as a ComfyUI file with the checkpoint prefix, the diffusers transformer)."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer")
    path = tmp_path_factory.mktemp("flux_file") / "tiny_flux_dev.safetensors"
    save_file(bfl_state_dict(transformer, "model.diffusion_model."), str(path))
    return path, transformer


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name,prefix", [("flux1_dev", ""), ("flux1_schnell", "model.diffusion_model.")])
def test_released_flux_is_detected_from_its_header(tmp_path, name, prefix):
    path = tmp_path / f"{name}.safetensors"
    header_only_file(path, released_shapes(name, prefix))
    variant = detect_variant(path)
    assert variant.name == name and variant.family == "flux"
    assert variant.config["guidance_embeds"] is (name == "flux1_dev")
    assert variant.extra["scheduler"]["use_dynamic_shifting"] is (name == "flux1_dev")


def test_shipped_configs_are_the_release_architecture():
    dev, schnell = known_flux_variants()
    for v in (dev, schnell):
        facts = flux_facts_from_config(v.config)
        assert facts["hidden_size"] == 3072 and facts["num_layers"] == 19 and facts["num_single_layers"] == 38
        assert facts["in_channels"] == 64 and facts["context_dim"] == 4096 and facts["pooled_dim"] == 768
        assert sum(v.config["axes_dims_rope"]) == v.config["attention_head_dim"] == 128
    assert dev.extra["scheduler"]["shift"] == 3.0 and schnell.extra["scheduler"]["shift"] == 1.0


def test_other_flux_like_files_are_refused_by_name(tmp_path):
    dev = released_shapes("flux1_dev")

    def refused(shapes, match):
        path = tmp_path / "x.safetensors"
        header_only_file(path, shapes)
        with pytest.raises(ModelError, match=match):
            detect_variant(path)

    refused({**dev, "img_in.weight": (3072, 384)}, "FLUX.1 Fill")
    refused({**dev, "img_in.weight": (3072, 128)}, "FLUX.1 Depth or Canny")
    refused({**dev, "double_stream_modulation_img.lin.weight": (18432, 3072)}, "FLUX.2")
    refused({**dev, "distilled_guidance_layer.norms.0.scale": (5120,)}, "Chroma")
    refused({**dev, "double_blocks.0.img_mlp.gate_proj.weight": (12288, 3072)}, "another MLP")
    refused({**dev, "double_blocks.0.img_attn.qkv.weight_scale": ()}, "scaled / quantized fp8")
    refused({k: v for k, v in dev.items() if not k.startswith("double_blocks.18.")},
            r"matches no known variant. Found: hidden_size=3072, in_channels=64.*num_layers=18")
    redux = {"redux_up.weight": (12288, 1152), "redux_down.weight": (4096, 12288)}
    refused(redux, "not a model file the trainer knows.*FLUX.1 dev / schnell")


def test_full_size_conversion_split_equals_diffusers_own(tmp_path):
    """At FLUX.1's width our split of single_blocks.*.linear1 is diffusers' own (checked on narrow columns)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    shapes = {k: v for k, v in released_shapes("flux1_schnell").items()
              if not k.startswith(("double_blocks.", "single_blocks.")) or k.startswith(("double_blocks.0.",
                                                                                       "single_blocks.0."))}
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*(s[:1] + (2,) * (len(s) - 1)), generator=gen) for k, s in shapes.items()}
    ours, unused = convert_flux_file(dict(state), 3072)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    assert unused == [] and set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k


# ---------------------------------------------------------------------------------------------- loading


def test_tiny_file_loads_bit_exactly_and_needs_its_config(tiny_file, tiny_flux_path):
    path, transformer = tiny_file
    with pytest.raises(ModelError, match="matches no known variant.*hidden_size=32"):
        detect_variant(path)
    variant = detect_variant(path, config=tiny_flux_path)
    assert variant.name == "custom" and variant.family == "flux" and variant.extra["scheduler"]["shift"] == 3.0
    family = load_single_file(path, torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path)
    assert isinstance(family, Flux) and family.variant == "dev" and family.resolution_factor == 16
    want = transformer.state_dict()
    got = family.denoiser.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    folder = Flux.load(str(tiny_flux_path), torch.float32)
    assert family.loaded.extra["shift"] == folder.loaded.extra["shift"]
    captions = ["a photo of ohwx", ""]
    for a, b in zip(family.encode_prompts(captions), folder.encode_prompts(captions)):
        assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ModelError, match="does not match the given config.*num_layers: file 1 vs config 2"):
        cfg = json.loads((tiny_flux_path / "transformer" / "config.json").read_text())
        detect_variant(path, config={**cfg, "num_layers": 2})
    with pytest.raises(ModelError, match="trained by model.family 'flux', not 'wan21'"):
        load_single_file(path, torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path, family="wan21")
    with pytest.raises(ModelError, match="holds only the transformer; the text encoders and VAE"):
        load_single_file(path, torch.float32, config=tiny_flux_path)


def test_missing_or_extra_tensors_are_named(tiny_file, tiny_flux_path, tmp_path):
    path, _ = tiny_file
    state = load_file(str(path))
    extra = tmp_path / "extra.safetensors"
    save_file({**state, "model.diffusion_model.lora_unet_x.alpha": torch.ones(())}, str(extra))
    with pytest.raises(ModelError, match=r"1 file tensors the conversion did not use "
                                          r"\(e.g. \['model.diffusion_model.lora_unet_x.alpha'\]"):
        load_single_file(extra, torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path)
    # a ComfyUI Flux checkpoint (models/checkpoints): the transformer is read, the bundled encoders are not
    checkpoint = tmp_path / "flux1-dev-checkpoint.safetensors"
    save_file({**state, "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "vae.decoder.conv_in.weight": torch.ones(4, 16, 3, 3)}, str(checkpoint))
    assert detect_variant(checkpoint, config=tiny_flux_path).family == "flux"
    family = load_single_file(checkpoint, torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path)
    assert torch.equal(family.denoiser.x_embedder.weight, state["model.diffusion_model.img_in.weight"])
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if "txt_mlp.2" not in k}, str(missing))
    with pytest.raises(ModelError, match="key is missing: 'double_blocks.0.txt_mlp.2.weight'"):
        load_single_file(missing, torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path)


def test_schnell_fp8_file_and_vae_file(tiny_flux_schnell_path, tmp_path):
    """A plain fp8_e4m3fn schnell file is upcast; the VAE comes from an ae.safetensors-style file."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from tests.test_single_file_sd15 import ldm_vae_key

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_schnell_path, subfolder="transformer")
    fp8 = tmp_path / "flux1-schnell-fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in bfl_state_dict(transformer).items()}, str(fp8))
    torch.manual_seed(0)  # the FLUX.1 VAE layout (16 channels, no quant convs) at test widths
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=16,
                        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
    ae = tmp_path / "ae.safetensors"
    save_file({ldm_vae_key(k, vae.config): (v[:, :, None, None] if "attentions" in k and v.ndim == 2 else v)
               .contiguous() for k, v in vae.state_dict().items()}, str(ae))
    loaded_vae = load_flux_vae_file(ae)
    assert loaded_vae.config.shift_factor == 0.1159 and loaded_vae.config.scaling_factor == 0.3611
    assert all(torch.equal(v, loaded_vae.state_dict()[k]) for k, v in vae.state_dict().items())

    family = load_single_file(fp8, torch.float32, config=tiny_flux_schnell_path,
                              encoders_from=tiny_flux_schnell_path, vae_file=ae)
    assert family.variant == "schnell" and not family.loaded.extra["shift"]["dynamic"]
    for k, v in transformer.state_dict().items():
        assert torch.equal(family.denoiser.state_dict()[k], v.to(torch.float8_e4m3fn).float()), k
    pixels = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    expected = (vae.encode(pixels[:, :, 0]).latent_dist.mode() - 0.1159) * 0.3611
    assert torch.equal(family.encode_pixels(pixels), expected.float())
    sd_vae = tmp_path / "sd_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 4, 3, 3), "quant_conv.weight": torch.zeros(8, 8, 1, 1),
               "encoder.down.0.block.0.conv2.weight": torch.zeros(8, 8, 3, 3)}, str(sd_vae))
    with pytest.raises(ModelError, match="4 latent channels and quant convs"):
        load_flux_vae_file(sd_vae)


# ---------------------------------------------------------------------------------------------- training


def test_training_from_file_equals_training_from_folder(tiny_file, tiny_flux_path, tmp_path):
    from PIL import Image

    path, _ = tiny_file
    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        rng = torch.Generator().manual_seed(i)
        Image.fromarray((torch.rand(32, 32, 3, generator=rng) * 255).byte().numpy()).save(data / f"{i}.png")
        write_caption(data / f"{i}.png", f"pattern {i}")

    def job(name, **model):
        return parse_job({
            "job": name, "output_dir": str(tmp_path / name),
            "model": {"family": "flux", "path": str(tiny_flux_path), "dtype": "fp32", **model},
            "datasets": [{"folder_path": str(data), "resolution": [32]}],
            "network": {"linear": 4, "linear_alpha": 4},
            "train": {"steps": 8, "batch_size": 1, "lr": 1e-3, "seed": 3},
            "save": {"every": 100, "resume": "none"},
        })

    folder_run = train(job("folder"))
    single = Flux.from_single_file(str(path), torch.float32, config=tiny_flux_path, encoders_from=tiny_flux_path)
    file_run = train(job("file"), family=single)
    cli_run = train(job("cli", path=str(path), config=str(tiny_flux_path), encoders_from=str(tiny_flux_path)))
    losses = [[r["loss"] for r in run.records] for run in (folder_run, file_run, cli_run)]
    assert len(losses[0]) == 8
    assert losses[1] == losses[0] and losses[2] == losses[0]  # same weights, same arithmetic: identical
    for k, v in folder_run.lora_state.items():
        assert torch.equal(v, file_run.lora_state[k]) and torch.equal(v, cli_run.lora_state[k]), k


def test_node_spec_for_a_flux_file(tiny_file, tiny_flux_path):
    from trainer import comfy_bridge as cb

    path, _ = tiny_file
    spec = cb.single_file_model(path, "fp32", str(tiny_flux_path))
    assert spec["family"] == "flux" and spec["single_file"]["variant"] == "custom"
    with pytest.raises(ModelError, match="connect ComfyUI's CLIP \\(DualCLIPLoader type flux"):
        cb.load_model_for_nodes(spec, torch.float32)


# ---------------------------------------------------------------------------------------------- ComfyUI adapter


def test_comfy_flux_token_conversions_match_the_pipeline():
    from trainer.comfy_encoders import ADAPTERS
    from trainer.comfy_encoders.conversions import escape_comfy_weights
    from trainer.comfy_encoders.flux import flux_tokens_like_pipeline

    assert ADAPTERS["flux"] == ("flux", "comfy_flux_encoders")
    assert escape_comfy_weights(r"a (red:1.2) car \ x \(y") == r"a \(red:1.2\) car \ x \\(y"
    # a long caption as ComfyUI chunks it: 75 tokens per chunk, each chunk start + tokens + end (+ pad)
    ids = list(range(100, 260))
    chunks = [[(49406, 1.0)] + [(t, 1.0) for t in ids[i:i + 75]] + [(49407, 1.0)] for i in range(0, 150, 75)]
    chunks.append([(49406, 1.0)] + [(t, 1.0) for t in ids[150:]] + [(49407, 1.0)] * 67)
    t5 = [[(7, 1.0), (8, 1.0), (9, 1.0), (1, 1.0)] + [(0, 1.0)] * 252]
    out = flux_tokens_like_pipeline({"l": chunks, "t5xxl": t5}, 3)
    assert [t[0] for t in out["l"][0]] == [49406] + ids[:75] + [49407]  # the chunks joined, cut to one
    assert [t[0] for t in out["t5xxl"][0]] == [7, 8, 1]  # max_length - 1 tokens, then </s>
    out = flux_tokens_like_pipeline({"l": chunks, "t5xxl": t5}, 6)
    assert [t[0] for t in out["t5xxl"][0]] == [7, 8, 9, 1, 0, 0]
    with pytest.raises(ValueError, match="not Flux's clip_l \\+ t5xxl"):
        flux_tokens_like_pipeline({"umt5xxl": t5}, 6)


def test_comfy_flux_tensor_conversions():
    from trainer.comfy_encoders.conversions import still_images_to_comfy
    from trainer.comfy_encoders.flux import flux_latents_from_comfy, flux_text_from_comfy

    pixels = torch.rand(2, 3, 1, 16, 24) * 2 - 1
    images = still_images_to_comfy(pixels)
    assert images.shape == (2, 16, 24, 3) and images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images.permute(0, 3, 1, 2) * 2 - 1, pixels[:, :, 0], atol=1e-6)
    raw = torch.randn(2, 16, 2, 3)
    assert torch.equal(flux_latents_from_comfy(raw), (raw - 0.1159) * 0.3611)
    item = flux_text_from_comfy(torch.randn(1, 5, 8), torch.randn(1, 4), 5)
    assert item["encoder_hidden_states"].shape == (5, 8) and item["pooled_projections"].shape == (4,)
    with pytest.raises(ValueError, match="6 positions, not max_sequence_length 5"):
        flux_text_from_comfy(torch.randn(1, 6, 8), torch.randn(1, 4), 5)


class _FakeComfyClip:
    """What comfy_flux_encoders uses of ComfyUI's CLIP: tokenize / encode_from_tokens / layer_idx / tokenizer, backed
    by the family's own diffusers encoders, so the adapter's plumbing is checked without ComfyUI (the real
    ComfyUI objects: tests/e2e/test_comfyui_flux_encoders.py)."""

    def __init__(self, family, layer_idx=None):
        from types import SimpleNamespace

        self.family, self.layer_idx = family, layer_idx
        tok = family.loaded.tokenizers[0]
        self.tokenizer = SimpleNamespace(clip_l=SimpleNamespace(start_token=tok.bos_token_id,
                                                                end_token=tok.eos_token_id,
                                                                pad_token=tok.pad_token_id))

    def tokenize(self, text):
        clip_tok, t5_tok = self.family.loaded.tokenizers
        text = text.replace("\\(", "(").replace("\\)", ")")
        clip_ids = clip_tok(text)["input_ids"]
        return {"l": [[(t, 1.0) for t in clip_ids]], "t5xxl": [[(t, 1.0) for t in t5_tok(text)["input_ids"]]]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        clip, t5 = self.family.loaded.text_encoders
        clip_ids = torch.tensor([[t for t, *_ in tokens["l"][0]]])
        t5_ids = torch.tensor([[t for t, *_ in tokens["t5xxl"][0]]])
        return t5(t5_ids)[0], clip(clip_ids).pooler_output


def test_flux_family_defers_to_external_encoders(tiny_flux_path):
    from trainer.comfy_encoders import for_family

    family = Flux.load(str(tiny_flux_path), torch.float32)
    captions = ["a (red) fox, at sunset", "", " ".join(["word"] * 120)]
    own = family.encode_prompts(captions)
    with pytest.raises(ValueError, match="CLIP Set Last Layer"):
        for_family("flux", _FakeComfyClip(family, layer_idx=-2))
    long_clip = _FakeComfyClip(family)
    long_clip.tokenizer.clip_l.max_length = 248
    with pytest.raises(ValueError, match="takes 248 tokens \\(a long-CLIP file\\)"):
        for_family("flux", long_clip)
    with pytest.raises(ValueError, match="16-channel image VAE"):
        for_family("flux", vae=type("SDVae", (), {"latent_channels": 4})())
    family.loaded.extra["external_encoders"] = for_family("flux", _FakeComfyClip(family))
    external = family.encode_prompts(captions)
    for a, b in zip(own, external):
        assert set(b) == {"encoder_hidden_states", "pooled_projections"}
        assert torch.allclose(a["encoder_hidden_states"], b["encoder_hidden_states"], atol=1e-6)
        assert torch.allclose(a["pooled_projections"], b["pooled_projections"], atol=1e-6)


class _FakeComfyVae:
    """ComfyUI's VAE.encode contract (images [B, H, W, 3] in [0, 1] -> the raw posterior mode), backed by a
    diffusers AutoencoderKL."""

    latent_channels, latent_dim = 16, 2

    def __init__(self, vae):
        self.vae = vae

    def encode(self, images):
        with torch.no_grad():
            return self.vae.encode(images.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()


def test_training_from_file_with_comfy_style_encoders_matches_the_folder(tiny_file, tiny_flux_path, tmp_path):
    """What the Train node does with a Flux file and ComfyUI's CLIP + VAE: no encoders_from, no vae_file."""
    from PIL import Image

    from trainer.comfy_encoders import for_family

    path, _ = tiny_file
    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        rng = torch.Generator().manual_seed(10 + i)
        Image.fromarray((torch.rand(32, 48, 3, generator=rng) * 255).byte().numpy()).save(data / f"{i}.png")
        write_caption(data / f"{i}.png", f"a (bright) pattern {i}")

    def job(name):
        return parse_job({
            "job": name, "output_dir": str(tmp_path / name),
            "model": {"family": "flux", "path": str(tiny_flux_path), "dtype": "fp32"},
            "datasets": [{"folder_path": str(data), "resolution": [32]}],
            "network": {"linear": 4, "linear_alpha": 4},
            "train": {"steps": 6, "batch_size": 1, "lr": 1e-3, "seed": 4},
            "save": {"every": 100, "resume": "none"},
        })

    folder_run = train(job("folder"))
    own = Flux.load(str(tiny_flux_path), torch.float32)
    encoders = for_family("flux", _FakeComfyClip(own), _FakeComfyVae(own.loaded.vae))
    single = load_single_file(path, torch.float32, config=tiny_flux_path, encoders=encoders, family="flux")
    assert single.loaded.text_encoders == [] and single.loaded.vae is None and single.resolution_factor == 16
    file_run = train(job("file"), family=single)
    assert encoders.encode_prompts is None and encoders.objects == []  # released once everything was cached
    losses = [[r["loss"] for r in run.records] for run in (folder_run, file_run)]
    assert len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)

"""Tiny random models saved as complete diffusers pipeline folders (no downloads).

The `demo` command and the tests train on these. They have the real classes, the real folder layout and real
tokenizer files, only with small configs and random (seeded) weights, so everything that loads a real SD 1.5 or
Wan 2.1 folder loads these the same way.

Sizes: the SD 1.5 VAE keeps the real 8x downscale (4 levels) so latent shapes follow the real model's arithmetic;
the Wan VAE is the small configuration diffusers' own Wan tests use (also 8x spatial, 4x temporal).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

# The tiny tokenizers' maximum lengths. CLIP's real 77 is cheap at this width; Wan's real 512 is also cheap for
# the tiny text encoder, and using it keeps the Wan family on WanPipeline's default.
SD15_TEXT_LENGTH = 77
WAN_TEXT_LENGTH = 512


def build_tiny_sd15(path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a random SD 1.5-shaped StableDiffusionPipeline folder at `path` (must not exist or be empty)."""
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")

    def build(root: Path) -> None:
        tokenizer = _clip_tokenizer(SD15_TEXT_LENGTH)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=1,
                cross_attention_dim=32,
                attention_head_dim=4,
                norm_num_groups=32,
            )
            vae = _sd_vae(latent_channels=4, scaling_factor=0.18215)
            text_encoder = CLIPTextModel(_clip_text_config(tokenizer, num_hidden_layers=2, hidden_act="quick_gelu"))
        # The scheduler class and betas real SD 1.5 folders ship; training reads its betas and prediction type.
        scheduler = PNDMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type,
        )
        _save_pipeline_folder(root, "StableDiffusionPipeline", {
            "unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
            "feature_extractor": None, "safety_checker": None,
        }, {"requires_safety_checker": False})

    return _build_atomically(Path(path), build)


def build_tiny_wan21(path, seed: int = 0) -> Path:
    """Write a random Wan 2.1 T2V-shaped WanPipeline folder at `path` (must not exist or be empty)."""

    def build(root: Path) -> None:
        tokenizer = _t5_tokenizer(WAN_TEXT_LENGTH)
        # One seeded stream for all three, in this order (the other Wan builders seed each model separately).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transformer = _wan_transformer(in_channels=16)
            vae = _wan21_vae()
            text_encoder = _umt5_encoder(tokenizer)
        # What the Wan-AI diffusers repos ship: UniPC with flow sigmas and the 480p shift.
        _save_pipeline_folder(root, "WanPipeline", {
            "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": _flow_scheduler(3.0),
        }, {})

    return _build_atomically(Path(path), build)


def _byte_level_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, max_length: int):
    """A real byte-level BPE tokenizer (the 256-byte alphabet, no merges): every caption tokenizes, distinct
    captions get distinct ids, and it saves as an ordinary tokenizer.json that AutoTokenizer loads."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    template = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in (bos, eos) if t]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=None,
        model_max_length=max_length,
    )


def _clip_tokenizer(max_length: int, pad: str = "<|endoftext|>"):
    return _byte_level_tokenizer(
        specials=["<|startoftext|>", "<|endoftext|>"], bos="<|startoftext|>", eos="<|endoftext|>", pad=pad,
        max_length=max_length,
    )


def _t5_tokenizer(max_length: int):
    return _byte_level_tokenizer(specials=["<pad>", "</s>", "<unk>"], bos=None, eos="</s>", pad="<pad>",
                                 max_length=max_length)


def _clip_text_config(tokenizer, num_hidden_layers: int, hidden_act: str):
    """A width-32 CLIP text encoder config whose positions and special ids match `tokenizer`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_style_config(config_class, tokenizer):
    """A width-32 gated-gelu (T5 v1.1 / UMT5) encoder config; `config_class` is T5Config or UMT5Config."""
    return config_class(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )


def _sd_vae(latent_channels: int, scaling_factor: float, **extra):
    """An AutoencoderKL with the real 8x downscale (4 levels) at tiny widths; draws from the current RNG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **extra,
    )


def _seeded(seed: int, make):
    """`make()` with the global RNG seeded to `seed` and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _save_pipeline_folder(root: Path, pipeline: str, components: dict, config: dict) -> None:
    """Save each component in its subfolder and write model_index.json as diffusers does (None -> [null, null])."""
    index = {"_class_name": pipeline, "_diffusers_version": _diffusers_version(), **config}
    for name, component in components.items():
        if component is None:
            index[name] = [None, None]
            continue
        if name.startswith("tokenizer"):
            _save_tokenizer(component, root / name)
            index[name] = ["transformers", "PreTrainedTokenizerFast"]
            continue
        component.save_pretrained(root / name)
        library = "diffusers" if type(component).__module__.startswith("diffusers") else "transformers"
        # transformers 5 without torchvision builds the PIL backend class; folders name the generic class
        # (as the saved preprocessor_config.json already does), which resolves to whichever backend exists.
        index[name] = [library, type(component).__name__.removesuffix("Pil")]
    _write_json(root / "model_index.json", dict(sorted(index.items())))


def _save_tokenizer(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    # transformers 5 records its own backend class name, which transformers 4 cannot resolve; the generic fast
    # class loads the same tokenizer.json in both.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    _write_json(config_path, config)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _build_atomically(path: Path, build) -> Path:
    """Build into a sibling temp folder and rename it into place, so a half-written model never exists."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path}: already exists and is not an empty folder; choose a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not mkdtemp, which is private 0700) so the folder gets the user's usual permissions.
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        build(tmp)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# SDXL's tokenizers: the real 77 tokens (cheap at this width).
SDXL_TEXT_LENGTH = 77
# FLUX.1's T5 length: FluxPipeline's default max_sequence_length (dev; schnell's model card uses 256).
FLUX_T5_LENGTH = 512


def build_tiny_sdxl(path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a random SDXL-shaped StableDiffusionXLPipeline folder at `path` (must not exist or be empty).

    The UNet is the configuration of diffusers' own SDXL pipeline tests (text_time additional embedding, two
    levels, linear projections, 2 transformer layers at the second level). The two CLIP encoders mirror the real
    pair at width 32: encoder 1 is a CLIPTextModel, encoder 2 a CLIPTextModelWithProjection whose projection
    gives the pooled embedding; tokenizer 2 pads with "!" as SDXL's second tokenizer does. The VAE keeps SD's 8x
    downscale with SDXL's scaling factor 0.13025."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")

    def build(root: Path) -> None:
        tokenizer = _clip_tokenizer(SDXL_TEXT_LENGTH)
        tokenizer_2 = _clip_tokenizer(SDXL_TEXT_LENGTH, pad="!")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # the activations of the real pair: CLIP ViT-L (quick_gelu) and OpenCLIP bigG (gelu)
            text_encoder = CLIPTextModel(_clip_text_config(tokenizer, num_hidden_layers=3, hidden_act="quick_gelu"))
            text_encoder_2 = CLIPTextModelWithProjection(
                _clip_text_config(tokenizer_2, num_hidden_layers=3, hidden_act="gelu"))
            addition_time_embed_dim = 8
            unet = UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(32, 64),
                layers_per_block=2,
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=addition_time_embed_dim,
                transformer_layers_per_block=(1, 2),
                # six size/crop numbers of addition_time_embed_dim each, plus encoder 2's pooled projection
                projection_class_embeddings_input_dim=6 * addition_time_embed_dim + 32,
                cross_attention_dim=64,  # the two encoders' hidden states concatenated
                norm_num_groups=32,
            )
            vae = _sd_vae(latent_channels=4, scaling_factor=0.13025, force_upcast=True)
        # What the SDXL base repo ships; training reads its betas and prediction type.
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
            prediction_type=prediction_type,
        )
        _save_pipeline_folder(root, "StableDiffusionXLPipeline", {
            "unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler,
            "feature_extractor": None, "image_encoder": None,
        }, {"force_zeros_for_empty_prompt": True})

    return _build_atomically(Path(path), build)


def build_tiny_flux(path, variant: str = "dev", seed: int = 0) -> Path:
    """Write a random FLUX.1-shaped FluxPipeline folder at `path` (must not exist or be empty).

    `variant` "dev" has the guidance embedding and the dynamic (resolution-dependent) shift of FLUX.1-dev's
    scheduler config; "schnell" has neither (static shift 1.0), as FLUX.1-schnell's. The transformer is the
    configuration of diffusers' Flux tests with the real 16-channel latents packed 2x2 into 64 input channels;
    the VAE keeps the real 8x downscale, 16 latent channels, no quant convs, and FLUX.1's scaling and shift
    factors. Text: a CLIPTextModel (pooled output) and a T5EncoderModel (gated-gelu, as T5 v1.1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant must be 'dev' or 'schnell', not {variant!r}")

    def build(root: Path) -> None:
        tokenizer = _clip_tokenizer(SDXL_TEXT_LENGTH)
        tokenizer_2 = _t5_tokenizer(FLUX_T5_LENGTH)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(_clip_text_config(tokenizer, num_hidden_layers=2, hidden_act="quick_gelu"))
            text_encoder_2 = T5EncoderModel(_t5_style_config(T5Config, tokenizer_2))
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=variant == "dev", axes_dims_rope=(4, 4, 8),
            )
            vae = _sd_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                          use_post_quant_conv=False)
        if variant == "dev":
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096,
            )
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0,
                                                        use_dynamic_shifting=False)
        _save_pipeline_folder(root, "FluxPipeline", {
            "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "scheduler": scheduler,
            "feature_extractor": None, "image_encoder": None,
        }, {})

    return _build_atomically(Path(path), build)


# ---------------------------------------------------------------- Wan image-to-video and Wan 2.2

# The CLIP vision tower of the tiny Wan 2.1 I2V: 32-pixel crops in 8-pixel patches (16 + 1 tokens) of width 16.
WAN_CLIP_IMAGE_SIZE = 32
WAN_CLIP_WIDTH = 16


def _umt5_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(_t5_style_config(UMT5Config, tokenizer))


def _wan_transformer(in_channels: int, out_channels: int = 16, **extra):
    """diffusers' own Wan pipeline test transformer (2 layers, 2 heads x 12), with the given channels."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=out_channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **extra,
    )


def _wan21_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    )


def _tiny_wan_text_components(seed: int):
    """The tiny UMT5 encoder and byte-level tokenizer every tiny Wan folder uses (as build_tiny_wan21)."""
    tokenizer = _t5_tokenizer(WAN_TEXT_LENGTH)
    return tokenizer, _seeded(seed, lambda: _umt5_encoder(tokenizer))


def _tiny_wan_transformer(seed: int, in_channels: int, out_channels: int = 16, **extra):
    return _seeded(seed, lambda: _wan_transformer(in_channels, out_channels, **extra))


def _tiny_wan21_vae(seed: int):
    return _seeded(seed, _wan21_vae)


def _flow_scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift,
    )


def build_tiny_wan21_i2v(path, seed: int = 0) -> Path:
    """Write a random Wan 2.1 I2V-shaped WanImageToVideoPipeline folder at `path` (must not exist or be empty).

    As the real 480P/720P folders: transformer in_channels 36 (16 noisy + 4 mask + 16 first-frame latents),
    CLIP image conditioning (image_dim = the vision tower's width, added K/V projections of the model width),
    a CLIPVisionModel with its CLIPImageProcessor, UniPC with flow shift 3.0."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    def build(root: Path) -> None:
        tokenizer, text_encoder = _tiny_wan_text_components(seed)
        transformer = _tiny_wan_transformer(seed, in_channels=36, image_dim=WAN_CLIP_WIDTH, added_kv_proj_dim=24)
        image_encoder = _seeded(seed, lambda: CLIPVisionModel(CLIPVisionConfig(
            hidden_size=WAN_CLIP_WIDTH, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=WAN_CLIP_IMAGE_SIZE, patch_size=8, projection_dim=WAN_CLIP_WIDTH,
        )))
        image_processor = CLIPImageProcessor(size={"shortest_edge": WAN_CLIP_IMAGE_SIZE},
                                             crop_size={"height": WAN_CLIP_IMAGE_SIZE, "width": WAN_CLIP_IMAGE_SIZE})
        _save_pipeline_folder(root, "WanImageToVideoPipeline", {
            "transformer": transformer, "transformer_2": None, "vae": _tiny_wan21_vae(seed),
            "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": _flow_scheduler(3.0),
            "image_encoder": image_encoder, "image_processor": image_processor,
        }, {"boundary_ratio": None, "expand_timesteps": False})

    return _build_atomically(Path(path), build)


def build_tiny_wan22_5b(path, seed: int = 0) -> Path:
    """Write a random Wan 2.2 TI2V-5B-shaped WanPipeline folder (expand_timesteps) at `path`.

    The VAE is the 2.2 one in diffusers' own TI2V test size (z_dim 48, patchify 2, 16x spatial), with a seeded
    non-trivial latents_mean / latents_std so that normalization is visible; flow shift 5.0 as released."""
    from diffusers import AutoencoderKLWan

    def build(root: Path) -> None:
        tokenizer, text_encoder = _tiny_wan_text_components(seed)
        transformer = _tiny_wan_transformer(seed, in_channels=48, out_channels=48)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean = (torch.randn(48) * 0.3).tolist()
            std = (torch.rand(48) * 1.5 + 0.5).tolist()
            vae = AutoencoderKLWan(
                base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                latents_mean=[round(v, 4) for v in mean], latents_std=[round(v, 4) for v in std],
                dim_mult=[1, 1, 1, 1], num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4,
                temperal_downsample=[False, True, True],
            )
        _save_pipeline_folder(root, "WanPipeline", {
            "transformer": transformer, "transformer_2": None, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": tokenizer, "scheduler": _flow_scheduler(5.0),
        }, {"boundary_ratio": None, "expand_timesteps": True})

    return _build_atomically(Path(path), build)


def build_tiny_wan22_14b(path, i2v: bool = False, seed: int = 0) -> Path:
    """Write a random Wan 2.2 A14B-shaped two-expert folder at `path`: WanPipeline (boundary_ratio 0.875,
    flow shift 12.0) or, with `i2v`, WanImageToVideoPipeline (0.9, shift 5.0; in_channels 36, no image
    encoder). The experts get different seeds, so they are different models."""

    def build(root: Path) -> None:
        tokenizer, text_encoder = _tiny_wan_text_components(seed)
        channels = 36 if i2v else 16
        components = {
            "transformer": _tiny_wan_transformer(seed, in_channels=channels),
            "transformer_2": _tiny_wan_transformer(seed + 1, in_channels=channels),
            "vae": _tiny_wan21_vae(seed), "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": _flow_scheduler(5.0 if i2v else 12.0),
        }
        if i2v:
            components.update(image_encoder=None, image_processor=None)
        _save_pipeline_folder(root, "WanImageToVideoPipeline" if i2v else "WanPipeline", components,
                         {"boundary_ratio": 0.9 if i2v else 0.875, "expand_timesteps": False})

    return _build_atomically(Path(path), build)

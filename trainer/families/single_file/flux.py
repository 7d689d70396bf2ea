"""FLUX.1 single files (models/diffusion_models, models/vae).

A ComfyUI FLUX.1 file (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``, their plain ``fp8_e4m3fn``
releases, scaled-fp8 files: dequantized as read, see quantized.py) holds one transformer under Black Forest Labs' original names (``double_blocks.*``, ``single_blocks.*``,
``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in`` on dev only, ``final_layer``), optionally
prefixed ``model.diffusion_model.``. We:

1. read only the safetensors header, so a wrong file fails in a second;
2. detect the variant from the shapes: dev has the guidance embedding, schnell has none; the width, block counts,
   head size, input channels and the text widths must equal FLUX.1's (trainer/configs/flux/flux_dev.json,
   flux_schnell.json, the diffusers configs of the releases). Other models in Flux's layout are named and
   refused: FLUX.1 Fill / Depth / Canny (more input channels: the image condition is concatenated), FLUX.2,
   Chroma, models with another MLP (Ovis). FLUX.1 Kontext has exactly dev's shapes, so a file
   cannot say it is Kontext; it would train as dev. A non-standard size loads with its diffusers ``config``;
3. convert with diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` and load strictly into
   ``FluxTransformer2DModel`` (every key used, every parameter filled). That conversion hard-codes FLUX.1's
   width (3072, MLP 4x) where it splits a single block's fused ``linear1`` into q, k, v and the MLP input;
   `convert_flux_file` splits those by the file's own width and lets diffusers do every other rename (for a
   FLUX.1-size file the two splits are the same; a test checks it).

A ComfyUI checkpoint of Flux (``model.diffusion_model.*`` next to ``text_encoders.*`` and ``vae.*``) gives its
transformer the same way; its text encoders and VAE are not read from it.

The file has no text encoders and no VAE. They come from a FLUX.1 diffusers folder (``encoders_from``: only its
CLIP, T5, tokenizers and VAE are read), a FLUX.1 VAE file (``vae_file``: ``ae.safetensors``, converted by
diffusers' ``convert_ldm_vae_checkpoint``), or ComfyUI's CLIP (DualCLIPLoader type flux) and VAE given to the
Train node (``encoders``, see trainer/comfy_encoders/flux.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelError
from .common import (
    CONFIG_DIR,
    Variant,
    _describe_facts,
    _read_tensors,
    assign_strictly,
    load_config_argument,
    read_shapes,
    require_config_match,
)

FLUX_CONFIG_DIR = CONFIG_DIR / "flux"
FLUX_VARIANT_FILES = ("flux_dev.json", "flux_schnell.json")
FLUX_VAE_CONFIG = FLUX_CONFIG_DIR / "vae.json"
# ComfyUI saves checkpoints with the first prefix; UNETLoader files usually have none.
FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# What makes a state dict Flux-like (ComfyUI's own test): q/k norms in a double block and the image input.
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
# diffusers' conversion splits single_blocks.*.linear1 at FLUX.1's sizes: 3 x 3072 + 12288 rows.
DIFFUSERS_FUSED_ROWS = 3 * 3072 + 4 * 3072
_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")
_VAE_DOWN = re.compile(r"^encoder\.down\.(\d+)\.")
_VAE_BLOCK = re.compile(r"^encoder\.down\.0\.block\.(\d+)\.")


def known_flux_variants(config_dir: str | Path = FLUX_CONFIG_DIR) -> list[Variant]:
    """FLUX.1 dev and schnell, from the shipped JSON files (the scheduler config rides in `extra`)."""
    out = []
    for name in FLUX_VARIANT_FILES:
        doc = json.loads((Path(config_dir) / name).read_text(encoding="utf-8"))
        out.append(Variant(name=doc["name"], family=doc["family"], description=doc["description"],
                           config=doc["config"], source=doc.get("source", ""),
                           extra={"scheduler": doc["scheduler"]}))
    return out


def strip_flux_prefix(keys) -> tuple[str, dict[str, str]]:
    """(prefix, {stripped key: original key}) for the prefix the file's Flux keys use ('' for none); keys under
    other prefixes (a checkpoint's text_encoders.* / vae.*) are left out."""
    keys = list(keys)
    for prefix in FLUX_PREFIXES:
        if f"{prefix}{FLUX_MARKER}" in keys:
            return prefix, {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    return "", {k: k for k in keys}


def is_flux_file(shapes: dict) -> bool:
    """A state dict in Black Forest Labs' Flux layout (FLUX.1, and the relatives `detect_flux` refuses by name)."""
    names = strip_flux_prefix(shapes)[1]
    return FLUX_MARKER in names and ("img_in.weight" in names or
                                     any(k.startswith("distilled_guidance_layer.") for k in names))


# ---------------------------------------------------------------------------------------------- facts


def flux_facts_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The architecture facts a FLUX.1 transformer's weights show (keys without prefix, BFL's names)."""
    def dim(key, axis):
        shape = shapes.get(key)
        return shape[axis] if shape is not None and len(shape) > axis else None

    doubles = {int(m.group(1)) for k in shapes if (m := _DOUBLE.match(k))}
    singles = {int(m.group(1)) for k in shapes if (m := _SINGLE.match(k))}
    return {
        "hidden_size": dim("img_in.weight", 0),
        "in_channels": dim("img_in.weight", 1),
        "out_channels": dim("final_layer.linear.weight", 0),
        "num_layers": (max(doubles) + 1) if doubles else 0,
        "num_single_layers": (max(singles) + 1) if singles else 0,
        "head_dim": dim("double_blocks.0.img_attn.norm.query_norm.scale", 0),
        "mlp_hidden": dim("double_blocks.0.img_mlp.0.weight", 0),
        "context_dim": dim("txt_in.weight", 1),
        "pooled_dim": dim("vector_in.in_layer.weight", 1),
        "guidance": "guidance_in.in_layer.weight" in shapes,
    }


def flux_facts_from_config(config: dict) -> dict[str, Any]:
    """The same facts as `flux_facts_from_shapes`, as a diffusers FluxTransformer2DModel config implies them
    (diffusers' Flux blocks have a fixed 4x MLP)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    return {
        "hidden_size": hidden,
        "in_channels": config["in_channels"],
        "out_channels": config.get("out_channels") or config["in_channels"],
        "num_layers": config["num_layers"],
        "num_single_layers": config["num_single_layers"],
        "head_dim": config["attention_head_dim"],
        "mlp_hidden": 4 * hidden,
        "context_dim": config["joint_attention_dim"],
        "pooled_dim": config["pooled_projection_dim"],
        "guidance": bool(config.get("guidance_embeds", False)),
    }


def _unsupported_flux(names: dict, facts: dict) -> str | None:
    """What a file in Flux's layout is when it is not a FLUX.1 text-to-image transformer we can train."""
    if "double_stream_modulation_img.lin.weight" in names:
        return "a FLUX.2 model (shared modulation layers), which the trainer does not train"
    if any(k.startswith("distilled_guidance_layer.") for k in names):
        return "a Chroma model (distilled_guidance_layer.*), which the trainer does not train"
    if any(k.startswith("nerf_blocks.") for k in names):
        return "a Chroma Radiance model, which the trainer does not train"
    if "double_blocks.0.img_mlp.gate_proj.weight" in names or "txt_norm.scale" in names:
        return "a model in Flux's layout with another MLP or text norm (e.g. Ovis), which the trainer does not train"
    if facts["in_channels"] is not None and facts["out_channels"] is not None \
            and facts["in_channels"] > facts["out_channels"]:
        kind = {384: "FLUX.1 Fill (inpainting)", 128: "FLUX.1 Depth or Canny"}.get(facts["in_channels"],
                                                                              "an image-conditioned Flux")
        return (f"{kind}: its transformer takes {facts['in_channels']} input channels (the condition image's "
                f"latents concatenated to the {facts['out_channels']} of the noise); the trainer trains FLUX.1 "
                "dev / schnell text-to-image models only")
    return None


def detect_flux(path: str | Path, config: str | Path | dict | None = None, shapes: dict | None = None) -> Variant:
    """The variant of a FLUX.1 diffusion-model file, from its shapes (see the module docstring).

    With `config` (a diffusers FluxTransformer2DModel config), the file must match it instead of a shipped one.
    ModelError naming the file and listing the facts found otherwise."""
    shapes = read_shapes(path) if shapes is None else shapes
    _, names = strip_flux_prefix(shapes)
    plain = {k: shapes[orig] for k, orig in names.items()}
    if not is_flux_file(shapes):
        raise ModelError(f"{path}: not a Flux diffusion model file (no {FLUX_MARKER} / img_in.weight among its "
                         f"{len(shapes)} tensors, e.g. {', '.join(sorted(shapes)[:4])})")
    facts = flux_facts_from_shapes(plain)
    unsupported = _unsupported_flux(plain, facts)
    if unsupported:
        raise ModelError(f"{path}: is {unsupported}")
    variants = known_flux_variants()
    if config is not None:
        cfg = load_config_argument(config)
        require_config_match(path, config, facts, flux_facts_from_config(cfg))
        like = next(v for v in variants if flux_facts_from_config(v.config)["guidance"] == facts["guidance"])
        return Variant(name="custom", family="flux", description=f"a Flux transformer of the given config "
                       f"({_describe_facts(facts)})", config=cfg,
                       source=str(config if not isinstance(config, dict) else "given config"), extra=like.extra)
    for variant in variants:
        if flux_facts_from_config(variant.config) == facts:
            return variant
    listing = "; ".join(f"{v.name}: {_describe_facts(flux_facts_from_config(v.config))}" for v in variants)
    raise ModelError(f"{path}: a Flux transformer that matches no known variant. Found: {_describe_facts(facts)}. "
                     f"Known: {listing}. For a fine-tune of another size, give its diffusers config (config.json) "
                     "as `config`.")


# ---------------------------------------------------------------------------------------------- loading


def convert_flux_file(tensors: dict[str, torch.Tensor], hidden_size: int) -> tuple[dict, list[str]]:
    """(diffusers state dict, keys diffusers did not use) from a FLUX.1 state dict under BFL's names (no prefix).

    diffusers' convert_flux_transformer_checkpoint_to_diffusers does every rename; only the single blocks' fused
    linear1 (q, k, v, MLP input, stacked on dim 0) is split here, at `hidden_size`, because diffusers splits it
    at FLUX.1's 3072. It gets meta placeholders of the shape it expects for those, whose results are replaced."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = dict(tensors)  # diffusers pops what it uses
    splits = {}
    for key in [k for k in state if _SINGLE.match(k) and k.rsplit(".", 2)[-2] == "linear1"]:
        fused = state[key]
        block, kind = int(_SINGLE.match(key).group(1)), key.rsplit(".", 1)[1]
        mlp = fused.shape[0] - 3 * hidden_size
        if mlp <= 0:
            raise ModelError(f"{key} has {fused.shape[0]} rows, fewer than q, k and v of width {hidden_size}")
        splits[(block, kind)] = torch.split(fused, (hidden_size, hidden_size, hidden_size, mlp), dim=0)
        state[key] = torch.empty((DIFFUSERS_FUSED_ROWS,) + tuple(fused.shape[1:]), device="meta")
    try:
        converted = convert_flux_transformer_checkpoint_to_diffusers(state)
    except KeyError as e:
        raise ModelError(f"a FLUX.1 transformer key is missing: {e}") from e
    for (block, kind), parts in splits.items():
        prefix = f"single_transformer_blocks.{block}."
        for name, part in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts):
            converted[f"{prefix}{name}.{kind}"] = part.contiguous()
    return converted, sorted(state)


def load_flux_transformer(path: str | Path, variant: Variant, dtype: torch.dtype,
                          device: torch.device | str = "cpu"):
    """FluxTransformer2DModel with the file's weights. Strict: a key the conversion leaves unused, a parameter the
    file does not fill or a shape that differs from the variant's config is a ModelError."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    prefix, names = strip_flux_prefix(read_shapes(path))
    hidden = variant.config["num_attention_heads"] * variant.config["attention_head_dim"]
    state, unused = convert_flux_file(_read_tensors(path, names, dtype), hidden)
    config = {k: v for k, v in variant.config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    assign_strictly(path, {"transformer": model}, {"transformer": state},
                    f"the {variant.name} transformer ({variant.description})", left_over=[prefix + k for k in unused])
    return model.to(device=device, dtype=dtype)


def flux_vae_config(shapes: dict | None = None) -> dict:
    """The FLUX.1 VAE's diffusers config (shipped), with the widths and depth a file's shapes show (FLUX.1's
    own: 128, 256, 512, 512 and 2 blocks per level; smaller ones are test models)."""
    config = json.loads(FLUX_VAE_CONFIG.read_text(encoding="utf-8"))["config"]
    if shapes:
        levels = sorted({int(m.group(1)) for k in shapes if (m := _VAE_DOWN.match(k))})
        blocks = {int(m.group(1)) for k in shapes if (m := _VAE_BLOCK.match(k))}
        config["block_out_channels"] = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels]
        config["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
        config["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
        config["layers_per_block"] = max(blocks) + 1
        config["latent_channels"] = shapes["decoder.conv_in.weight"][1]
    return config


def load_flux_vae_file(path: str | Path, device: torch.device | str = "cpu"):
    """AutoencoderKL (float32) from a FLUX.1 VAE file in the original layout (ae.safetensors in models/vae),
    converted by diffusers' convert_ldm_vae_checkpoint with the shipped FLUX.1 VAE config (shift 0.1159,
    scale 0.3611)."""
    from .sd import load_sd15_vae_file

    path = Path(path).expanduser()
    shapes = read_shapes(path)
    if "decoder.conv_in.weight" not in shapes or "encoder.down.0.block.0.conv2.weight" not in shapes:
        raise ModelError(f"{path}: not a FLUX.1 VAE file (no encoder.down.0.block.0.conv2.weight / "
                         "decoder.conv_in.weight); pick ae.safetensors (the FLUX.1 VAE) from models/vae")
    channels = shapes["decoder.conv_in.weight"][1]
    if channels != 16 or "quant_conv.weight" in shapes:
        raise ModelError(f"{path}: is a VAE with {channels} latent channels"
                         f"{' and quant convs (an SD / SDXL VAE)' if 'quant_conv.weight' in shapes else ''}; "
                         "FLUX.1 needs its own 16-channel VAE (ae.safetensors)")
    vae = load_sd15_vae_file(path, flux_vae_config(shapes))
    vae.to(device)
    vae.requires_grad_(False)
    vae.eval()
    return vae


def load_flux_file(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                   config: str | Path | dict | None = None, encoders_from: str | Path | None = None,
                   vae_file: str | Path | None = None, encoders=None, family: str | None = None,
                   max_sequence_length: int | None = None, guidance_scale: float | None = None):
    """A loaded Flux family from a FLUX.1 diffusion-model file.

    Text encoding and VAE: `encoders` (a trainer.comfy_encoders.ExternalEncoders) wins; otherwise CLIP, T5 and
    their tokenizers come from the FLUX.1 diffusers folder `encoders_from`, the VAE from `vae_file` or that
    folder. The flow-matching shift is the variant's released scheduler config (a folder of the same variant
    gives its own)."""
    from ..base import LoadedModel
    from ..flux import DEFAULT_GUIDANCE_SCALE, DEFAULT_MAX_SEQUENCE_LENGTH, Flux, shift_settings

    path = Path(path).expanduser()
    variant = detect_flux(path, config=config)
    if family is not None and family != variant.family:
        raise ModelError(f"{path}: is {variant.description}, trained by model.family '{variant.family}', "
                         f"not '{family}'")
    needs_text = encoders is None or encoders.encode_prompts is None
    needs_vae = encoders is None or encoders.encode_pixels is None
    if (needs_text or (needs_vae and vae_file is None)) and encoders_from is None:
        missing = [n for n, need in (("text encoders", needs_text), ("VAE", needs_vae and vae_file is None)) if need]
        raise ModelError(f"{path}: a FLUX.1 diffusion-model file holds only the transformer; the "
                         f"{' and '.join(missing)} must come from elsewhere: connect ComfyUI's CLIP (DualCLIPLoader "
                         "type flux: clip_l + t5xxl) and VAE (ae.safetensors) to the Train node, or give a FLUX.1 "
                         "diffusers folder as encoders_from (and/or ae.safetensors as vae_file)")
    length = DEFAULT_MAX_SEQUENCE_LENGTH if max_sequence_length is None else max_sequence_length
    if not (isinstance(length, int) and length > 0):
        raise ModelError(f"{path}: max_sequence_length must be a positive integer, not {length!r}")
    transformer = load_flux_transformer(path, variant, dtype, device)

    scheduler = variant.extra["scheduler"]
    vae, text_encoders, tokenizers = None, [], []
    if encoders_from is not None and (needs_text or (needs_vae and vae_file is None)):
        folder = str(Path(encoders_from).expanduser())
        folder_scheduler = Flux.check_folder(folder)  # ModelError naming the folder if it is not FLUX.1
        text_encoders, tokenizers, folder_vae, folder_transformer = _load_folder_encoders(
            folder, transformer, dtype, needs_text, needs_vae and vae_file is None)
        vae = folder_vae
        if bool(folder_transformer.get("guidance_embeds")) == bool(transformer.config.guidance_embeds):
            scheduler = folder_scheduler  # the same variant: its own scheduler, as Flux.load reads it
    if needs_vae and vae_file is not None:
        vae = load_flux_vae_file(vae_file)
    for module in text_encoders + ([vae] if vae is not None else []):
        module.requires_grad_(False)
        module.eval()
        module.to(device)

    extra = {"shift": shift_settings(scheduler),
             "guidance_scale": float(DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale),
             "max_sequence_length": length, "dtype": dtype, "path": str(path), "variant": variant.name}
    if encoders is not None:
        extra["external_encoders"] = encoders
    model = Flux(LoadedModel(denoiser=transformer, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                             extra=extra))
    if vae is not None:
        spatial = 2 ** (len(vae.config.block_out_channels) - 1)
    else:
        spatial = int(getattr(encoders, "spatial_factor", 8))
    model.resolution_factor = spatial * 2  # the VAE's downscale x the 2x2 packing
    return model


def _load_folder_encoders(folder: str, transformer, dtype, text: bool, vae: bool):
    """(text encoders, tokenizers, VAE or None, the folder's transformer config) from a FLUX.1 diffusers folder
    whose text widths fit the file's transformer."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..pipeline_folder import read_component_config

    clip_config = read_component_config(folder, "text_encoder", CLIPTextConfig)
    t5_config = read_component_config(folder, "text_encoder_2", T5Config)
    problems = []
    if t5_config.get("d_model") != transformer.config.joint_attention_dim:
        problems.append(f"text_encoder_2 d_model {t5_config.get('d_model')} != the file's joint_attention_dim "
                        f"{transformer.config.joint_attention_dim}")
    if clip_config.get("hidden_size") != transformer.config.pooled_projection_dim:
        problems.append(f"text_encoder hidden_size {clip_config.get('hidden_size')} != the file's "
                        f"pooled_projection_dim {transformer.config.pooled_projection_dim}")
    if problems:
        raise ModelError(f"{folder}: its text encoders do not fit the model file: " + "; ".join(problems))
    encoders, tokenizers, autoencoder = [], [], None
    try:
        if text:
            encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
                        T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=dtype)]
            tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                          AutoTokenizer.from_pretrained(folder, subfolder="tokenizer_2")]
        if vae:
            # float32, as Flux.load: it runs once per item before the latents are cached
            autoencoder = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelError(f"{folder}: cannot load the FLUX.1 text encoders / VAE: {e}") from e
    return encoders, tokenizers, autoencoder, read_component_config(folder, "transformer", FluxTransformer2DModel)

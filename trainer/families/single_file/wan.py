"""Wan single files (models/diffusion_models, models/vae).

A ComfyUI Wan file (e.g. ``wan2.1_t2v_1.3B_fp16.safetensors``) holds one transformer under Wan's original key
names, optionally prefixed ``model.diffusion_model.``. We:

1. read only the safetensors header (shapes), so a wrong file fails in a second, before gigabytes load;
2. detect the variant by comparing the shape facts (model width, layer count, ffn width, input channels, text
   and time embedding widths, the image cross-attention branch) with the shipped configs in
   ``trainer/configs/*.json`` -- small JSON files with the architecture facts of each released variant, so that
   nothing is fetched from a hub. A file that matches none raises a ModelError listing what it found and what
   each known variant has; a non-standard size can still be loaded by giving its diffusers ``config``;
3. convert the keys with diffusers' own ``convert_wan_transformer_to_diffusers`` and load them strictly into
   ``WanTransformer3DModel`` (every key must be used and every parameter filled).

A Wan single file has no text encoder and no VAE. They come from a Wan diffusers folder (``encoders_from``:
only its text_encoder, tokenizer and VAE are read), from a ComfyUI Wan 2.1 VAE file (``vae_file``), or from
encoders supplied by the caller (``encoders``: see trainer/comfy_encoders/; the ComfyUI nodes pass the
graph's CLIP and VAE this way).
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
    cast_like_from_pretrained,
    load_config_argument,
    read_shapes,
    require_config_match,
)
from .encoder_files import (
    attach_image_encoder_file,
    check_image_encoder_file,
    check_text_encoder_file,
    load_text_encoder_file,
)
from .wan22 import EXPERT_FAMILIES, attach_low_noise_expert, encoder_folder_family, expert_variant, load_wan22_vae_file

# ComfyUI saves checkpoints with this prefix; UNETLoader files usually have none.
WAN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")



def known_variants(config_dir: str | Path = CONFIG_DIR) -> list[Variant]:
    """The shipped variants, sorted by name (one JSON file each)."""
    out = []
    for path in sorted(Path(config_dir).glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        out.append(Variant(name=doc["name"], family=doc["family"], description=doc["description"],
                           config=doc["config"], flow_shift=doc.get("flow_shift"), source=doc.get("source", "")))
    return out



def strip_wan_prefix(keys) -> tuple[str, dict[str, str]]:
    """(prefix, {stripped key: original key}) for the prefix the file's Wan keys use ('' for none)."""
    keys = list(keys)
    for prefix in WAN_PREFIXES:
        if f"{prefix}patch_embedding.weight" in keys:
            return prefix, {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    return "", {k: k for k in keys}


# ---------------------------------------------------------------------------------------------- Wan variants


def wan_facts_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The architecture facts a Wan transformer's weights show (keys without prefix, Wan's native names)."""
    def shape(key):
        return shapes.get(key)

    patch = shape("patch_embedding.weight")  # [dim, in_channels, pt, ph, pw]
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    head = shape("head.head.weight")  # [out_channels * prod(patch), dim]
    facts: dict[str, Any] = {
        "dim": patch[0] if patch else None,
        "in_channels": patch[1] if patch else None,
        "patch_size": list(patch[2:]) if patch else None,
        "num_layers": (max(layers) + 1) if layers else 0,
        "ffn_dim": (shape("blocks.0.ffn.0.weight") or (None,))[0],
        "text_dim": (shape("text_embedding.0.weight") or (None, None))[1],
        "freq_dim": (shape("time_embedding.0.weight") or (None, None))[1],
        "out_channels": None,
        "image_dim": (shape("img_emb.proj.1.weight") or (None, None))[1],
        "added_kv_proj_dim": (shape("blocks.0.cross_attn.k_img.weight") or (None, None))[1],
        "qk_norm": shape("blocks.0.self_attn.norm_q.weight") is not None,
        "cross_attn_norm": shape("blocks.0.norm3.weight") is not None,
    }
    if head and patch:
        cells = 1
        for p in patch[2:]:
            cells *= p
        facts["out_channels"] = head[0] // cells
    return facts


def wan_facts_from_config(config: dict) -> dict[str, Any]:
    """The same facts as `wan_facts_from_shapes`, as a diffusers WanTransformer3DModel config implies them."""
    return {
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "in_channels": config["in_channels"],
        "patch_size": list(config["patch_size"]),
        "num_layers": config["num_layers"],
        "ffn_dim": config["ffn_dim"],
        "text_dim": config["text_dim"],
        "freq_dim": config["freq_dim"],
        "out_channels": config.get("out_channels") or config["in_channels"],
        "image_dim": config.get("image_dim"),
        "added_kv_proj_dim": config.get("added_kv_proj_dim"),
        "qk_norm": bool(config.get("qk_norm")),
        "cross_attn_norm": bool(config.get("cross_attn_norm")),
    }


def _unsupported_wan(shapes: dict, path) -> str | None:
    if any(k.startswith("vace_blocks.") for k in shapes):
        return "a Wan VACE model (vace_blocks.*), which the trainer does not train"
    if any(k.startswith(("motion_encoder.", "face_adapter.")) for k in shapes):
        return "a Wan Animate model, which the trainer does not train"
    if "img_emb.emb_pos" in shapes:
        return "a Wan first-last-frame (FLF2V) model, which the trainer does not train"
    return None



def is_wan_file(shapes: dict) -> bool:
    names = strip_wan_prefix(shapes)[1]
    return "patch_embedding.weight" in names and "head.head.weight" in names


def detect_wan(path: str | Path, config: str | Path | dict | None = None,
               shapes: dict | None = None, family: str | None = None) -> Variant:
    """The variant of a Wan diffusion-model file, from its shapes.

    With `config` (a diffusers transformer config), the file must match that config instead of a shipped one:
    for fine-tunes of non-standard size. ModelError naming the file and listing the facts found otherwise.
    Shapes shared by two variants (a Wan 2.2 A14B T2V expert is Wan 2.1 T2V 14B) give the one of `family` when
    given, else the one-denoiser variant (see wan22.py)."""
    shapes = read_shapes(path) if shapes is None else shapes
    prefix, names = strip_wan_prefix(shapes)
    plain = {k: shapes[orig] for k, orig in names.items()}
    if "patch_embedding.weight" not in plain or "head.head.weight" not in plain:
        raise ModelError(f"{path}: not a Wan diffusion model file (no patch_embedding.weight / head.head.weight "
                         f"among its {len(shapes)} tensors, e.g. {', '.join(sorted(shapes)[:4])}) nor a full SD 1.5 "
                         "checkpoint (model.diffusion_model.* with first_stage_model.* and cond_stage_model.*) or SDXL "
                         "checkpoint (with conditioner.embedders.*); pick a file from models/diffusion_models such as "
                         "wan2.1_t2v_1.3B_fp16.safetensors, or an SD 1.5 / SDXL checkpoint from models/checkpoints")
    unsupported = _unsupported_wan(plain, path)
    if unsupported:
        raise ModelError(f"{path}: is {unsupported}")
    facts = wan_facts_from_shapes(plain)
    if config is not None:
        cfg = load_config_argument(config)
        require_config_match(path, config, facts, wan_facts_from_config(cfg))
        family = _custom_family(cfg, facts, family)
        return Variant(name="custom", family=family, description=f"a Wan transformer of the given config "
                       f"({_describe_facts(facts)})", config=cfg, source=str(config if not isinstance(config, dict)
                                                                               else "given config"))
    candidates = known_variants()
    matches = [v for v in candidates if wan_facts_from_config(v.config) == facts]
    if matches:
        preferred = [v for v in matches if v.family == family] or \
            [v for v in matches if v.family not in EXPERT_FAMILIES] or matches
        return preferred[0]
    listing = "; ".join(f"{v.name}: {_describe_facts(wan_facts_from_config(v.config))}" for v in candidates)
    raise ModelError(
        f"{path}: a Wan transformer that matches no known variant. Found: {_describe_facts(facts)}. Known: "
        f"{listing}. For a fine-tune of another size, give its diffusers config (config.json) as `config`."
    )



def _custom_family(cfg: dict, facts: dict, family: str | None) -> str:
    """The family of a file loaded with its own config: the one asked for when it fits the channels."""
    first_frame = cfg.get("image_dim") is not None or facts["in_channels"] != facts["out_channels"]
    if family in EXPERT_FAMILIES:
        return "wan22_14b_i2v" if first_frame else "wan22_14b"
    if family == "wan22_5b" or (facts["in_channels"] == 48 and not first_frame):
        return "wan22_5b"
    return "wan21_i2v" if first_frame else "wan21"


def load_wan_transformer(path: str | Path, variant: Variant, dtype: torch.dtype,
                         device: torch.device | str = "cpu"):
    """WanTransformer3DModel with the file's weights, converted by diffusers' convert_wan_transformer_to_diffusers.

    Strict: a key the model does not have, or a parameter the file does not fill, is a ModelError."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = Path(path)
    _, names = strip_wan_prefix(read_shapes(path))
    state = convert_wan_transformer_to_diffusers(_read_tensors(path, names, dtype, stored_dtype=True))
    cast_like_from_pretrained(state, WanTransformer3DModel, dtype)  # as the folder loads: some modules in fp32
    config = {k: v for k, v in variant.config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    assign_strictly(path, {"transformer": model}, {"transformer": state},
                    f"the {variant.name} transformer ({variant.description})")
    return model.to(device)


def load_wan_vae_file(path: str | Path, device: torch.device | str = "cpu"):
    """AutoencoderKLWan (float32) from a ComfyUI Wan 2.1 VAE file (e.g. wan_2.1_vae.safetensors), converted by
    diffusers' convert_wan_vae_to_diffusers. The base width is read from the file, as ComfyUI does; the rest is
    the Wan 2.1 VAE (AutoencoderKLWan's defaults: z_dim 16, dim_mult 1,2,4,4, 2 res blocks, its latent stats)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path = Path(path)
    shapes = read_shapes(path)
    if "decoder.middle.0.residual.0.gamma" not in shapes or "decoder.head.0.gamma" not in shapes:
        raise ModelError(f"{path}: not a Wan VAE file (no decoder.middle.0.residual.0.gamma); pick the Wan 2.1 VAE "
                         "from models/vae, e.g. wan_2.1_vae.safetensors")
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in shapes:
        raise ModelError(f"{path}: is the Wan 2.2 VAE (48 latent channels), which only Wan 2.2 TI2V-5B uses; Wan 2.1 "
                         "and Wan 2.2 A14B models need the Wan 2.1 VAE (wan_2.1_vae.safetensors)")
    base_dim = shapes["decoder.head.0.gamma"][0]
    state = convert_wan_vae_to_diffusers(_read_tensors(path, {k: k for k in shapes}, torch.float32))
    with init_empty_weights():
        vae = AutoencoderKLWan(base_dim=base_dim)
    assign_strictly(path, {"vae": vae}, {"vae": state}, f"a Wan 2.1 VAE of base width {base_dim}")
    return vae.to(device)  # float32 already: read as such



def load_wan_file(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                  config: str | Path | dict | None = None, encoders_from: str | Path | None = None,
                  vae_file: str | Path | None = None, encoders=None, family: str | None = None,
                  max_sequence_length: int | None = None, low_noise_path: str | Path | None = None,
                  text_encoder_file: str | Path | None = None, image_encoder_file: str | Path | None = None):
    """A loaded Wan family from a Wan diffusion-model file (Wan 2.2 A14B: `path` is the high-noise expert and
    `low_noise_path` the low-noise one, see wan22.py).

    Text encoding and VAE: `encoders` (a trainer.comfy_encoders.ExternalEncoders) wins; otherwise the text
    encoder and tokenizer come from ComfyUI's umt5 file `text_encoder_file` or the Wan diffusers folder
    `encoders_from`, the VAE from `vae_file` or that folder, Wan 2.1 I2V's CLIP vision tower from
    `image_encoder_file` or that folder (encoder_files.py). `family`, when given, must be the detected variant's
    family."""
    from ..base import LoadedModel
    from ..wan21 import DEFAULT_FLOW_SHIFT, DEFAULT_MAX_SEQUENCE_LENGTH
    from .. import get_family

    path = Path(path).expanduser()
    variant, low_noise = expert_variant(path, detect_wan(path, config=config, family=family), family,
                                        low_noise_path, config)
    if family is not None and family != variant.family:
        raise ModelError(f"{path}: is {variant.description}, trained by model.family '{variant.family}', "
                         f"not '{family}'")
    family_cls = get_family(variant.family)
    needs_text = encoders is None or encoders.encode_prompts is None
    needs_vae = encoders is None or encoders.encode_pixels is None
    text_from_file = needs_text and text_encoder_file is not None
    if ((needs_text and not text_from_file) or (needs_vae and vae_file is None)) and encoders_from is None:
        missing = [n for n, need in (("text encoder", needs_text and not text_from_file),
                                     ("VAE", needs_vae and vae_file is None)) if need]
        vae_name = "Wan 2.2" if variant.family == "wan22_5b" else "Wan 2.1"
        raise ModelError(f"{path}: a Wan diffusion-model file holds only the transformer; the {' and '.join(missing)} "
                         f"must come from elsewhere: connect ComfyUI's CLIP (umt5) and VAE ({vae_name}) to the Train "
                         f"node, give the umt5 file as text_encoder_file and the VAE file as vae_file, or give a "
                         "Wan diffusers folder as encoders_from")
    needs_image = variant.family == "wan21_i2v" and getattr(encoders, "encode_image", None) is None
    if needs_image and encoders_from is None and image_encoder_file is None:
        raise ModelError(f"{path}: is {variant.description}; its CLIP image encoder must come from elsewhere: "
                         "connect ComfyUI's CLIP vision (CLIPVisionLoader, clip_vision_h.safetensors) to the Train "
                         "node, give that file as image_encoder_file, or give a Wan I2V diffusers folder as "
                         "encoders_from")
    if text_from_file:  # headers only: a wrong file is refused before the transformer loads
        check_text_encoder_file(text_encoder_file, text_dim=variant.config.get("text_dim"),
                                tokenizer_from=encoders_from)
    if needs_image and image_encoder_file is not None:
        check_image_encoder_file(image_encoder_file, image_dim=variant.config.get("image_dim"))
    length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    transformer = load_wan_transformer(path, variant, dtype, device)

    vae, text_encoders, tokenizers, boundary_ratio = None, [], [], None
    flow_shift = variant.flow_shift if variant.flow_shift is not None else DEFAULT_FLOW_SHIFT
    if encoders_from is not None:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        from ..wan21_i2v import read_wan_folder, scheduler_shift

        folder = str(Path(encoders_from).expanduser())
        folder_family = encoder_folder_family(folder, variant.family)  # A14B: any Wan 2.1 / A14B folder
        configs = read_wan_folder(folder, folder_family)  # ModelError naming the folder if it is another Wan
        if configs["text"].get("d_model") != transformer.config.text_dim:
            raise ModelError(f"{folder}: text_encoder d_model {configs['text'].get('d_model')} != the file's "
                             f"text_dim {transformer.config.text_dim}")
        try:
            if needs_text and not text_from_file:
                text_encoders = [UMT5EncoderModel.from_pretrained(folder, subfolder="text_encoder",
                                                                  torch_dtype=dtype)]
                tokenizers = [AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")]
            if needs_vae and vae_file is None:
                # float32, as Wan21.load: it runs once per item before the latents are cached
                vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"{folder}: cannot load the Wan text encoder / VAE: {e}") from e
        for module in text_encoders + ([vae] if vae is not None else []):
            module.requires_grad_(False)
            module.eval()
            module.to(device)
        shift = scheduler_shift(configs["scheduler"]) if folder_family == variant.family else None
        flow_shift = shift if shift is not None else flow_shift
        boundary_ratio = configs["index"].get("boundary_ratio") if folder_family == variant.family else None
    if text_from_file:
        encoder, tokenizer = load_text_encoder_file(text_encoder_file, dtype, device, tokenizer_from=encoders_from,
                                                    text_dim=transformer.config.text_dim)
        text_encoders, tokenizers = [encoder], [tokenizer]
    if needs_vae and vae_file is not None:
        vae = (load_wan22_vae_file if variant.family == "wan22_5b" else load_wan_vae_file)(vae_file, device)

    extra = {"flow_shift": float(flow_shift), "max_sequence_length": length, "dtype": dtype, "path": str(path),
             "variant": variant.name}
    if encoders is not None:
        extra["external_encoders"] = encoders
    loaded = LoadedModel(denoiser=transformer, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
                         extra=extra)
    model = family_cls(loaded)
    scale_spatial = int(vae.config.scale_factor_spatial) if vae is not None else 8
    scale_temporal = int(vae.config.scale_factor_temporal) if vae is not None else 4
    if encoders is not None and encoders.encode_pixels is not None:
        scale_spatial = int(getattr(encoders, "spatial_factor", scale_spatial))
        scale_temporal = int(getattr(encoders, "temporal_factor", scale_temporal))
    model.resolution_factor = scale_spatial * int(transformer.config.patch_size[1])
    model.temporal_factor = scale_temporal
    if low_noise is not None:
        attach_low_noise_expert(model, low_noise, variant, dtype, boundary_ratio)
    if needs_image and image_encoder_file is not None:
        attach_image_encoder_file(image_encoder_file, model)
    elif needs_image:
        from ..wan21_i2v import load_image_encoder

        load_image_encoder(str(Path(encoders_from).expanduser()), model)
    return model



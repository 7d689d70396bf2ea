"""Training on the single files ComfyUI users already have (models/diffusion_models, models/vae).

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
encoders supplied by the caller (``encoders``: see trainer/comfy_encoders.py; the ComfyUI nodes pass the
graph's CLIP and VAE this way).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# ComfyUI saves checkpoints with this prefix; UNETLoader files usually have none.
WAN_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Scaled-fp8 files (ComfyUI's *_fp8_scaled) carry per-tensor scales that a plain cast would ignore.
SCALED_FP8_MARKERS = ("scale_weight", "scaled_fp8")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Variant:
    """One model architecture we can build from a single file."""

    name: str                     # "wan21_t2v_1.3b"
    family: str                   # the trainer family that trains it: "wan21"
    description: str
    config: dict                  # the diffusers config of the denoiser
    flow_shift: float | None = None
    source: str = ""              # where the facts come from
    extra: dict = field(default_factory=dict)


def known_variants(config_dir: str | Path = CONFIG_DIR) -> list[Variant]:
    """The shipped variants, sorted by name (one JSON file each)."""
    out = []
    for path in sorted(Path(config_dir).glob("*.json")):
        doc = json.loads(path.read_text(encoding="utf-8"))
        out.append(Variant(name=doc["name"], family=doc["family"], description=doc["description"],
                           config=doc["config"], flow_shift=doc.get("flow_shift"), source=doc.get("source", "")))
    return out


# ---------------------------------------------------------------------------------------------- reading files


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a .safetensors header, without reading any tensor data."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: only .safetensors files are read (never pickled .ckpt/.pt/.bin files); "
                         "convert it to safetensors first")
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError variants
        raise ModelError(f"{path}: is a file but not a readable .safetensors file ({_first_line(e)}); model.path "
                         "takes a diffusers folder (with model_index.json) or a single .safetensors model file") from e


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


def _describe_facts(facts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in facts.items())


def load_config_argument(config: str | Path | dict) -> dict:
    """A diffusers config given as a dict, a config.json, or a folder holding config.json (or transformer/)."""
    if isinstance(config, dict):
        return dict(config)
    path = Path(config).expanduser()
    candidates = [path] if path.is_file() else [path / "config.json", path / "transformer" / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            try:
                doc = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ModelError(f"{candidate}: not a readable JSON config ({_first_line(e)})") from e
            # A shipped variant file wraps the config; a diffusers config.json is the config itself.
            return dict(doc["config"]) if isinstance(doc.get("config"), dict) else doc
    raise ModelError(f"{config}: no config.json there; give a diffusers transformer config.json or its folder")


def detect_variant(path: str | Path, config: str | Path | dict | None = None,
                   shapes: dict | None = None) -> Variant:
    """The variant of a single .safetensors model file, from its shapes.

    With `config` (a diffusers transformer config), the file must match that config instead of a shipped one:
    for fine-tunes of non-standard size. ModelError naming the file and listing the facts found otherwise."""
    shapes = read_shapes(path) if shapes is None else shapes
    if is_ldm_checkpoint(shapes):
        return detect_sd(path, config=config, shapes=shapes)
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
        expected = wan_facts_from_config(cfg)
        diffs = [f"{k}: file {facts[k]} vs config {expected[k]}" for k in facts if facts[k] != expected[k]]
        if diffs:
            raise ModelError(f"{path}: does not match the given config {config if not isinstance(config, dict) else ''}"
                             f"({'; '.join(diffs)})")
        family = "wan21_i2v" if cfg.get("image_dim") is not None or facts["in_channels"] != facts["out_channels"] \
            else "wan21"
        return Variant(name="custom", family=family, description=f"a Wan 2.1 transformer of the given config "
                       f"({_describe_facts(facts)})", config=cfg, source=str(config if not isinstance(config, dict)
                                                                               else "given config"))
    candidates = known_variants()
    for variant in candidates:
        if wan_facts_from_config(variant.config) == facts:
            return variant
    listing = "; ".join(f"{v.name}: {_describe_facts(wan_facts_from_config(v.config))}" for v in candidates)
    raise ModelError(
        f"{path}: a Wan transformer that matches no known variant. Found: {_describe_facts(facts)}. Known: "
        f"{listing}. (A Wan 2.2 TI2V-5B file has dim 3072 and in_channels 48, which the single-file loader does "
        "not build yet.) For a fine-tune of another size, give its diffusers config (config.json) as `config`."
    )


# ---------------------------------------------------------------------------------------------- loading weights


def _read_tensors(path: Path, names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors under their stripped names, each cast to `dtype` as it is read (peak memory: one file)."""
    from safetensors import safe_open

    markers = [k for k in names if any(m in k for m in SCALED_FP8_MARKERS)]
    if markers:
        raise ModelError(f"{path}: is a scaled-fp8 file ({markers[0]}); its per-tensor scales are not applied by "
                         "the trainer. Use the fp16/bf16 (or plain fp8_e4m3fn) release of this model")
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name, original in names.items():
            out[name] = f.get_tensor(original).to(dtype)
    return out


def load_wan_transformer(path: str | Path, variant: Variant, dtype: torch.dtype,
                         device: torch.device | str = "cpu"):
    """WanTransformer3DModel with the file's weights, converted by diffusers' convert_wan_transformer_to_diffusers.

    Strict: a key the model does not have, or a parameter the file does not fill, is a ModelError."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    path = Path(path)
    _, names = strip_wan_prefix(read_shapes(path))
    state = convert_wan_transformer_to_diffusers(_read_tensors(path, names, dtype))
    config = {k: v for k, v in variant.config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"{path}: its weights do not fill a {variant.description} transformer: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]})")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in model.state_dict().items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelError(f"{path}: tensor shapes differ from the {variant.name} config, e.g. "
                         f"{wrong[0][0]}: file {wrong[0][1]} vs model {wrong[0][2]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model


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
        raise ModelError(f"{path}: is the Wan 2.2 VAE (48 latent channels); Wan 2.1 models need the Wan 2.1 VAE")
    base_dim = shapes["decoder.head.0.gamma"][0]
    state = convert_wan_vae_to_diffusers(_read_tensors(path, {k: k for k in shapes}, torch.float32))
    with init_empty_weights():
        vae = AutoencoderKLWan(base_dim=base_dim)
    expected = set(vae.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"{path}: its weights do not fill a Wan 2.1 VAE of base width {base_dim}: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]})")
    vae.load_state_dict(state, strict=True, assign=True)
    vae.to(device)  # float32 already: read as such
    vae.requires_grad_(False)
    vae.eval()
    return vae


# ---------------------------------------------------------------------------------------------- families


def load_single_file(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                     config: str | Path | dict | None = None, encoders_from: str | Path | None = None,
                     vae_file: str | Path | None = None, encoders=None, family: str | None = None,
                     max_sequence_length: int | None = None, tokenizer_from: str | Path | None = None):
    """A loaded ModelFamily from a single model file.

    An original-format SD 1.5 or SDXL checkpoint loads with load_sd_checkpoint (its tokenizer from
    `encoders_from`, else `tokenizer_from`); the rest of this describes Wan files.

    Text encoding and VAE: `encoders` (a trainer.comfy_encoders.ExternalEncoders) wins; otherwise the text
    encoder and tokenizer come from the Wan diffusers folder `encoders_from`, the VAE from `vae_file` or that
    folder. `family`, when given, must be the detected variant's family."""
    from .base import LoadedModel
    from .wan21 import DEFAULT_FLOW_SHIFT, DEFAULT_MAX_SEQUENCE_LENGTH
    from . import get_family

    path = Path(path).expanduser()
    if is_ldm_checkpoint(read_shapes(path)):
        variant = detect_sd(path, config=config)  # SD 2 / refiner files: "not supported as a single file yet"
        if family is not None and family != variant.family:
            raise ModelError(f"{path}: is {variant.description}, trained by model.family '{variant.family}', "
                             f"not '{family}'")
        if encoders is not None:
            raise ModelError(f"{path}: an SD 1.5 / SDXL checkpoint has its own CLIP and VAE; the Train node's "
                             "CLIP/VAE inputs are for Wan 2.1 files: disconnect them")
        return load_sd_checkpoint(path, dtype, device, config=config, encoders_from=encoders_from,
                                  tokenizer_from=tokenizer_from, vae_file=vae_file, variant=variant)
    variant = detect_variant(path, config=config)
    if family is not None and family != variant.family:
        raise ModelError(f"{path}: is {variant.description}, trained by model.family '{variant.family}', "
                         f"not '{family}'")
    family_cls = get_family(variant.family)
    needs_text = encoders is None or encoders.encode_prompts is None
    needs_vae = encoders is None or encoders.encode_pixels is None
    if (needs_text or (needs_vae and vae_file is None)) and encoders_from is None:
        missing = [n for n, need in (("text encoder", needs_text), ("VAE", needs_vae and vae_file is None)) if need]
        raise ModelError(f"{path}: a Wan diffusion-model file holds only the transformer; the {' and '.join(missing)} "
                         "must come from elsewhere: connect ComfyUI's CLIP (umt5) and VAE (Wan 2.1) to the Train "
                         "node, or give a Wan diffusers folder as encoders_from")
    if variant.family == "wan21_i2v" and encoders_from is None:
        raise ModelError(f"{path}: is {variant.description}; its CLIP image encoder is read from a Wan I2V "
                         "diffusers folder (encoders_from); ComfyUI's CLIP vision input is not supported yet")
    length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
    transformer = load_wan_transformer(path, variant, dtype, device)

    vae, text_encoders, tokenizers = None, [], []
    flow_shift = variant.flow_shift if variant.flow_shift is not None else DEFAULT_FLOW_SHIFT
    if encoders_from is not None:
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        from .wan21_i2v import read_wan_folder, scheduler_shift

        folder = str(Path(encoders_from).expanduser())
        configs = read_wan_folder(folder, variant.family)  # ModelError naming the folder if it is another Wan
        if configs["text"].get("d_model") != transformer.config.text_dim:
            raise ModelError(f"{folder}: text_encoder d_model {configs['text'].get('d_model')} != the file's "
                             f"text_dim {transformer.config.text_dim}")
        try:
            if needs_text:
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
        shift = scheduler_shift(configs["scheduler"])
        flow_shift = shift if shift is not None else flow_shift
    if needs_vae and vae_file is not None:
        vae = load_wan_vae_file(vae_file, device)

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
    if variant.family == "wan21_i2v":
        from .wan21_i2v import load_image_encoder

        load_image_encoder(str(Path(encoders_from).expanduser()), model)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ============================================================================================== SD 1.5 checkpoints
#
# An original-format (ldm) Stable Diffusion checkpoint, as ComfyUI keeps them in models/checkpoints, holds all
# three models: model.diffusion_model.* (UNet), first_stage_model.* (VAE), cond_stage_model.transformer.* (CLIP
# text tower). They are converted by diffusers' own convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint /
# convert_ldm_clip_checkpoint and loaded strictly into the models the shipped configs describe
# (trainer/configs/sd15/, diffusers layout). The checkpoint has no tokenizer files: they come from
# `encoders_from` (a diffusers SD folder or a folder with vocab.json + merges.txt) or `tokenizer_from` (the
# ComfyUI node layer passes ComfyUI's comfy/sd1_tokenizer). Nothing in the file says epsilon or v-prediction,
# so it is epsilon unless the config says otherwise.
#
# An SDXL base checkpoint is the same with two text towers: conditioner.embedders.0.transformer.* (CLIP-L, as SD
# 1.5's) and conditioner.embedders.1.model.* (OpenCLIP bigG, converted by diffusers' convert_open_clip_checkpoint
# into CLIPTextModelWithProjection), and label_emb.* (the text_time embedding). Its configs are
# trainer/configs/sdxl/; the family ("sd15" / "sdxl") is read from those key prefixes. SDXL's second tokenizer is
# the same CLIP vocabulary padded with "!", so one CLIP tokenizer folder serves both unless the folder has its
# own tokenizer_2/.

SD15_CONFIG_DIR = CONFIG_DIR / "sd15"
SD_COMPONENTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                 "scheduler": "scheduler_config.json"}
SDXL_CONFIG_DIR = CONFIG_DIR / "sdxl"
SDXL_COMPONENTS = {**SD_COMPONENTS, "text_encoder_2": "config.json"}
# family -> (shipped config folder, component config files, the name errors use)
SD_FAMILIES = {"sd15": (SD15_CONFIG_DIR, SD_COMPONENTS, "SD 1.5"), "sdxl": (SDXL_CONFIG_DIR, SDXL_COMPONENTS, "SDXL")}
LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_CLIP = "cond_stage_model.transformer."
LDM_XL_CLIP_L = "conditioner.embedders.0.transformer."
LDM_XL_CLIP_G = "conditioner.embedders.1.model."
# the text towers each family's checkpoint holds, by prefix
SD_TEXT_PREFIXES = {"sd15": (LDM_CLIP,), "sdxl": (LDM_XL_CLIP_L, LDM_XL_CLIP_G)}
SD_PREDICTION_TYPES = ("epsilon", "v_prediction")
_INPUT_BLOCK = re.compile(r"^model\.diffusion_model\.input_blocks\.(\d+)\.")
_CLIP_LAYER = re.compile(r"^(?:cond_stage_model|conditioner\.embedders\.0)\.transformer\.text_model\.encoder\.layers\."
                         r"(\d+)\.")
_OPEN_CLIP_LAYER = re.compile(r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.")


def is_ldm_checkpoint(shapes: dict) -> bool:
    """An original-format SD checkpoint (UNet plus its VAE or text encoder), whatever the SD version."""
    return f"{LDM_UNET}input_blocks.0.0.weight" in shapes and any(
        k.startswith((LDM_VAE, "cond_stage_model.", "conditioner.")) for k in shapes)


def sd_family_of(shapes: dict) -> str:
    """"sdxl" for an ldm checkpoint with SDXL's conditioner / text_time embedding, else "sd15"."""
    xl = any(k.startswith("conditioner.embedders.") for k in shapes) or f"{LDM_UNET}label_emb.0.0.weight" in shapes
    return "sdxl" if xl else "sd15"


def sd_facts_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The architecture facts an ldm checkpoint's shapes show (what an error lists, and what variants differ in)."""
    xl = sd_family_of(shapes) == "sdxl"
    clip = LDM_XL_CLIP_L if xl else LDM_CLIP
    conv_in = shapes.get(f"{LDM_UNET}input_blocks.0.0.weight") or (None, None)
    inputs = {int(m.group(1)) for k in shapes if (m := _INPUT_BLOCK.match(k))}
    levels = 1 + sum(1 for i in inputs if f"{LDM_UNET}input_blocks.{i}.0.op.weight" in shapes)
    context = next((s[1] for k, s in sorted(shapes.items())
                    if k.startswith(LDM_UNET) and k.endswith("attn2.to_k.weight")), None)
    clip_layers = {int(m.group(1)) for k in shapes if (m := _CLIP_LAYER.match(k))}
    tokens = shapes.get(f"{clip}text_model.embeddings.token_embedding.weight") or (None, None)
    facts = {
        "in_channels": conv_in[1],
        "model_channels": conv_in[0],
        "out_channels": (shapes.get(f"{LDM_UNET}out.2.weight") or (None,))[0],
        "levels": levels,
        "res_blocks": (len(inputs) // levels - 1) if inputs else None,
        "context_dim": context,
        "text_hidden": tokens[1],
        "text_layers": (max(clip_layers) + 1) if clip_layers else 0,
        "vae_channels": (shapes.get(f"{LDM_VAE}encoder.conv_in.weight") or (None,))[0],
        "latent_channels": (shapes.get(f"{LDM_VAE}decoder.conv_in.weight") or (None, None))[1],
    }
    if xl:
        open_clip_layers = {int(m.group(1)) for k in shapes if (m := _OPEN_CLIP_LAYER.match(k))}
        facts.update({
            "text_2_hidden": (shapes.get(f"{LDM_XL_CLIP_G}token_embedding.weight") or (None, None))[1],
            "text_2_layers": (max(open_clip_layers) + 1) if open_clip_layers else 0,
            "adm_in_channels": (shapes.get(f"{LDM_UNET}label_emb.0.0.weight") or (None, None))[1],
        })
    return facts


def sd_facts_from_configs(configs: dict[str, dict]) -> dict[str, Any]:
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    facts = {
        "in_channels": unet["in_channels"],
        "model_channels": unet["block_out_channels"][0],
        "out_channels": unet["out_channels"],
        "levels": len(unet["block_out_channels"]),
        "res_blocks": unet["layers_per_block"],
        "context_dim": unet["cross_attention_dim"],
        "text_hidden": text["hidden_size"],
        "text_layers": text["num_hidden_layers"],
        "vae_channels": vae["block_out_channels"][0],
        "latent_channels": vae["latent_channels"],
    }
    if "text_encoder_2" in configs:
        text_2 = configs["text_encoder_2"]
        facts.update({"text_2_hidden": text_2["hidden_size"], "text_2_layers": text_2["num_hidden_layers"],
                      "adm_in_channels": unet.get("projection_class_embeddings_input_dim")})
    return facts


def _unsupported_sd(shapes: dict, facts: dict) -> str | None:
    """What an ldm checkpoint is when it is not an SD 1.5 or SDXL base text-to-image model we can train."""
    if sd_family_of(shapes) == "sdxl":
        if any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
            return "an SDXL refiner checkpoint (OpenCLIP bigG only, conditioner.embedders.0.model.*)"
        absent = [p + "*" for p in SD_TEXT_PREFIXES["sdxl"] if not any(k.startswith(p) for k in shapes)]
        if absent or f"{LDM_UNET}label_emb.0.0.weight" not in shapes:
            return (f"an SDXL checkpoint of another layout than SDXL base's (without "
                    f"{' and '.join(absent) or f'{LDM_UNET}label_emb.*'})")
    elif any(k.startswith("cond_stage_model.model.") for k in shapes) or facts["context_dim"] == 1024:
        return "an SD 2.x checkpoint (OpenCLIP text encoder, context 1024)"
    if facts["in_channels"] not in (None, facts["latent_channels"] or 4):
        return (f"an SD inpainting / instruct-style checkpoint (the UNet takes {facts['in_channels']} input "
                "channels, not the VAE's latents alone)")
    return None


def load_sd15_configs(config: str | Path | dict | None = None) -> tuple[dict[str, dict], str]:
    return load_sd_configs(config, "sd15")


def load_sd_configs(config: str | Path | dict | None = None, family: str = "sd15") -> tuple[dict[str, dict], str]:
    """({component: diffusers config}, where it came from) for an SD 1.5 or SDXL (`family`) checkpoint.

    `config`: None -> the family's shipped configs; 'epsilon' / 'v_prediction' -> those with that prediction type
    (nothing in a checkpoint says it is a v-prediction fine-tune); a diffusers SD folder -> the component configs
    it has (unet/config.json, vae/..., text_encoder/..., scheduler/scheduler_config.json; the others shipped);
    a dict or JSON file {"unet": {...}, "vae": ..., "text_encoder": ..., "scheduler": ..., "prediction_type": ...}
    -> the components it gives replace the shipped ones."""
    config_dir, components, label = SD_FAMILIES[family]
    configs = {name: json.loads((config_dir / name / file).read_text(encoding="utf-8"))
               for name, file in components.items()}
    if config is None:
        return configs, f"the shipped {label} configs"
    override: dict = {}
    source = str(config) if not isinstance(config, dict) else "the given config"
    if isinstance(config, dict):
        override = dict(config)
    else:
        path = Path(config).expanduser()
        # A job file resolves model.config against its folder, so "v_prediction" arrives as <folder>/v_prediction.
        if str(config) in SD_PREDICTION_TYPES or (path.name in SD_PREDICTION_TYPES and not path.exists()):
            override = {"prediction_type": path.name}
        elif path.is_dir():
            for name, file in components.items():
                if (path / name / file).is_file():
                    override[name] = _read_json(path / name / file)
            if not override:
                raise ModelError(f"{path}: no SD component configs there ("
                                 + ", ".join(f"{n}/{f}" for n, f in components.items()) + ")")
        elif path.is_file():
            override = _read_json(path)
            if override.get("_class_name") == "UNet2DConditionModel":  # a unet/config.json on its own
                override = {"unet": override}
        else:
            raise ModelError(f"{config}: model.config for an {label} checkpoint must be 'epsilon' or 'v_prediction', "
                             "a diffusers SD folder, or a JSON file of component configs; no such file or folder")
    unknown = sorted(set(override) - set(components) - {"prediction_type"})
    if unknown:
        raise ModelError(f"{source}: unknown keys {unknown} in an {label} config; use "
                         f"{', '.join(components)}, prediction_type")
    for name in components:
        if name in override:
            if not isinstance(override[name], dict):
                raise ModelError(f"{source}: {name} must be a config object")
            configs[name] = dict(override[name])
    if "prediction_type" in override:
        configs["scheduler"] = {**configs["scheduler"], "prediction_type": override["prediction_type"]}
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    if prediction not in SD_PREDICTION_TYPES:
        raise ModelError(f"{source}: prediction_type {prediction!r} is not one of {', '.join(SD_PREDICTION_TYPES)}")
    return configs, source


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable JSON config ({_first_line(e)})") from e
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: a JSON config must be an object")
    return doc


def _sd_meta_models(configs: dict[str, dict]):
    """(UNet2DConditionModel, AutoencoderKL, CLIPTextModel[, CLIPTextModelWithProjection for SDXL]) of `configs`
    on the meta device (no memory)."""
    return tuple(_sd_meta_model_dict(configs).values())


def _sd_meta_model_dict(configs: dict[str, dict]) -> dict:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]: model on the meta device} of `configs`."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def plain(cfg):
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}

    with init_empty_weights():
        models = {"unet": UNet2DConditionModel.from_config(plain(configs["unet"])),
                  "vae": AutoencoderKL.from_config(plain(configs["vae"])),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**plain(configs["text_encoder"])))}
        if "text_encoder_2" in configs:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**plain(configs["text_encoder_2"])))
    return models


def convert_sd15_checkpoint(state: dict, configs: dict[str, dict]) -> dict[str, dict]:
    return convert_sd_checkpoint(state, configs)


def convert_sd_checkpoint(state: dict, configs: dict[str, dict], text_encoder_2=None) -> dict[str, dict]:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]: diffusers state dict} from an ldm state dict, by
    diffusers' conversions; SDXL's OpenCLIP tower (configs has text_encoder_2) needs its model `text_encoder_2`
    (a meta one will do) for convert_open_clip_checkpoint. Works on meta tensors too (only renames, reshapes and
    splits), which is how the shapes are checked before loading."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    clip = LDM_XL_CLIP_L if "text_encoder_2" in configs else LDM_CLIP
    text = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(clip)})
    # transformers >= 5.6 flattened CLIPTextModel (no text_model. wrapper), as diffusers' own loader handles it;
    # position_ids is a non-persistent buffer there (old checkpoints carry it, sometimes with float drift).
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    text.pop("embeddings.position_ids", None)
    out = {
        "unet": convert_ldm_unet_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_UNET)},
                                            configs["unet"]),
        "vae": convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_VAE)},
                                          configs["vae"]),
        "text_encoder": text,
    }
    if "text_encoder_2" in configs:
        # CLIPTextModelWithProjection keeps its text_model. wrapper, the names this conversion gives
        out["text_encoder_2"] = convert_open_clip_checkpoint(
            text_encoder_2, {k: v for k, v in state.items() if k.startswith(LDM_XL_CLIP_G)}, prefix=LDM_XL_CLIP_G)
    return out


def _fit_problems(converted: dict[str, dict], models: dict) -> list[str]:
    """Why the converted weights do not exactly fill the models (missing, unexpected, wrong shapes)."""
    problems = []
    for name, model in models.items():
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in converted[name].items()}
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [f"{k}: file {got[k]} vs model {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
        if missing:
            problems.append(f"{name}: {len(missing)} parameters missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{name}: {len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if wrong:
            problems.append(f"{name}: {len(wrong)} shapes differ (e.g. {wrong[0]})")
    return problems


def detect_sd15(path: str | Path, config: str | Path | dict | None = None, shapes: dict | None = None) -> Variant:
    return detect_sd(path, config=config, shapes=shapes)


def detect_sd(path: str | Path, config: str | Path | dict | None = None, shapes: dict | None = None) -> Variant:
    """The Variant of an original-format SD 1.5 or SDXL base checkpoint (family from its key prefixes), from its
    header only: the facts must be the family's shipped (or the given config's) and diffusers' conversion of the
    file's shapes must fill the models exactly."""
    shapes = read_shapes(path) if shapes is None else shapes
    family = sd_family_of(shapes)
    label = SD_FAMILIES[family][2]
    kind = "SD" if family == "sd15" else "SDXL"
    facts = sd_facts_from_shapes(shapes)
    unsupported = _unsupported_sd(shapes, facts)
    if unsupported:
        raise ModelError(f"{path}: is {unsupported}, which is not supported as a single file yet (found: "
                         f"{_describe_facts(facts)}); train it from a diffusers folder (the sdxl family for SDXL)")
    absent = [p for p in (LDM_VAE, *SD_TEXT_PREFIXES[family]) if not any(k.startswith(p) for k in shapes)]
    if absent:
        raise ModelError(f"{path}: an {kind} checkpoint without {' and '.join(a + '*' for a in absent)}; the trainer "
                         "needs the full checkpoint (UNet, VAE and text encoders), e.g. from models/checkpoints")
    configs, source = load_sd_configs(config, family)
    expected = sd_facts_from_configs(configs)
    diffs = [f"{k}: file {facts[k]} vs config {expected.get(k)}" for k in facts if facts[k] != expected.get(k)]
    if diffs:
        hint = (f"For a model of another size, give its diffusers {kind} folder (or component configs) as "
                "model.config." if config is None else "")
        raise ModelError(f"{path}: an {kind} checkpoint that does not match {source} ({'; '.join(diffs)}). Found: "
                         f"{_describe_facts(facts)}. {hint}".rstrip())
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()
            if k.startswith((LDM_UNET, LDM_VAE, *SD_TEXT_PREFIXES[family]))}
    models = _sd_meta_model_dict(configs)
    problems = _fit_problems(convert_sd_checkpoint(meta, configs, models.get("text_encoder_2")), models)
    if problems:
        raise ModelError(f"{path}: its weights do not fill the {label} models of {source}: " + "; ".join(problems))
    prediction = configs["scheduler"].get("prediction_type", "epsilon")
    name = family if config is None else "custom"
    title = "a Stable Diffusion 1.5" if family == "sd15" else "a Stable Diffusion XL"
    return Variant(name=name, family=family, description=f"{title} checkpoint ({prediction} prediction, {source})",
                   config=configs, source=source)


def has_clip_tokenizer(folder: str | Path) -> bool:
    """Whether find_clip_tokenizer would take `folder` (a diffusers SD folder or a plain tokenizer folder)."""
    folder = Path(folder).expanduser()
    return any((c / f).is_file() for c in (folder / "tokenizer", folder) for f in ("vocab.json", "tokenizer.json"))


def find_clip_tokenizer(encoders_from: str | Path | None, tokenizer_from: str | Path | None, path) -> Path:
    """The folder to load the CLIP tokenizer from: `encoders_from` (its tokenizer/ subfolder if it has one) first,
    then `tokenizer_from` (ComfyUI's comfy/sd1_tokenizer, passed in by the node layer)."""
    for source in (encoders_from, tokenizer_from):
        if source is None:
            continue
        folder = Path(source).expanduser()
        for candidate in (folder / "tokenizer", folder):
            if any((candidate / f).is_file() for f in ("vocab.json", "tokenizer.json")):
                return candidate
        raise ModelError(f"{folder}: no CLIP tokenizer there (vocab.json + merges.txt, or tokenizer.json, in it or "
                         "in its tokenizer/ folder)")
    raise ModelError(f"{path}: an SD 1.5 / SDXL checkpoint holds no tokenizer files; give model.encoders_from (a "
                     "diffusers SD 1.5 or SDXL folder, or a folder with the CLIP tokenizer's vocab.json and merges.txt), or load it "
                     "with the Load Training Model (ComfyUI file) node, which uses ComfyUI's comfy/sd1_tokenizer")


def load_sd15_vae_file(path: str | Path, config: dict) -> "torch.nn.Module":
    """AutoencoderKL (float32) from an SD VAE file (models/vae, e.g. vae-ft-mse-840000-ema-pruned.safetensors)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path).expanduser()
    shapes = read_shapes(path)
    prefix = LDM_VAE if f"{LDM_VAE}decoder.conv_in.weight" in shapes else ""
    if f"{prefix}decoder.conv_in.weight" not in shapes or f"{prefix}encoder.conv_in.weight" not in shapes:
        raise ModelError(f"{path}: not an SD VAE file (no encoder.conv_in.weight / decoder.conv_in.weight)")
    names = {k: k for k in shapes if k.startswith(prefix) and k.startswith((prefix + "encoder.", prefix + "decoder.",
                                                                           prefix + "quant_conv.",
                                                                           prefix + "post_quant_conv."))}
    state = convert_ldm_vae_checkpoint(_read_tensors(path, names, torch.float32), config)
    with init_empty_weights():
        vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    problems = _fit_problems({"vae": state}, {"vae": vae})
    if problems:
        raise ModelError(f"{path}: its weights do not fill the SD VAE of this config: " + "; ".join(problems))
    vae.load_state_dict(state, strict=True, assign=True)
    return vae


def _sdxl_tokenizer_2(tokenizer_dir: Path):
    """SDXL's second tokenizer: the sibling tokenizer_2/ of a diffusers SDXL folder's tokenizer/ when there is one,
    else the same CLIP vocabulary padded with "!" (token 0), as SDXL base's tokenizer_2 and ComfyUI's clip_g
    tokenizer (pad_with_end=False) pad."""
    from transformers import AutoTokenizer

    sibling = tokenizer_dir.parent / "tokenizer_2"
    if tokenizer_dir.name == "tokenizer" and has_clip_tokenizer(sibling):
        return AutoTokenizer.from_pretrained(str(sibling))
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), pad_token="!")


def load_sd15_checkpoint(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", **kwargs):
    return load_sd_checkpoint(path, dtype, device, **kwargs)


def load_sd_checkpoint(path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                       config: str | Path | dict | None = None, encoders_from: str | Path | None = None,
                       tokenizer_from: str | Path | None = None, vae_file: str | Path | None = None,
                       variant: Variant | None = None):
    """An SD15 or SDXL family from an original-format checkpoint (see the section comment above). The UNet and
    the text encoders in `dtype`, the VAE in float32 (as the families' load); every tensor must fill its model
    exactly."""
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer

    from . import get_family
    from .base import LoadedModel
    from .sd15 import freeze_on

    path = Path(path).expanduser()
    variant = variant or detect_sd(path, config=config)
    tokenizer_dir = find_clip_tokenizer(encoders_from, tokenizer_from, path)  # before reading gigabytes
    configs, family = variant.config, variant.family
    label = SD_FAMILIES[family][2]
    shapes = read_shapes(path)
    tensors = _read_tensors(path, {k: k for k in shapes if k.startswith((LDM_UNET, *SD_TEXT_PREFIXES[family]))},
                            dtype)
    if vae_file is None:  # the VAE in float32 whatever `dtype`: SD's VAE overflows in fp16 (NaN latents)
        tensors.update(_read_tensors(path, {k: k for k in shapes if k.startswith(LDM_VAE)}, torch.float32))
    models = _sd_meta_model_dict(configs)
    converted = convert_sd_checkpoint(tensors, configs, models.get("text_encoder_2"))
    del tensors
    if vae_file is not None:
        del models["vae"]
    problems = _fit_problems({k: converted[k] for k in models}, models)
    if problems:
        raise ModelError(f"{path}: its weights do not fill the {label} models: " + "; ".join(problems))
    for name, model in models.items():
        model.load_state_dict(converted[name], strict=True, assign=True)
    vae = load_sd15_vae_file(vae_file, configs["vae"]) if vae_file is not None else models["vae"]
    # The weights were read in their dtypes (UNet, text encoders: `dtype`; VAE: float32) and assigned as they are.
    texts = [models["text_encoder"]] + ([models["text_encoder_2"]] if "text_encoder_2" in models else [])
    try:
        tokenizers = [AutoTokenizer.from_pretrained(str(tokenizer_dir))]
        if len(texts) == 2:
            tokenizers.append(_sdxl_tokenizer_2(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise ModelError(f"{tokenizer_dir}: cannot load the CLIP tokenizer: {_first_line(e)}") from e
    for tokenizer, text in zip(tokenizers, texts):
        if len(tokenizer) > text.config.vocab_size:
            raise ModelError(f"{tokenizer_dir}: a tokenizer of {len(tokenizer)} tokens for a text encoder of "
                             f"{text.config.vocab_size}; it belongs to another model")
    scheduler = DDPMScheduler.from_config(configs["scheduler"])  # DDPM training noise with the config's betas
    freeze_on(device, models["unet"], vae, *texts)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    loaded = LoadedModel(denoiser=models["unet"], vae=vae, text_encoders=texts, tokenizers=tokenizers, extra={
        "scheduler": scheduler, "prediction_type": scheduler.config.prediction_type, "dtype": dtype,
        "path": str(path), "variant": variant.name, "vae_scale_factor": vae_scale})
    model = get_family(family)(loaded)
    model.resolution_factor = vae_scale
    return model

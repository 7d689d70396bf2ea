"""SD 1.5 and SDXL original-format checkpoints (models/checkpoints)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelError

from .common import CONFIG_DIR, Variant, _describe_facts, _first_line, _read_tensors, assign_strictly, fit_problems, read_shapes

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


def convert_sd_checkpoint(state: dict, configs: dict[str, dict], text_encoder_2=None,
                          parts: tuple[str, ...] | None = None) -> dict[str, dict]:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]: diffusers state dict} from an ldm state dict, by
    diffusers' conversions; SDXL's OpenCLIP tower (configs has text_encoder_2) needs its model `text_encoder_2`
    (a meta one will do) for convert_open_clip_checkpoint. `parts`: only these components (the others' tensors
    need not be in `state`). Works on meta tensors too (only renames, reshapes and splits), which is how the
    shapes are checked before loading."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    parts = tuple(configs) if parts is None else parts
    out = {}
    if "text_encoder" in parts:
        clip = LDM_XL_CLIP_L if "text_encoder_2" in configs else LDM_CLIP
        text = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(clip)})
        # transformers >= 5.6 flattened CLIPTextModel (no text_model. wrapper), as diffusers' own loader handles
        # it; position_ids is a non-persistent buffer there (old checkpoints carry it, sometimes with float drift).
        text = {k.removeprefix("text_model."): v for k, v in text.items()}
        text.pop("embeddings.position_ids", None)
        out["text_encoder"] = text
    if "unet" in parts:
        out["unet"] = convert_ldm_unet_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_UNET)},
                                                  configs["unet"])
    if "vae" in parts:
        out["vae"] = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_VAE)},
                                                configs["vae"])
    if "text_encoder_2" in configs and "text_encoder_2" in parts:
        # CLIPTextModelWithProjection keeps its text_model. wrapper, the names this conversion gives
        out["text_encoder_2"] = convert_open_clip_checkpoint(
            text_encoder_2, {k: v for k, v in state.items() if k.startswith(LDM_XL_CLIP_G)}, prefix=LDM_XL_CLIP_G)
    return out


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
    problems = fit_problems(convert_sd_checkpoint(meta, configs, models.get("text_encoder_2")), models)
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
    assign_strictly(path, {"vae": vae}, {"vae": state}, "the SD VAE of this config")
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
                       variant: Variant | None = None, encoders=None):
    """An SD15 or SDXL family from an original-format checkpoint (see the section comment above). The UNet and
    the text encoders in `dtype`, the VAE in float32 (as the families' load); every tensor must fill its model
    exactly. `encoders` (trainer.comfy_encoders.ExternalEncoders, e.g. ComfyUI's CLIP and VAE): the parts it
    encodes (prompts: the text towers and tokenizers; pixels: the VAE, also over `vae_file`) are not read from
    the file at all, so they cost no memory twice."""
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer

    from .. import get_family
    from ..base import LoadedModel
    from ..sd15 import freeze_on

    path = Path(path).expanduser()
    variant = variant or detect_sd(path, config=config)
    own_text = encoders is None or encoders.encode_prompts is None
    own_vae = encoders is None or encoders.encode_pixels is None
    # before reading gigabytes
    tokenizer_dir = find_clip_tokenizer(encoders_from, tokenizer_from, path) if own_text else None
    configs, family = variant.config, variant.family
    label = SD_FAMILIES[family][2]
    text_names = [n for n in ("text_encoder", "text_encoder_2") if n in configs]
    parts = ["unet"] + (text_names if own_text else []) + (["vae"] if own_vae and vae_file is None else [])
    shapes = read_shapes(path)
    tensors = _read_tensors(path, {k: k for k in shapes if k.startswith(
        (LDM_UNET, *(SD_TEXT_PREFIXES[family] if own_text else ())))}, dtype)
    if "vae" in parts:  # the VAE in float32 whatever `dtype`: SD's VAE overflows in fp16 (NaN latents)
        tensors.update(_read_tensors(path, {k: k for k in shapes if k.startswith(LDM_VAE)}, torch.float32))
    models = _sd_meta_model_dict(configs)
    converted = convert_sd_checkpoint(tensors, configs, models.get("text_encoder_2"), parts=tuple(parts))
    del tensors
    models = {k: models[k] for k in parts}
    assign_strictly(path, models, {k: converted[k] for k in models}, f"the {label} models")
    vae = None
    if own_vae:
        vae = load_sd15_vae_file(vae_file, configs["vae"]) if vae_file is not None else models["vae"]
    # The weights were read in their dtypes (UNet, text encoders: `dtype`; VAE: float32) and assigned as they are.
    texts = [models[n] for n in text_names] if own_text else []
    tokenizers = []
    if own_text:
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
    freeze_on(device, models["unet"], *([vae] if vae is not None else []), *texts)
    vae_scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    loaded = LoadedModel(denoiser=models["unet"], vae=vae, text_encoders=texts, tokenizers=tokenizers, extra={
        "scheduler": scheduler, "prediction_type": scheduler.config.prediction_type, "dtype": dtype,
        "path": str(path), "variant": variant.name, "vae_scale_factor": vae_scale})
    if encoders is not None:
        loaded.extra["external_encoders"] = encoders
    model = get_family(family)(loaded)
    model.resolution_factor = vae_scale
    return model

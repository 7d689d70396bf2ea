"""Wan 2.2 single files: the A14B expert pairs and the Wan 2.2 VAE file.

- TI2V-5B (``wan2.2_ti2v_5B_fp16.safetensors``) is one Wan transformer file like Wan 2.1's (dim 3072, 30 layers,
  48 input/output channels): a shipped variant detected from its shapes by ``wan.py``; it needs the Wan 2.2 VAE.
- A14B is two expert files (``wan2.2_t2v_high_noise_14B_fp16`` + ``..._low_noise_...``). Each expert has exactly
  the shapes of Wan 2.1 T2V 14B (the I2V experts: 36 input channels, no CLIP image branch, which no Wan 2.1 model
  has), so shapes cannot tell a T2V expert from Wan 2.1 14B: the family is explicit (``model.family: wan22_14b``,
  or giving the second file), ``model.path`` is the high-noise expert and ``model.low_noise_path`` the low-noise
  one. A lone 14B file *named* like an expert is refused as Wan 2.1 with a message saying how to give both.
- The Wan 2.2 VAE file (``wan2.2_vae.safetensors``): diffusers' convert_wan_vae_to_diffusers knows the Wan 2.1
  layout only, so the residual down/up blocks (``encoder.downsamples.i.downsamples.j`` ->
  ``encoder.down_blocks.i.resnets.j`` / ``.downsampler``) are renamed here and everything else (middle, head,
  in/out convs) is left to it. The architecture is the shipped ``configs/wan22_vae/config.json`` (the released
  vae/config.json, with its 48 latent statistics); the widths are read from the file, as ComfyUI reads the Wan
  2.1 VAE's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...errors import ModelError
from .common import CONFIG_DIR, _read_tensors, assign_strictly, read_shapes

WAN22_VAE_CONFIG_FILE = CONFIG_DIR / "wan22_vae" / "config.json"
EXPERT_FAMILIES = ("wan22_14b", "wan22_14b_i2v")
# Folders whose text encoder (umt5) and VAE (Wan 2.1) an A14B expert file can use as encoders_from.
A14B_ENCODER_FOLDERS = ("wan22_14b", "wan22_14b_i2v", "wan21", "wan21_i2v")
WAN22_VAE_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"
_EXPERT_NAME = re.compile(r"(high|low)[ _.-]?noise", re.IGNORECASE)
_NESTED = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.(downsamples|upsamples)\.(\d+)\.(.+)$")
_RESNET_PARTS = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                 ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))


# ---------------------------------------------------------------------------------------------- A14B expert pairs


def expert_named(path: str | Path) -> str | None:
    """'high_noise' / 'low_noise' when the file name says which expert it is (as ComfyUI's release files do)."""
    found = {m.group(1).lower() for m in _EXPERT_NAME.finditer(Path(path).name)}
    return f"{found.pop()}_noise" if len(found) == 1 else None


def refuse_expert_as_wan21(path: Path, variant) -> None:
    """A Wan 2.1-shaped 14B file named like a Wan 2.2 expert: say what it probably is and how to train it."""
    expert = expert_named(path)
    if expert is None or variant.name != "wan21_t2v_14b":
        return
    raise ModelError(
        f"{path}: is named like a Wan 2.2 A14B {expert} expert, whose shapes equal Wan 2.1 T2V 14B's, so it is not "
        "trained as Wan 2.1. A Wan 2.2 A14B model is two files: give model.family wan22_14b, model.path = the "
        "high-noise expert and model.low_noise_path = the low-noise expert (in ComfyUI: pick the low-noise file as "
        "the Load Training Model (ComfyUI file) node's low_noise_file). To train it as Wan 2.1 anyway, rename it")


def check_expert_pair(path: Path, low_noise_path: str | Path | None, family: str) -> Path:
    """The low-noise file of a `family` expert pair, checked by name only (the shapes are compared by the caller)."""
    if low_noise_path is None:
        raise ModelError(
            f"{path}: model.family {family} (Wan 2.2 A14B) is two expert files, and the low-noise one is missing: "
            "model.path is the high-noise expert, give the low-noise expert as model.low_noise_path (in ComfyUI: "
            "the node's low_noise_file). Both load; train_high_noise / train_low_noise choose which get a LoRA")
    low = Path(low_noise_path).expanduser()
    if low.resolve() == path.resolve():
        raise ModelError(f"{low}: model.low_noise_path is the same file as model.path; give the two experts")
    if expert_named(path) == "low_noise" or expert_named(low) == "high_noise":
        raise ModelError(f"{path} / {low}: the file names say the experts are swapped: model.path must be the "
                         "high-noise expert and model.low_noise_path the low-noise one")
    return low


def compare_expert_facts(path: Path, low: Path, facts: dict, low_facts: dict, description: str) -> None:
    diffs = [f"{k}: {facts[k]} vs {low_facts[k]}" for k in facts if facts[k] != low_facts.get(k)]
    if diffs:
        raise ModelError(f"{low}: is not the same Wan 2.2 A14B variant as {path} ({description}): "
                         f"{'; '.join(diffs)}. Both experts of one model have the same shapes")


def encoder_folder_family(folder: str, family: str) -> str:
    """The family to read an encoders_from folder as. An A14B file can take its umt5 and Wan 2.1 VAE from any
    Wan 2.1 / 2.2 A14B folder (they share both); other families need a folder of their own family."""
    if family not in EXPERT_FAMILIES:
        return family
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from ..pipeline_folder import read_component_config, read_model_index
    from ..wan21_i2v import _present, wan_variant

    try:
        index = read_model_index(folder)
        transformer = read_component_config(folder, "transformer" if _present(index, "transformer")
                                            else "transformer_2", WanTransformer3DModel)
        found = wan_variant(index, transformer, read_component_config(folder, "vae", AutoencoderKLWan))
    except ModelError:
        return family  # read_wan_folder then names what is wrong with the folder
    return found if found in A14B_ENCODER_FOLDERS else family


# ---------------------------------------------------------------------------------------------- Wan 2.2 VAE


def wan22_vae_config() -> dict:
    """The released Wan 2.2 VAE's diffusers config (AutoencoderKLWan), from the shipped JSON."""
    return json.loads(WAN22_VAE_CONFIG_FILE.read_text(encoding="utf-8"))


def is_wan22_vae(shapes) -> bool:
    return WAN22_VAE_MARKER in shapes


def convert_wan22_vae_to_diffusers(state: dict) -> dict:
    """A Wan 2.2 VAE state dict (Wan's / ComfyUI's key names) -> AutoencoderKLWan(is_residual=True) names."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    nested, rest = {}, {}
    for key, value in state.items():
        match = _NESTED.match(key)
        if match is None:
            rest[key] = value
            continue
        side, _, block, _, index, tail = match.groups()
        blocks = "down_blocks" if side == "encoder" else "up_blocks"
        if tail.startswith(("resample.", "time_conv.")):  # the block's closing down/upsampler (no index)
            nested[f"{side}.{blocks}.{block}.{'downsampler' if side == 'encoder' else 'upsampler'}.{tail}"] = value
            continue
        for old, new in _RESNET_PARTS:
            if tail.startswith(old):
                tail = new + tail[len(old):]
                break
        nested[f"{side}.{blocks}.{block}.resnets.{index}.{tail}"] = value
    return {**convert_wan_vae_to_diffusers(rest), **nested}


def load_wan22_vae_file(path: str | Path, device: torch.device | str = "cpu"):
    """AutoencoderKLWan (float32) from a ComfyUI Wan 2.2 VAE file (wan2.2_vae.safetensors): the released
    architecture and latent statistics, the encoder / decoder widths read from the file. Strict."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan

    path = Path(path).expanduser()
    shapes = read_shapes(path)
    if "decoder.middle.0.residual.0.gamma" not in shapes or "decoder.head.0.gamma" not in shapes:
        raise ModelError(f"{path}: not a Wan VAE file (no decoder.middle.0.residual.0.gamma); Wan 2.2 TI2V-5B "
                         "needs the Wan 2.2 VAE from models/vae, e.g. wan2.2_vae.safetensors")
    if not is_wan22_vae(shapes):
        raise ModelError(f"{path}: is the Wan 2.1 VAE (16 latent channels); Wan 2.2 TI2V-5B needs the Wan 2.2 VAE "
                         "(48 latent channels), e.g. wan2.2_vae.safetensors")
    config = {k: v for k, v in wan22_vae_config().items() if not k.startswith("_")}
    config["base_dim"] = shapes["encoder.conv1.weight"][0]
    config["decoder_base_dim"] = shapes["decoder.head.0.gamma"][0]
    state = convert_wan22_vae_to_diffusers(_read_tensors(path, {k: k for k in shapes}, torch.float32))
    with init_empty_weights():
        vae = AutoencoderKLWan.from_config(config)
    assign_strictly(path, {"vae": vae}, {"vae": state}, f"the Wan 2.2 VAE (base width {config['base_dim']}, "
                    f"decoder {config['decoder_base_dim']})")
    return vae.to(device)


# ---------------------------------------------------------------------------------------------- loading hooks


def expert_variant(path: Path, variant, family: str | None, low_noise_path, config=None):
    """(variant, low-noise file or None) for a Wan file `detect_wan` found as `variant`: with an A14B family or a
    low-noise file, both experts are checked (names, then the same shapes); a lone 14B file named like an
    expert and asked for as Wan 2.1 (or with no family) is refused with how to give both."""
    from .wan import detect_wan, wan_facts_from_shapes, strip_wan_prefix

    if family is None and low_noise_path is not None and variant.family not in EXPERT_FAMILIES:
        variant = detect_wan(path, config=config, family="wan22_14b")  # the pair says it is Wan 2.2 A14B
    if family is not None and family != variant.family:
        return variant, None  # the caller says which family the file is
    if variant.family not in EXPERT_FAMILIES:
        if low_noise_path is not None:
            raise ModelError(f"{path}: is {variant.description}; model.low_noise_path is only for the two experts "
                             f"of Wan 2.2 A14B (model.family {' or '.join(EXPERT_FAMILIES)})")
        refuse_expert_as_wan21(path, variant)
        return variant, None
    low = check_expert_pair(path, low_noise_path, variant.family)
    low_variant = detect_wan(low, config=config, family=variant.family)

    def facts(p):
        shapes = read_shapes(p)
        return wan_facts_from_shapes({k: shapes[o] for k, o in strip_wan_prefix(shapes)[1].items()})

    compare_expert_facts(path, low, facts(path), facts(low), variant.description)
    if low_variant.family != variant.family:
        raise ModelError(f"{low}: is {low_variant.description}, not {variant.description} like {path}")
    return variant, low


def attach_low_noise_expert(model, low: Path, variant, dtype: torch.dtype, boundary_ratio: float | None) -> None:
    """Load the low-noise expert file (strict, on the CPU as the folder's transformer_2) into the family, the
    way Wan22A14B.load attaches transformer_2; `boundary_ratio` None: the family's released default."""
    from .wan import load_wan_transformer

    ratio = boundary_ratio if boundary_ratio is not None else type(model).default_boundary_ratio
    model.set_experts(load_wan_transformer(low, variant, dtype, "cpu"), ratio)

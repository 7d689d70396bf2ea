"""What every single-file loader shares: the Variant record, reading a .safetensors header and its tensors
(never a pickle), and reading a config given by the user."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import ModelError
from .quantized import file_quantization

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
# Scaled-fp8 files (ComfyUI's *_fp8_scaled) carry per-tensor scales that a plain cast would ignore: they are
# dequantized as they are read (quantized.py), and these keys never reach detection or the key conversions.
SCALED_FP8_MARKERS = ("scale_weight", "scaled_fp8", "weight_scale", "comfy_quant")


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



# ---------------------------------------------------------------------------------------------- reading files


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a .safetensors header, without reading any tensor data. A scaled-fp8 file's scale and
    marker tensors are left out: they are applied by _read_tensors."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: only .safetensors files are read (never pickled .ckpt/.pt/.bin files); "
                         "convert it to safetensors first")
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError variants
        raise ModelError(f"{path}: is a file but not a readable .safetensors file ({_first_line(e)}); model.path "
                         "takes a diffusers folder (with model_index.json) or a single .safetensors model file") from e
    quantization = file_quantization(path)  # refuses, before any weight loads, what cannot be dequantized
    return shapes if quantization is None else {k: v for k, v in shapes.items() if k not in quantization.consumed}



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



def _read_tensors(path: Path, names: dict[str, str], dtype: torch.dtype,
                  stored_dtype: bool = False) -> dict[str, torch.Tensor]:
    """The tensors under their stripped names, each cast to `dtype` as it is read (peak memory: one file), or
    left in the dtype the file stores them in with `stored_dtype` (the caller casts them after converting the
    names, see cast_like_from_pretrained); the scaled float8 weights of a scaled-fp8 file come out dequantized
    to `dtype` as ComfyUI computes them (quantized.py)."""
    from safetensors import safe_open

    quantization = file_quantization(path)
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name, original in names.items():
            if quantization and original in quantization.scales:
                out[name] = quantization.read(f, original, dtype)
            else:
                tensor = f.get_tensor(original)
                out[name] = tensor if stored_dtype else tensor.to(dtype)
    return out


def cast_like_from_pretrained(state: dict[str, torch.Tensor], model_cls, dtype: torch.dtype) -> None:
    """Cast a converted state dict in place the way diffusers' from_pretrained(torch_dtype=dtype) casts a folder's
    weights: the model class's _keep_in_fp32_modules (Wan: time embedder, modulation tables, norms) go to float32
    from the file's values, everything else to `dtype`. One tensor at a time, so the peak stays one file."""
    keep = tuple(getattr(model_cls, "_keep_in_fp32_modules", None) or ())
    for key in list(state):
        fp32 = any(m in key.split(".") for m in keep)
        state[key] = state[key].to(torch.float32 if fp32 else dtype)



def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__




def fit_problems(converted: dict[str, dict], models: dict) -> list[str]:
    """Why converted weights do not exactly fill the models ({name: state dict}, {name: model}): parameters
    missing, tensors left over, shapes that differ. Works on meta tensors (shapes only)."""
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


def assign_strictly(path, models: dict, states: dict[str, dict], what: str, left_over: list = ()) -> None:
    """Load each state dict into its model (built on the meta device: the tensors are assigned, not copied) only
    if they fit exactly (see fit_problems); the models come out frozen and in eval mode. ModelError naming the
    file and `what` otherwise. `left_over`: file keys the conversion could not place (also a misfit)."""
    problems = fit_problems(states, models)
    if left_over:
        problems.append(f"{len(left_over)} file tensors the conversion did not use (e.g. {list(left_over)[:3]})")
    if problems:
        raise ModelError(f"{path}: its weights do not fill {what}: " + "; ".join(problems))
    for name, model in models.items():
        model.load_state_dict(states[name], strict=True, assign=True)
        model.requires_grad_(False)
        model.eval()


def require_config_match(path, config, facts: dict, expected: dict) -> None:
    """ModelError listing every architecture fact in which the file differs from the config the user gave."""
    diffs = [f"{k}: file {facts[k]} vs config {expected.get(k)}" for k in facts if facts[k] != expected.get(k)]
    if diffs:
        raise ModelError(f"{path}: does not match the given config {config if not isinstance(config, dict) else ''}"
                         f"({'; '.join(diffs)})")

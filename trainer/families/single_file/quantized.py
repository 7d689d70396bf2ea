"""ComfyUI's scaled-fp8 model files (e.g. wan2.1_t2v_14B_fp8_scaled.safetensors), dequantized as they are read.

Such a file stores some layers' weights as float8 plus a scale per weight; the real weight is
``weight.to(dtype) * scale.to(dtype)``, which is what ComfyUI v0.8.0 computes (comfy_kitchen's
dequantize_per_tensor_fp8, called by comfy/ops.py MixedPrecisionOps with the model's compute dtype). A plain cast
would ignore the scales. ComfyUI reads three spellings of the same thing:

* the legacy ``scaled_fp8`` format: a ``scaled_fp8`` marker tensor and ``<layer>.scale_weight`` (optionally
  ``<layer>.scale_input``) -- comfy/utils.py convert_old_quants turns it into the form below;
* the mixed-precision format of QUANTIZATION.md: ``<layer>.weight_scale`` / ``<layer>.input_scale`` with a
  ``_quantization_metadata`` JSON entry in the safetensors metadata naming each layer's format;
* the same with a per-layer ``<layer>.comfy_quant`` tensor (JSON bytes) instead, as ComfyUI saves a model.

Only the per-tensor float8 formats (``float8_e4m3fn``, ``float8_e5m2``; one scale per weight) are dequantized,
the only ones ComfyUI v0.8.0 has; block-scaled formats (nvfp4, mxfp8, ...) are refused by name.
A legacy file's weights are dequantized from the float8 type they are stored in (ComfyUI v0.8.0 reads every
legacy file as e4m3fn, with a TODO asking whether e5m2 ones exist). Input (activation) scales only matter to
ComfyUI's fp8 matmuls at inference, so they are read past: training uses the dequantized weights. Every scale, marker and config tensor is consumed here, so variant detection and
the key conversions only ever see the model's real weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ModelError

FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_FP8_HEADER_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

LEGACY_MARKER = "scaled_fp8"
LEGACY_SUFFIXES = (".scale_weight", ".scale_input")
# What the mixed-precision format stores beside a quantized weight (QUANTIZATION.md, "Scaling Parameters").
MIXED_SUFFIXES = (".weight_scale", ".input_scale", ".weight_scale_2", ".pre_quant_scale", ".comfy_quant")
METADATA_KEY = "_quantization_metadata"

LEGACY = "ComfyUI's legacy scaled_fp8 format (scaled_fp8 marker, <layer>.scale_weight)"
MIXED_METADATA = "ComfyUI's mixed-precision format (_quantization_metadata, <layer>.weight_scale)"
MIXED_TENSORS = "ComfyUI's mixed-precision format (<layer>.comfy_quant, <layer>.weight_scale)"


@dataclass(frozen=True)
class Quantization:
    """How one file is quantized: which weights are scaled float8 and where their scales are."""

    style: str                    # one of LEGACY / MIXED_METADATA / MIXED_TENSORS
    scales: dict                  # {weight key: its scale key}
    formats: dict                 # {weight key: "float8_e4m3fn" | "float8_e5m2"} as stored
    consumed: frozenset           # every marker / scale / config key: never a model weight

    def describe(self) -> str:
        kinds = sorted(set(self.formats.values()))
        return f"{self.style}: {len(self.scales)} scaled {'/'.join(kinds)} weights"

    def read(self, f, key: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `key` of the open safetensors file `f` in `dtype`, dequantized when it is a scaled weight."""
        if key in self.scales:
            return dequantize(f.get_tensor(key), f.get_tensor(self.scales[key]), dtype)
        return f.get_tensor(key).to(dtype)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's float8 dequantization, in the same order and dtype: both cast to `dtype`, then multiplied (so a
    bf16 run sees exactly the weights ComfyUI's bf16 inference sees)."""
    return weight.to(dtype) * scale.to(dtype)


def is_quantization_key(key: str) -> bool:
    """A marker, scale or config tensor of either format (never a model weight)."""
    return key == LEGACY_MARKER or key.endswith("." + LEGACY_MARKER) \
        or key.endswith(LEGACY_SUFFIXES) or key.endswith(MIXED_SUFFIXES)


def file_quantization(path: str | Path) -> Quantization | None:
    """The quantization of a .safetensors file from its header and metadata (and its tiny comfy_quant tensors),
    None for an unquantized file. ModelError naming the file, the format and the layer for anything the trainer
    cannot dequantize exactly as ComfyUI does."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
        if METADATA_KEY not in metadata and not any(is_quantization_key(k) for k in keys):
            return None
        header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in keys}
        layers, style = _layer_formats(path, keys, metadata, f)
    return _plan(path, style, layers, header)


def _layer_formats(path, keys: list, metadata: dict, f) -> tuple[dict, str]:
    """({layer: format name}, style), read the way comfy/utils.py convert_old_quants does: the metadata entry
    first, then the legacy marker, then per-layer comfy_quant tensors."""
    if METADATA_KEY in metadata:
        try:
            doc = json.loads(metadata[METADATA_KEY])
            entries = doc["layers"]
            return {layer: _format_name(conf) for layer, conf in entries.items()}, MIXED_METADATA
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{path}: its {METADATA_KEY} metadata is not ComfyUI's quantization metadata "
                             f"({type(e).__name__}: {e}); expected {{\"layers\": {{layer: {{\"format\": ...}}}}}}") from e
    if any(k == LEGACY_MARKER or k.endswith("." + LEGACY_MARKER) for k in keys):
        return {k[:-len(".scale_weight")]: "scaled_fp8" for k in keys if k.endswith(".scale_weight")}, LEGACY
    configs = [k for k in keys if k.endswith(".comfy_quant")]
    layers = {}
    for key in configs:
        try:
            layers[key[:-len(".comfy_quant")]] = _format_name(json.loads(f.get_tensor(key).numpy().tobytes()))
        except (ValueError, TypeError, AttributeError) as e:
            raise ModelError(f"{path}: {key} is not a JSON quantization config ({e})") from e
    if not layers:
        found = next(k for k in keys if is_quantization_key(k))
        raise ModelError(f"{path}: has quantization scales ({found}) but no quantization config (no scaled_fp8 "
                         f"marker, no {METADATA_KEY} metadata, no comfy_quant tensors), so it is no scaled / "
                         "quantized fp8 format ComfyUI reads; use the fp16/bf16 release of this model")
    return layers, MIXED_TENSORS


def _format_name(conf) -> str:
    # ComfyUI's code reads {"format": ...}; QUANTIZATION.md's example writes the bare name.
    name = conf.get("format") if isinstance(conf, dict) else conf
    if not isinstance(name, str):
        raise TypeError(f"no format name in {conf!r}")
    return name


def _plan(path, style: str, layers: dict, header: dict) -> Quantization:
    unsupported = sorted({fmt for fmt in layers.values() if fmt not in FP8_FORMATS and fmt != "scaled_fp8"})
    if unsupported:
        example = next(layer for layer, fmt in layers.items() if fmt == unsupported[0])
        raise ModelError(f"{path}: is quantized as {', '.join(unsupported)} ({style}; e.g. layer {example}), which "
                         "the trainer cannot dequantize: it reads ComfyUI's per-tensor float8 files (scaled_fp8, "
                         "float8_e4m3fn, float8_e5m2). Use the fp16/bf16 or a *_fp8_scaled release of this model")
    scale_suffix = ".scale_weight" if style == LEGACY else ".weight_scale"
    scales, formats = {}, {}
    for layer in sorted(layers):
        weight, scale = f"{layer}.weight", f"{layer}{scale_suffix}"
        if weight not in header:
            raise ModelError(f"{path}: its quantization config names layer {layer}, which has no {weight}")
        if scale not in header:
            raise ModelError(f"{path}: layer {layer} is quantized ({style}) but has no {scale}")
        (shape, stored), (scale_shape, _) = header[weight], header[scale]
        if stored not in _FP8_HEADER_DTYPES:
            raise ModelError(f"{path}: {weight} is stored as {stored}, not float8 (F8_E4M3 / F8_E5M2), though the "
                             f"file declares it quantized ({style}); ComfyUI v0.8.0 casts such weights by value, so "
                             "the trainer refuses it. Use the fp16/bf16 release of this model")
        declared = layers[layer]
        if declared != "scaled_fp8" and _FP8_HEADER_DTYPES[stored] != declared:
            raise ModelError(f"{path}: {weight} is declared {declared} but stored as {_FP8_HEADER_DTYPES[stored]}")
        if math.prod(scale_shape) != 1:  # ComfyUI v0.8.0's float8 layouts apply one scale per weight only
            raise ModelError(f"{path}: {scale} has shape {list(scale_shape)}, not one scale per tensor of {weight} "
                             f"{list(shape)}: per-channel or block-scaled formats are not supported")
        scales[weight], formats[weight] = scale, _FP8_HEADER_DTYPES[stored]
    consumed = frozenset(k for k in header if is_quantization_key(k))
    orphans = sorted(k for k in consumed if k.endswith((".scale_weight", ".weight_scale"))
                     and k not in set(scales.values()))
    if orphans:
        raise ModelError(f"{path}: {orphans[0]} scales a layer its quantization config ({style}) does not list")
    block = sorted(k for k in consumed if k.endswith((".weight_scale_2", ".pre_quant_scale")))
    if block:
        raise ModelError(f"{path}: has {block[0]}, a double-scaled / smoothed format the trainer cannot dequantize; "
                         "use the fp16/bf16 release of this model")
    return Quantization(style=style, scales=scales, formats=formats, consumed=consumed)


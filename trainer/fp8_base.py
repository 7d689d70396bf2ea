"""model.dtype fp8: the frozen base model's big Linear weights stored as float8_e4m3fn, computed in bf16.

What musubi-tuner calls --fp8_base and ai-toolkit "quantize": a 14B (Wan) or 12B (Flux) denoiser takes half
the memory of bf16, so its LoRA trains on a 24 GB GPU. Each quantized layer keeps its weight in float8_e4m3fn
with one float32 scale per tensor (absmax / 448, 448 being e4m3fn's largest finite value), and dequantizes it
in its forward, one layer at a time. The LoRA itself trains in fp32 exactly as with bf16 weights, and its
export does not change: the LoRA delta does not depend on the base's dtype.

Only the Linear layers inside the denoiser's repeated blocks are quantized (they hold nearly all the weights);
embeddings, norms, the final head, convolutions, text encoders and VAEs stay in bf16.

Why not diffusers' `enable_layerwise_casting(storage_dtype=float8)`: it casts a whole module to the compute
dtype before its forward, and autograd then keeps that upcast weight alive until backward (F.linear saves its
weight to compute the input gradient), so in training the saving is lost; it has no scale (weights over 448
overflow); and it patches `module.forward`, which the LoRA patches too (trainer/lora.py). Here the backward
recomputes the dequantized weight instead of saving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import JobError, ModelError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
COMPUTE_DTYPE = torch.bfloat16
# Where each supported denoiser keeps its repeated blocks (Wan / Flux transformers, SD / SDXL UNets).
BLOCK_PREFIXES = ("blocks.", "transformer_blocks.", "single_transformer_blocks.", "down_blocks.", "up_blocks.",
                  "mid_block.")


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale) with weight ~= fp8 * scale. The scale is absmax / 448 rounded to
    bf16, so that dequantizing in bf16 multiplies by exactly the stored scale (a scale rounded at every forward
    would bias the whole layer by up to 0.2%); the largest values clamp to 448 if that rounding went down."""
    w = weight.detach().float()
    absmax = w.abs().max()
    if not torch.isfinite(absmax):
        raise ValueError("the weight has inf or NaN values")
    scale = (absmax / FP8_MAX).to(COMPUTE_DTYPE).float() if absmax > 0 else torch.ones((), device=w.device)
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # in place: one weight-sized temporary per layer, not two
    return weight.to(dtype).mul_(scale.to(dtype))


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ dequantize(W).T + b, saving only the fp8 weight (the parameter itself, no copy) for backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x.to(dtype), dequantize(weight, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(ctx.dtype) @ dequantize(weight, scale, ctx.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None


class Fp8Linear(nn.Linear):
    """An nn.Linear (LoRA targeting and module_group still see one) whose weight is float8_e4m3fn with a float32
    `scale` buffer. Computes in `compute_dtype` (bf16), or in the autocast dtype when autocast is on. The weight
    never gets a gradient."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, work_device: torch.device | str | None = None) -> "Fp8Linear":
        """Quantize `linear` (on `work_device` if given, e.g. the GPU while the model sits on the CPU); the result
        stays where `linear`'s weight is."""
        home = linear.weight.device
        weight, scale = quantize_tensor(linear.weight.to(work_device) if work_device is not None else linear.weight)
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight = nn.Parameter(weight.to(home), requires_grad=False)
        layer.bias = linear.bias
        layer.register_buffer("scale", scale.to(home))
        dtype = linear.weight.dtype
        layer.compute_dtype = dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else COMPUTE_DTYPE
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else self.compute_dtype
        return _Fp8Matmul.apply(x, self.weight, self.scale, self.bias, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight=float8_e4m3fn, compute={str(self.compute_dtype).split('.')[-1]}"


def quantizable(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear and name.startswith(BLOCK_PREFIXES)


def quantize_denoiser(denoiser: nn.Module, work_device: torch.device | str | None = None) -> int:
    """Replace the Linear layers inside `denoiser`'s blocks by Fp8Linear, in place; returns how many. Layers that
    are already Fp8Linear are left alone, so calling it twice is harmless."""
    chosen = [(name, m) for name, m in denoiser.named_modules() if quantizable(name, m)]
    if not chosen and not any(isinstance(m, Fp8Linear) for m in denoiser.modules()):
        raise ModelError(f"model.dtype fp8: {type(denoiser).__name__} has no Linear layers under "
                         f"{', '.join(p.rstrip('.') for p in BLOCK_PREFIXES)}; use bf16")
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        try:
            layer = Fp8Linear.from_linear(module, work_device)
        except ValueError as e:
            raise ModelError(f"model.dtype fp8: cannot quantize {name}: {e}") from None
        setattr(denoiser.get_submodule(parent_name) if parent_name else denoiser, child, layer)
    return len(chosen)


def denoisers(family) -> list[nn.Module]:
    """The family's denoiser, or both experts of a two-expert family (Wan 2.2 A14B)."""
    experts = family.loaded.extra.get("experts")
    return list(experts.values()) if experts else [family.denoiser]


def check_device(device: torch.device | str) -> None:
    if not hasattr(torch, "get_autocast_dtype"):
        raise JobError("model.dtype", f"fp8 base weights need torch 2.4 or newer (this is {torch.__version__}); "
                                      "use bf16")
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise JobError("model.dtype", f"fp8 base weights need a CUDA GPU or the CPU; this run is on {kind}. "
                                      "Use bf16")


def quantize_family(family, device: torch.device | str) -> int:
    """Quantize every denoiser of a loaded `family` where it is (the layers are converted on `device`, which is
    faster on a GPU), then move its encoders (VAE, text and image encoders) to `device` for encoding. The
    denoiser(s) stay where they are until the loop moves the trained one (a bf16 14B model would not fit a
    24 GB GPU even for a moment). Returns the number of layers quantized."""
    check_device(device)
    work = device if torch.device(device).type == "cuda" else None
    count = sum(quantize_denoiser(d, work) for d in denoisers(family))
    loaded = family.loaded
    for module in [loaded.vae, *loaded.text_encoders, *loaded.extra.values()]:
        if isinstance(module, nn.Module) and all(module is not d for d in denoisers(family)):
            module.to(device)
    return count


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what it holds in memory)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

"""Lean LoRA layers with a per-module alpha that may change while training runs.

Why not PEFT: PEFT keeps its scaling as a per-adapter float set at construction and has no notion of module
groups whose alpha moves mid-run; the export also needs the exact alpha each module trained with at the end.
These layers are the PEFT tuner-layer idea cut down to what we need: a down and an up projection beside a
frozen base layer, output = base(x) + up(down(dropout(x))) * alpha / rank.

The base module is not replaced: its `forward` is patched (as kohya's networks do), so model code that reads
`attn.to_q.weight` or checks module types keeps working, and `remove()` restores the model exactly.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import nn

from .errors import JobError
from .families.base import TargetModule


_alpha_writes = 0  # LoRAModule.set_alpha calls so far (LoRANetwork.set_alphas skips its walk while unchanged)


def _f32(x: float) -> float:
    """Alphas are stored as float32 in exported files; train with exactly that value so export is exact."""
    return float(np.float32(x))


class LoRAModule(nn.Module):
    def __init__(self, name: str, base: nn.Module, group: str, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.name = name
        self.group = group
        self.rank = rank
        self._base = [base]  # a list, so the frozen base weights are not registered as our parameters
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, (nn.Conv2d, nn.Conv3d)):
            conv = type(base)
            self.down = conv(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                             bias=False)
            self.up = conv(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"{name}: cannot put a LoRA on {type(base).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)  # starts as the identity: the model's output is unchanged at step 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.has_dropout = dropout > 0
        self.set_alpha(alpha)
        self._orig_forward = None

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def set_alpha(self, alpha: float) -> None:
        global _alpha_writes
        self.alpha = _f32(alpha)
        self.scale = self.alpha / self.rank
        _alpha_writes += 1  # any direct write invalidates every network's "already applied" memo

    def apply_to(self) -> None:
        if self._orig_forward is None:
            self._orig_forward = self.base.forward
            self.base.forward = self.forward

    def remove(self) -> None:
        if self._orig_forward is not None:
            del self.base.forward  # drop the instance attribute: the class forward shows through again
            self._orig_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs for every wrapped layer on every step: the no-op dropout module call and no-op casts are
        # skipped (each costs microseconds, which add up to ~1% of a small model's step).
        out = self._orig_forward(x)
        down = self.down
        if x.dtype != down.weight.dtype:
            x = x.to(down.weight.dtype)
        if self.has_dropout:
            x = self.dropout(x)
        lx = self.up(down(x)) * self.scale
        return out + (lx if lx.dtype == out.dtype else lx.to(out.dtype))

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The weight delta this module adds to its base, in the base weight's shape (what ComfyUI computes)."""
        up = self.up.weight.flatten(1).double()
        down = self.down.weight.flatten(1).double()
        return (up @ down * self.scale).reshape(self.base.weight.shape)


def _sanitize(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


class LoRANetwork(nn.Module):
    """All LoRA modules of one denoiser, grouped into 'linear' and 'conv' for the alpha schedule."""

    def __init__(self, targets: list[TargetModule], *, linear_rank: int, linear_alpha: float, conv_rank: int,
                 conv_alpha: float, only_if_contains=(), ignore_if_contains=(), dropout: float = 0.0):
        super().__init__()
        ranks = {"linear": linear_rank, "conv": conv_rank}
        alphas = {"linear": linear_alpha, "conv": conv_alpha}
        chosen = []
        for t in targets:
            if ranks[t.group] <= 0:
                continue
            if only_if_contains and not any(s in t.name for s in only_if_contains):
                continue
            if any(s in t.name for s in ignore_if_contains):
                continue
            chosen.append(t)
        if not chosen:
            raise JobError("network.only_if_contains",
                           f"no module is left to train: {len(targets)} candidate modules, none matched the filters "
                           f"only_if_contains={list(only_if_contains)} ignore_if_contains={list(ignore_if_contains)}")
        self.lora = nn.ModuleDict()
        self.module_names: dict[str, str] = {}
        for t in chosen:
            key = _sanitize(t.name)
            self.lora[key] = LoRAModule(t.name, t.module, t.group, ranks[t.group], alphas[t.group], dropout)
            self.module_names[key] = t.name

    def apply_to(self) -> "LoRANetwork":
        for m in self.lora.values():
            m.apply_to()
        return self

    def remove(self) -> None:
        for m in self.lora.values():
            m.remove()

    def modules_in(self, group: str) -> list[LoRAModule]:
        return [m for m in self.lora.values() if m.group == group]

    def group_counts(self) -> dict[str, int]:
        return {g: len(self.modules_in(g)) for g in ("linear", "conv")}

    def set_alphas(self, alphas: dict[str, float]) -> None:
        # The loop calls this every step, but alphas change only at transitions and ramps: setting two
        # attributes on each of hundreds of modules every step cost ~0.2 ms, so unchanged modules are skipped,
        # and the walk itself (~80 us a step inside a training loop, with cold caches) is skipped when these
        # alphas were applied last and no module's alpha has been written since (by anyone).
        wanted = {group: _f32(alpha) for group, alpha in alphas.items()}
        if self.__dict__.get("_applied") == (wanted, _alpha_writes):
            return
        for m in self.lora.values():
            alpha = wanted.get(m.group)
            if alpha is not None and alpha != m.alpha:
                m.set_alpha(alpha)
        self.__dict__["_applied"] = (wanted, _alpha_writes)

    def alphas(self) -> dict[str, float | None]:
        # Each metrics record reads this: the first module of each group, found once (the set of modules is
        # fixed at construction), instead of a filtered walk over every module per call.
        heads = self.__dict__.get("_group_heads")
        if heads is None:
            heads = self.__dict__["_group_heads"] = {g: next(iter(self.modules_in(g)), None)
                                                     for g in ("linear", "conv")}
        return {g: m.alpha if m is not None else None for g, m in heads.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

"""Gradient sign agreement between consecutive optimizer steps, computed on the device.

    agreement = (number of LoRA gradient elements whose sign (g > 0) equals the sign they had at the
                 previous update of that parameter) / (number of elements compared)

It is element-weighted over all parameters (a 4096x16 matrix counts 65536 times as much as a bias of 1),
works with any optimizer (it reads ``.grad``, not optimizer internals), and never syncs with the host:
``update`` returns a 0-dim float32 tensor on the gradients' device that the training loop reads together
with the loss in one ``.tolist()`` per step.

Interpretation: for gradients of independent mini-batches with no common direction the expected value is
0.5 (chance), so values near 0.5 mean "noise-dominated", values well above mean the gradient keeps its
direction. A zero gradient element counts as "not positive".

A parameter without a gradient on some step (e.g. the inactive expert of a mixture) is skipped and keeps
its stored sign, so it is compared against its own last update rather than reported as disagreement.
"""

from __future__ import annotations

from typing import Iterable

import torch


class GradientSignAgreement:
    def __init__(self) -> None:
        self._prev: dict[int, torch.Tensor] = {}  # parameter position -> bool tensor of (grad > 0)

    def update(self, params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
        """Compare every parameter's gradient sign with its previous one and store the new signs.

        ``params`` must be the same parameters in the same order on every call (the LoRA parameter list).
        Returns None when nothing could be compared yet (first step).
        """
        disagreements = []
        compared = 0
        for i, p in enumerate(params):
            grad = p.grad
            if grad is None:
                continue
            positive = grad.detach() > 0
            prev = self._prev.get(i)
            if prev is not None:
                if prev.shape != positive.shape:
                    raise ValueError(
                        f"parameter {i} has shape {tuple(positive.shape)} but {tuple(prev.shape)} at the previous "
                        "update: pass the same parameters in the same order every step")
                if prev.device != positive.device:
                    prev = prev.to(positive.device)
                disagreements.append(torch.count_nonzero(prev ^ positive))
                compared += positive.numel()
            self._prev[i] = positive
        if compared == 0:
            return None
        total_disagree = disagreements[0] if len(disagreements) == 1 else torch.stack(disagreements).sum()
        # int64 count -> float64 division keeps exactness for huge LoRAs; float32 result for stacking with
        # the loss. MPS has no float64, so divide in float32 there.
        if total_disagree.device.type == "mps":
            return 1.0 - total_disagree.to(torch.float32) / compared
        return (1.0 - total_disagree.to(torch.float64) / compared).to(torch.float32)

    def reset(self) -> None:
        self._prev.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> bool tensor mapping (safetensors-compatible), on the CPU."""
        return {f"prev_sign.{i}": t.detach().to("cpu").contiguous() for i, t in sorted(self._prev.items())}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        prev = {}
        for key, t in sd.items():
            prefix, _, index = key.partition(".")
            if prefix != "prev_sign" or not index.isdigit():
                raise ValueError(f"unexpected key {key!r} in gradient sign agreement state")
            prev[int(index)] = t.to(torch.bool)
        self._prev = prev  # moved to the gradients' device lazily, at the next update

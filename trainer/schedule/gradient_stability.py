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
from torch._utils import _flatten_dense_tensors


class GradientSignAgreement:
    def __init__(self) -> None:
        self._prev: dict[int, torch.Tensor] = {}  # parameter position -> bool tensor of (grad > 0)
        # After an update where every parameter had a gradient, the signs are kept as one flat tensor (and
        # the shapes it splits into) instead: a LoRA has hundreds of small parameters, and three kernel
        # launches per parameter cost ~1 ms a step on a CPU, several percent of a small model's step.
        self._flat: torch.Tensor | None = None
        self._shapes: list | None = None
        self._undo = None

    def undo(self) -> None:
        """Forget the last update: a step skipped for a NaN/Inf gradient must not become the reference signs."""
        if self._undo is not None:
            self._prev, self._flat, self._shapes = self._undo
            self._undo = None

    def update(self, params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
        """Compare every parameter's gradient sign with its previous one and store the new signs.

        ``params`` must be the same parameters in the same order on every call (the LoRA parameter list).
        Returns None when nothing could be compared yet (first step).
        """
        self._undo = (dict(self._prev), self._flat, self._shapes)
        grads = [p.grad for p in params]
        if grads and all(g is not None for g in grads) and len({g.device for g in grads}) == 1:
            return self._update_flat(grads)
        self._unflatten()
        return self._update_each(grads)

    def _update_flat(self, grads: list) -> torch.Tensor | None:
        """All parameters have gradients on one device: a handful of kernels for the whole list."""
        shapes = [g.shape for g in grads]
        if self._flat is None:
            if set(self._prev) != set(range(len(grads))):
                # Some parameter has no stored sign yet (first step, or skipped until now): compare per parameter.
                return self._update_each(grads)
            self._flat = torch.cat([self._prev[i].reshape(-1) for i in range(len(grads))])
            self._shapes = [self._prev[i].shape for i in range(len(grads))]
            self._prev = {}
        if shapes != self._shapes:
            self._check_shapes(shapes, self._shapes)
        # flatten_dense_tensors: the concatenation done in C++ (what DDP uses to bucket gradients); half the
        # cost of torch.cat over Python-made views of hundreds of small tensors.
        positive = _flatten_dense_tensors(grads) > 0
        prev = self._flat if self._flat.device == positive.device else self._flat.to(positive.device)
        self._flat = positive
        return self._agreement(torch.count_nonzero(prev ^ positive), positive.numel())

    def _update_each(self, grads: list) -> torch.Tensor | None:
        disagreements = []
        compared = 0
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            positive = grad.detach() > 0
            prev = self._prev.get(i)
            if prev is not None:
                if prev.shape != positive.shape:
                    self._check_shapes([positive.shape], [prev.shape], first=i)
                if prev.device != positive.device:
                    prev = prev.to(positive.device)
                disagreements.append(torch.count_nonzero(prev ^ positive))
                compared += positive.numel()
            self._prev[i] = positive
        if compared == 0:
            return None
        total_disagree = disagreements[0] if len(disagreements) == 1 else torch.stack(disagreements).sum()
        return self._agreement(total_disagree, compared)

    @staticmethod
    def _agreement(total_disagree: torch.Tensor, compared: int) -> torch.Tensor:
        # int64 count -> float64 division keeps exactness for huge LoRAs; float32 result for stacking with
        # the loss. MPS has no float64, so divide in float32 there.
        if total_disagree.device.type == "mps":
            return 1.0 - total_disagree.to(torch.float32) / compared
        return (1.0 - total_disagree.to(torch.float64) / compared).to(torch.float32)

    @staticmethod
    def _check_shapes(shapes: list, previous: list, first: int = 0) -> None:
        for i, (now, before) in enumerate(zip(shapes, previous), start=first):
            if now != before:
                raise ValueError(
                    f"parameter {i} has shape {tuple(now)} but {tuple(before)} at the previous "
                    "update: pass the same parameters in the same order every step")
        raise ValueError(f"{len(shapes)} parameters were passed but {len(previous)} at the previous update: "
                         "pass the same parameters in the same order every step")

    def _unflatten(self) -> None:
        """Back to one stored sign tensor per parameter (views of the flat one)."""
        if self._flat is None:
            return
        offset = 0
        for i, shape in enumerate(self._shapes):
            n = shape.numel()
            self._prev[i] = self._flat[offset:offset + n].view(shape)
            offset += n
        self._flat = self._shapes = None

    def reset(self) -> None:
        self._prev.clear()
        self._flat = self._shapes = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> bool tensor mapping (safetensors-compatible), on the CPU."""
        self._unflatten()
        # copy=True: the stored signs may be views of one flat tensor, and safetensors refuses shared memory.
        return {f"prev_sign.{i}": t.detach().to("cpu", copy=True).contiguous() for i, t in sorted(self._prev.items())}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        prev = {}
        for key, t in sd.items():
            prefix, _, index = key.partition(".")
            if prefix != "prev_sign" or not index.isdigit():
                raise ValueError(f"unexpected key {key!r} in gradient sign agreement state")
            prev[int(index)] = t.to(torch.bool)
        self._prev = prev  # moved to the gradients' device lazily, at the next update
        self._flat = self._shapes = None

"""Training health signals, per block group of the LoRA: gradient norm, update-to-weight ratio, delta norm,
and counters of non-finite steps.

Cheap by construction: the per-group numbers are computed only on "health steps" (every ``every`` steps and
step 1), with every reduction kept on the device and one host transfer for all of them. The delta norm
``||s U D||_F`` of a module never forms the ``out x in`` product: ``||U D||_F^2 = sum((U^T U) * (D D^T))``,
two ``rank x rank`` matrices.

Definitions (group = ``block_group(module name)``, sums over the group's LoRA parameters):
- ``grad_norm[g]``     sqrt(sum ||grad||^2) before clipping (the loop's ``grad_norm`` is the total, also before
                       clipping, as torch's clip_grad_norm_ returns it).
- ``update_ratio[g]``  ||W_after - W_before|| / ||W_after|| over the optimizer step (None while W is 0);
                       around 1e-3 is the usual healthy order of magnitude for Adam.
- ``delta_norm[g]``    sqrt(sum ||alpha/rank * U @ D||_F^2): how far the LoRA has moved the base weights.
- ``nan_steps`` / ``inf_steps`` (every record): steps so far whose loss or gradient norm was NaN / +-Inf
  (such steps are skipped by the loop; a NaN takes precedence when both occur).
"""

from __future__ import annotations

import math
import re

import torch

DEFAULT_EVERY = 50  # health steps without a validation section (with one: every validation.every steps)
_NUMBERED = re.compile(r"^([^.]+)\.(\d+)(?:\.|$)")


def block_group(module_name: str) -> str:
    """``blocks.3.attn1.to_q`` -> ``blocks.3``; ``down_blocks.1.resnets.0.conv1`` -> ``down_blocks.1``;
    ``mid_block.attentions.0.proj_in`` -> ``mid_block``; ``patch_embedding`` -> ``patch_embedding``."""
    m = _NUMBERED.match(module_name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return module_name.split(".", 1)[0]


class HealthMonitor:
    def __init__(self, network, every: int = 50):
        if every < 1:
            raise ValueError(f"health interval must be >= 1, got {every}")
        self.every = int(every)
        self.groups: list[str] = []
        self._modules: dict[str, list] = {}
        for module in network.lora.values():
            g = block_group(module.name)
            if g not in self._modules:
                self.groups.append(g)
                self._modules[g] = []
            self._modules[g].append(module)
        self.nan_steps = 0
        self.inf_steps = 0
        self._grad_sq: torch.Tensor | None = None
        self._before: list | None = None

    def due(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    # -- counters ----------------------------------------------------------------------------------------
    def count(self, loss: float | None, grad_norm: float | None) -> bool:
        """Count a step's loss and total gradient norm; True when the step is non-finite."""
        values = [v for v in (loss, grad_norm) if v is not None]
        if any(math.isnan(v) for v in values):
            self.nan_steps += 1
            return True
        if any(math.isinf(v) for v in values):
            self.inf_steps += 1
            return True
        return False

    def counters(self) -> dict:
        return {"nan_steps": self.nan_steps, "inf_steps": self.inf_steps}

    # -- per-group measurements (health steps only) ------------------------------------------------------
    def _params(self, group: str) -> list[torch.Tensor]:
        return [p for m in self._modules[group] for p in (m.down.weight, m.up.weight)]

    @torch.no_grad()
    def before_clip(self) -> None:
        """Capture per-group gradient norms (call after backward, before clipping)."""
        sq = []
        for g in self.groups:
            grads = [p.grad for p in self._params(g) if p.grad is not None]
            sq.append(sum((gr.float().pow(2).sum() for gr in grads), torch.zeros((), device=_device(self, g)))
                      if grads else torch.full((), float("nan"), device=_device(self, g)))
        self._grad_sq = torch.stack([s.to(sq[0].device) for s in sq])

    @torch.no_grad()
    def before_step(self) -> None:
        """Keep the weights as they are before the optimizer step."""
        self._before = [[p.detach().clone() for p in self._params(g)] for g in self.groups]

    @torch.no_grad()
    def after_step(self) -> dict:
        """The per-group numbers of this health step: {grad_norm, update_ratio, delta_norm} each {group: value}."""
        dev = _device(self, self.groups[0])
        upd_sq, w_sq, delta_sq = [], [], []
        for i, g in enumerate(self.groups):
            params = self._params(g)
            before = self._before[i] if self._before is not None else None
            w_sq.append(sum((p.float().pow(2).sum() for p in params), torch.zeros((), device=dev)))
            if before is not None:
                upd_sq.append(sum(((p.float() - b.float()).pow(2).sum() for p, b in zip(params, before)),
                                  torch.zeros((), device=dev)))
            else:
                upd_sq.append(torch.full((), float("nan"), device=dev))
            delta_sq.append(sum((_delta_sq(m) for m in self._modules[g]), torch.zeros((), device=dev)))
        grad_sq = self._grad_sq if self._grad_sq is not None else torch.full((len(self.groups),), float("nan"))
        table = torch.stack([grad_sq.to(dev).float(), torch.stack(upd_sq), torch.stack(w_sq),
                             torch.stack(delta_sq).float()]).double().cpu().tolist()  # the one host transfer
        self._grad_sq, self._before = None, None
        grad, upd, w, delta = table
        out = {"grad_norm": {}, "update_ratio": {}, "delta_norm": {}}
        for i, g in enumerate(self.groups):
            out["grad_norm"][g] = _sqrt(grad[i])
            out["update_ratio"][g] = (_sqrt(upd[i]) / _sqrt(w[i])) if w[i] > 0 and math.isfinite(upd[i]) else None
            out["delta_norm"][g] = _sqrt(delta[i])
        tot_w, tot_u = sum(w), sum(upd)
        out["update_ratio_total"] = math.sqrt(tot_u / tot_w) if tot_w > 0 and math.isfinite(tot_u) else None
        out["delta_norm_total"] = _sqrt(sum(delta))
        return out

    # -- persistence -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"nan_steps": self.nan_steps, "inf_steps": self.inf_steps}

    def load_state_dict(self, sd: dict) -> None:
        self.nan_steps = int(sd.get("nan_steps", 0))
        self.inf_steps = int(sd.get("inf_steps", 0))


def _device(monitor: HealthMonitor, group: str) -> torch.device:
    return monitor._modules[group][0].up.weight.device


def _sqrt(v: float) -> float | None:
    return math.sqrt(v) if math.isfinite(v) and v >= 0 else None


def _delta_sq(module) -> torch.Tensor:
    """||scale * U @ D||_F^2 via rank x rank Gram matrices."""
    u = module.up.weight.flatten(1).float()    # [out, r]
    d = module.down.weight.flatten(1).float()  # [r, in * k]
    return (u.T @ u * (d @ d.T)).sum() * (module.scale ** 2)

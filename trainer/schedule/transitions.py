"""Output-preserving alpha transitions: change a LoRA's alpha without changing what the model computes.

A LoRA module adds ``s * U @ D @ x`` with ``s = alpha / rank``. Switching alpha from ``a`` to ``b`` at once
(a "jump") multiplies every scheduled module's contribution by ``k = b / a``: the model's output jumps.
"preserve" instead rewrites the state so that the function is the same and only the learning dynamics change.

Weights. Set ``U' = U / k``. Then ``(b / r) U' D = (a / r) U D``: the output is unchanged. ``D`` is untouched.

Optimizer moments (Adam/AdamW). In the new parametrisation the loss depends on ``U'`` through ``s_b U' D``,
so its gradient is ``dL/dU' = s_b (...) = k * dL/dU``: every gradient the optimizer has accumulated would have
been ``k`` times larger had the run used ``U'`` all along. The moments that make the optimizer state exactly
what it would be in that run are therefore

    exp_avg'    = k   * exp_avg        (a running mean of gradients)
    exp_avg_sq' = k^2 * exp_avg_sq     (a running mean of squared gradients; also max_exp_avg_sq for amsgrad)

The next Adam step ``lr * m'/sqrt(v')`` equals ``lr * m/sqrt(v)`` (up to eps): the same absolute change,
now applied to a weight ``k`` times smaller and multiplied by a scale ``k`` times larger, so its effect on the
output is ``k`` times what it was. That is the honest meaning of an alpha increase under an adaptive
optimizer: a learning-rate multiplier of ``k`` on the up-projection from the switch on, with no jump in the
output (a decrease, k < 1, is a smaller learning rate).
``D``'s gradient is ``s_b U'^T (...) = s_a U^T (...)``: unchanged, so its moments stay as they are.
AdamW's decoupled weight decay ``U' <- U'(1 - lr wd)`` is proportional, so it commutes with the rescale.

Supported optimizer states: torch.optim.Adam/AdamW (exp_avg, exp_avg_sq, max_exp_avg_sq) and bitsandbytes'
8-bit Adam (blockwise-quantised state1/state2: scaling the per-block absmax1/absmax2 by k and k^2 scales the
dequantised moments exactly, the 8-bit codes stay). Anything else raises before any tensor is changed.
"""

from __future__ import annotations

import torch

from trainer.errors import TrainerError
from trainer.lora import _f32

# state key -> the power of k its values scale with
_TORCH_ADAM = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
_BNB_BLOCKWISE = {"absmax1": 1, "absmax2": 2}
_BNB_FULL = {"state1": 1, "state2": 2}
_PASSIVE = {"step", "qmap1", "qmap2", "state1", "state2", "unorm_vec", "max1", "max2", "new_max1", "new_max2",
            "gnorm_vec"}


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _scalings(state: dict, where: str) -> dict:
    """Which state tensors to multiply by k**power, for one parameter's optimizer state."""
    if not state:
        return {}
    if "exp_avg" in state:
        plan = {key: p for key, p in _TORCH_ADAM.items() if key in state}
    elif "absmax1" in state:
        plan = {key: p for key, p in _BNB_BLOCKWISE.items() if key in state}
    elif "state1" in state and torch.is_floating_point(state["state1"]):
        plan = {key: p for key, p in _BNB_FULL.items() if key in state}
    else:
        plan = None
    unknown = set(state) - set(plan or {}) - _PASSIVE - set(_TORCH_ADAM)
    if plan is None or unknown:
        raise TrainerError(f"transition 'preserve': the optimizer state of {where} has keys {sorted(state)}, "
                           "which this trainer does not know how to rescale (it supports Adam/AdamW and 8-bit "
                           "AdamW); use transition: jump or ramp with this optimizer")
    return plan


@torch.no_grad()
def preserve_output(network, optimizer, new_alphas: dict) -> dict:
    """Switch ``network`` to ``new_alphas`` (group -> alpha) keeping its output unchanged.

    Every module whose alpha changes gets its up-projection multiplied by old/new and the optimizer moments
    of that up-projection multiplied by k = new/old (first) and k^2 (second). Modules of groups not named,
    or whose alpha does not change, are left alone. ``optimizer`` may be None (no moments yet to keep).
    Returns {group: k} for the groups that changed. Call between optimizer steps (no pending gradients).
    """
    opt = _unwrap(optimizer) if optimizer is not None else None
    plans = []
    factors: dict[str, float] = {}
    for module in network.lora.values():
        if module.group not in new_alphas:
            continue
        old = module.alpha
        module_new = _f32(new_alphas[module.group])  # exactly what set_alpha will store
        if module_new == old:
            continue
        if not old > 0 or not module_new > 0:
            raise TrainerError(f"transition 'preserve' needs alphas > 0; {module.name} goes {old} -> {module_new}")
        k = module_new / old
        factors[module.group] = k
        weight = module.up.weight
        state = opt.state.get(weight, {}) if opt is not None else {}
        plans.append((module, old, module_new, k, state, _scalings(state, module.name)))  # check all first
    for module, old, module_new, k, state, plan in plans:
        module.up.weight.mul_(old / module_new)
        for key, power in plan.items():
            state[key].mul_(k ** power)
        module.set_alpha(module_new)
    return factors


"""Health signals: per block group gradient norm, update-to-weight ratio and LoRA delta norm, checked against
direct computations on a real LoRANetwork; non-finite step counters."""

import math

import pytest
import torch
from torch import nn

from trainer.families.base import TargetModule, module_group
from trainer.health import HealthMonitor, block_group
from trainer.lora import LoRANetwork


@pytest.mark.parametrize("name, group", [
    ("blocks.3.attn1.to_q", "blocks.3"),
    ("blocks.12.ffn.net.0.proj", "blocks.12"),
    ("down_blocks.1.resnets.0.conv1", "down_blocks.1"),
    ("up_blocks.0.attentions.2.proj_in", "up_blocks.0"),
    ("mid_block.attentions.0.proj_in", "mid_block"),
    ("patch_embedding", "patch_embedding"),
    ("conv_in", "conv_in"),
])
def test_block_group(name, group):
    assert block_group(name) == group


class Toy(nn.Module):
    """Two 'blocks' with a linear and a conv each, and a stem conv: names like a diffusers model's."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            b = nn.Module()
            b.conv = nn.Conv2d(8, 8, 3, padding=1)
            b.proj = nn.Linear(8, 8)
            self.blocks.append(b)

    def forward(self, x):
        h = self.conv_in(x)
        for b in self.blocks:
            h = b.conv(h)
            h = b.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return h


def toy_network(seed=0):
    torch.manual_seed(seed)
    model = Toy().requires_grad_(False)
    targets = [TargetModule(n, m, module_group(m)) for n, m in model.named_modules() if module_group(m)]
    net = LoRANetwork(targets, linear_rank=2, linear_alpha=3, conv_rank=2, conv_alpha=5).apply_to()
    for m in net.lora.values():  # a LoRA that has trained a while: non-zero up-projections
        nn.init.normal_(m.up.weight, std=0.1)
    return model, net


def manual(net, fn):
    out = {}
    for m in net.lora.values():
        out.setdefault(block_group(m.name), []).append(fn(m))
    return out


def test_per_group_numbers_match_direct_computation():
    model, net = toy_network()
    mon = HealthMonitor(net, every=10)
    assert mon.groups == ["conv_in", "blocks.0", "blocks.1"]
    params = net.trainable_parameters()
    opt = torch.optim.SGD(params, lr=0.05)
    x = torch.randn(2, 3, 6, 6)
    model(x).square().mean().backward()

    grads = manual(net, lambda m: m.up.weight.grad.square().sum() + m.down.weight.grad.square().sum())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    mon.before_clip()
    torch.nn.utils.clip_grad_norm_(params, 1e-3)  # clipping must not change the reported (pre-clip) norms
    mon.before_step()
    opt.step()
    h = mon.after_step()

    for g, parts in grads.items():
        assert h["grad_norm"][g] == pytest.approx(math.sqrt(sum(parts)), rel=1e-5)
    upd = {}
    wsq = {}
    for n, p in net.named_parameters():
        p = p.detach()
        g = block_group(net.module_names[n.split(".")[1]])
        upd[g] = upd.get(g, 0.0) + float((p - before[n]).square().sum())
        wsq[g] = wsq.get(g, 0.0) + float(p.square().sum())
    for g in mon.groups:
        assert h["update_ratio"][g] == pytest.approx(math.sqrt(upd[g] / wsq[g]), rel=1e-5)
    assert h["update_ratio_total"] == pytest.approx(math.sqrt(sum(upd.values()) / sum(wsq.values())), rel=1e-5)
    deltas = manual(net, lambda m: float(m.delta_weight().square().sum()))  # the full out x in product
    for g, parts in deltas.items():
        assert h["delta_norm"][g] == pytest.approx(math.sqrt(sum(parts)), rel=1e-5)
    assert h["delta_norm_total"] == pytest.approx(math.sqrt(sum(sum(p) for p in deltas.values())), rel=1e-5)


def test_fresh_lora_has_zero_delta_and_no_ratio():
    _, net = toy_network()
    for m in net.lora.values():
        nn.init.zeros_(m.up.weight)
        nn.init.zeros_(m.down.weight)
    h = HealthMonitor(net).after_step()
    assert set(h["delta_norm"].values()) == {0.0}
    assert set(h["update_ratio"].values()) == {None} and h["update_ratio_total"] is None
    assert all(v is None for v in h["grad_norm"].values())  # no gradients were captured


def test_due_on_first_step_and_every_n():
    _, net = toy_network()
    mon = HealthMonitor(net, every=25)
    assert [s for s in range(1, 101) if mon.due(s)] == [1, 25, 50, 75, 100]


def test_nonfinite_counters():
    _, net = toy_network()
    mon = HealthMonitor(net)
    assert mon.count(0.1, 1.0) is False
    assert mon.count(float("nan"), 1.0) is True
    assert mon.count(0.1, float("inf")) is True
    assert mon.count(float("-inf"), float("nan")) is True  # NaN takes precedence
    assert mon.counters() == {"nan_steps": 2, "inf_steps": 1}
    other = HealthMonitor(net)
    other.load_state_dict(mon.state_dict())
    assert other.counters() == mon.counters()

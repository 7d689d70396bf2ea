"""LoRA layers: identity at init, exact delta, alpha changes mid-run, clean removal, export equals training."""

import pytest
import torch
from torch import nn

from trainer.errors import JobError
from trainer.export import comfy_state_dict, delta_from_file, save_lora
from trainer.families.base import TargetModule, module_group
from trainer.lora import LoRANetwork


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 12)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.pw = nn.Conv2d(6, 6, 1)
        self.vid = nn.Conv3d(4, 5, (1, 2, 2), stride=(1, 2, 2))


def targets(m):
    return [TargetModule(n, mod, module_group(mod)) for n, mod in m.named_modules() if module_group(mod)]


class ToyFamily:
    name = "toy"

    @classmethod
    def export_prefix(cls, name):
        return "lora_unet_" + name.replace(".", "_")

    def describe(self):
        return {"family": "toy"}


def make(alpha_lin=4.0, alpha_conv=8.0, **kw):
    torch.manual_seed(0)
    m = Toy()
    net = LoRANetwork(targets(m), linear_rank=2, linear_alpha=alpha_lin, conv_rank=3, conv_alpha=alpha_conv, **kw)
    for p in net.parameters():  # give the up projections non-zero values, as after some training
        nn.init.normal_(p, std=0.1)
    return m, net


def test_groups_follow_kohya_convention():
    m = Toy()
    assert module_group(m.proj) == "linear"
    assert module_group(m.pw) == "linear"  # 1x1 conv takes the linear rank
    assert module_group(m.conv) == "conv"
    assert module_group(m.vid) == "conv"
    net = LoRANetwork(targets(m), linear_rank=2, linear_alpha=2, conv_rank=3, conv_alpha=3)
    assert net.group_counts() == {"linear": 2, "conv": 2}
    assert net.lora["pw"].down.weight.shape == (2, 6, 1, 1)
    net0 = LoRANetwork(targets(m), linear_rank=2, linear_alpha=2, conv_rank=0, conv_alpha=0)
    assert net0.group_counts() == {"linear": 2, "conv": 0}


def test_starts_as_identity_and_removal_restores():
    torch.manual_seed(0)
    m = Toy()
    x = torch.randn(2, 8)
    base = m.proj(x)
    net = LoRANetwork(targets(m), linear_rank=2, linear_alpha=4, conv_rank=3, conv_alpha=3).apply_to()
    assert torch.equal(m.proj(x), base)  # up is zero-initialised
    nn.init.normal_(net.lora["proj"].up.weight)
    assert not torch.allclose(m.proj(x), base)
    net.remove()
    assert torch.equal(m.proj(x), base)
    assert "forward" not in vars(m.proj)


@pytest.mark.parametrize("name, shape", [("proj", (3, 8)), ("conv", (2, 4, 9, 9)), ("pw", (2, 6, 5, 5)),
                                         ("vid", (2, 4, 1, 6, 6))])
def test_forward_equals_base_plus_delta_weight(name, shape):
    m, net = make()
    net.apply_to()
    mod = getattr(m, name)
    x = torch.randn(*shape)
    lora = net.lora[name]
    with torch.no_grad():
        got = mod(x)
        w = mod.weight + lora.delta_weight().to(mod.weight.dtype)
        if isinstance(mod, nn.Linear):
            want = nn.functional.linear(x, w, mod.bias)
        else:
            conv = nn.functional.conv2d if isinstance(mod, nn.Conv2d) else nn.functional.conv3d
            want = conv(x, w, mod.bias, mod.stride, mod.padding, mod.dilation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_alpha_changes_scale_per_group():
    m, net = make()
    net.apply_to()
    x = torch.randn(2, 8)
    with torch.no_grad():
        lora_out = m.proj(x) - nn.functional.linear(x, m.proj.weight, m.proj.bias)
        net.set_alphas({"linear": 8.0})
        doubled = m.proj(x) - nn.functional.linear(x, m.proj.weight, m.proj.bias)
    torch.testing.assert_close(doubled, 2 * lora_out)
    assert net.alphas() == {"linear": 8.0, "conv": 8.0}
    net.set_alphas({"conv": 14.0})
    assert net.lora["conv"].scale == 14.0 / 3 and net.lora["proj"].scale == 8.0 / 2


def test_filters_and_empty_selection():
    m = Toy()
    net = LoRANetwork(targets(m), linear_rank=2, linear_alpha=2, conv_rank=3, conv_alpha=3, only_if_contains=["conv"])
    assert set(net.module_names.values()) == {"conv"}
    net = LoRANetwork(targets(m), linear_rank=2, linear_alpha=2, conv_rank=3, conv_alpha=3, ignore_if_contains=["p"])
    assert set(net.module_names.values()) == {"conv", "vid"}
    with pytest.raises(JobError, match="no module is left"):
        LoRANetwork(targets(m), linear_rank=2, linear_alpha=2, conv_rank=3, conv_alpha=3, only_if_contains=["zzz"])


def test_export_reproduces_training_delta_with_odd_alpha(tmp_path):
    m, net = make()
    net.set_alphas({"linear": 10.123456789, "conv": 17.3})  # a ramped, non-round alpha
    path = save_lora(tmp_path / "x.safetensors", net, ToyFamily(), {"k": "v"})
    deltas = delta_from_file(path)
    assert set(deltas) == {"lora_unet_proj", "lora_unet_conv", "lora_unet_pw", "lora_unet_vid"}
    for key, lora in net.lora.items():
        got = deltas["lora_unet_" + key].reshape(lora.base.weight.shape)
        # bit-for-bit the same float64 computation: the alpha trained with is exactly the stored float32 alpha
        assert torch.equal(got, lora.delta_weight()), key
    sd = comfy_state_dict(net, ToyFamily)
    assert sd["lora_unet_conv.alpha"].dtype == torch.float32
    assert sd["lora_unet_conv.lora_down.weight"].shape == (3, 4, 3, 3)
    assert sd["lora_unet_conv.lora_up.weight"].shape == (6, 3, 1, 1)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind

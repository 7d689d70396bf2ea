"""Alpha transitions on a tiny SD 1.5 UNet with a real LoRA: 'preserve' keeps the output and makes the optimizer
state consistent; 'ramp' changes the output in small steps; 'jump' changes it at once."""

import copy

import pytest
import torch

from fixtures_models import tiny_sd15_path  # noqa: F401
from trainer.errors import TrainerError
from trainer.families import get_family
from trainer.lora import LoRANetwork
from trainer.schedule.phases_config import ExitCriteria, Phase, ScheduleConfig
from trainer.schedule.scheduler import AlphaScheduler
from trainer.schedule.transitions import preserve_output

OLD = {"linear": 4.0, "conv": 8.0}
NEW = {"linear": 2.0, "conv": 16.0}


def lora_unet(path):
    fam = get_family("sd15").load(str(path), dtype=torch.float32)
    unet = fam.denoiser.requires_grad_(False)
    torch.manual_seed(0)
    net = LoRANetwork(fam.target_modules(4, 4), linear_rank=4, linear_alpha=OLD["linear"], conv_rank=4,
                      conv_alpha=OLD["conv"]).apply_to()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 700]), torch.randn(2, 6, 32, generator=g),
             torch.randn(2, 4, 8, 8, generator=g))
    return unet, net, batch


def forward(unet, batch):
    x, t, ehs, _ = batch
    return unet(x, t, encoder_hidden_states=ehs).sample


def train_steps(unet, net, opt, batch, n):
    for _ in range(n):
        (forward(unet, batch) - batch[3]).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_preserve_keeps_the_output_and_a_jump_does_not(tiny_sd15_path):
    unet, net, batch = lora_unet(tiny_sd15_path)
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2)
    train_steps(unet, net, opt, batch, 3)  # non-zero up-projections and optimizer moments
    with torch.no_grad():
        before = forward(unet, batch)
        net.set_alphas(NEW)
        jumped = forward(unet, batch)
        net.set_alphas(OLD)
        assert torch.equal(forward(unet, batch), before)

        factors = preserve_output(net, opt, NEW)
        after = forward(unet, batch)
    assert factors == {"linear": 0.5, "conv": 2.0}
    assert net.alphas() == {"linear": 2.0, "conv": 16.0}
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-5 * scale
    assert (jumped - before).abs().max() > 1e-2 * scale  # the test would see a jump


def test_preserve_rescales_moments_so_the_next_adam_step_is_consistent(tiny_sd15_path):
    """With m' = k m and v' = k^2 v, the next AdamW step moves U' by what U would have moved without any
    transition (Adam's step is invariant to the gradient scale k), and D exactly as before: the state is the
    one a run parametrised with the new alpha all along would have. Unscaled moments would not do this."""
    unet, net, batch = lora_unet(tiny_sd15_path)
    params = net.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    train_steps(unet, net, opt, batch, 3)
    start_w, start_opt = weights(net), copy.deepcopy(opt.state_dict())

    def step_delta(transition):
        net.load_state_dict(start_w)
        net.set_alphas(OLD)
        opt.load_state_dict(copy.deepcopy(start_opt))
        transition()
        w0 = weights(net)
        train_steps(unet, net, opt, batch, 1)
        return {k: net.state_dict()[k] - w0[k] for k in w0}

    def naive():  # rescale the weights only, keep the moments
        for m in net.lora.values():
            m.up.weight.data.mul_(m.alpha / NEW[m.group])
        net.set_alphas(NEW)

    reference = step_delta(lambda: None)  # no transition at all
    preserved = step_delta(lambda: preserve_output(net, opt, NEW))
    unscaled = step_delta(naive)
    ups = [k for k in reference if k.endswith("up.weight")]
    downs = [k for k in reference if k.endswith("down.weight")]
    def rel(a, k):  # relative Frobenius distance to the reference step (float32 forward/backward noise ~1e-5)
        return float((a[k] - reference[k]).norm() / reference[k].norm())

    assert max(rel(preserved, k) for k in ups) < 1e-3
    assert max(rel(preserved, k) for k in downs) < 1e-3
    assert max(rel(unscaled, k) for k in ups) > 0.1


def test_unknown_optimizer_state_is_refused_before_anything_changes(tiny_sd15_path):
    unet, net, batch = lora_unet(tiny_sd15_path)
    opt = torch.optim.SGD(net.trainable_parameters(), lr=1e-2, momentum=0.9)
    train_steps(unet, net, opt, batch, 2)
    w = weights(net)
    with pytest.raises(TrainerError, match="momentum_buffer"):
        preserve_output(net, opt, NEW)
    assert all(torch.equal(v, w[k]) for k, v in net.state_dict().items())
    assert net.alphas() == OLD


def test_preserve_without_optimizer_state_and_unchanged_groups(tiny_sd15_path):
    unet, net, batch = lora_unet(tiny_sd15_path)
    for m in net.lora.values():
        torch.nn.init.normal_(m.up.weight, std=0.05)
    w = weights(net)
    with torch.no_grad():
        before = forward(unet, batch)
        assert preserve_output(net, None, {"conv": 8.0}) == {}  # nothing changes: nothing touched
        assert all(torch.equal(v, w[k]) for k, v in net.state_dict().items())
        assert preserve_output(net, None, {"conv": 20.0}) == {"conv": 2.5}
        assert (forward(unet, batch) - before).abs().max() <= 1e-5 * before.abs().max()
    conv_up = [k for k in w if k.endswith("up.weight") and net.lora[k.split(".")[1]].group == "conv"]
    lin_up = [k for k in w if k.endswith("up.weight") and net.lora[k.split(".")[1]].group == "linear"]
    assert conv_up and lin_up
    assert all(torch.allclose(net.state_dict()[k], w[k] / 2.5) for k in conv_up)
    assert all(torch.equal(net.state_dict()[k], w[k]) for k in lin_up)


def flat(k):
    return 0.1 + (0.005 if k % 2 else -0.005)


def outputs_across_transition(unet, net, batch, ramp_steps, transition=None):
    """Frozen LoRA weights; the scheduler's alphas applied step by step through one transition."""
    exit_ = ExitCriteria(0.001, 0.5, 0.1)
    phases = (Phase("a", {"conv": 8.0, "linear": 4.0}, 150, exit_), Phase("b", {"conv": 16.0, "linear": 2.0}, 150))
    sched = AlphaScheduler(ScheduleConfig(phases=phases, ramp_steps=ramp_steps, transition=transition), {})
    outs = []
    with torch.no_grad():
        for step in range(1, 150 + ramp_steps + 3):
            net.set_alphas(sched.alphas())
            if step >= 148:
                outs.append(forward(unet, batch))
            sched.update(step, flat(step), 0.7)
    return outs


def test_ramp_is_continuous_and_jump_is_not(tiny_sd15_path):
    unet, net, batch = lora_unet(tiny_sd15_path)
    for m in net.lora.values():
        torch.nn.init.normal_(m.up.weight, std=0.05)
    with torch.no_grad():
        net.set_alphas(OLD)
        y_old = forward(unet, batch)
        net.set_alphas(NEW)
        y_new = forward(unet, batch)
    full = float((y_new - y_old).abs().max())
    assert full > 1e-3

    ramp = 8
    outs = outputs_across_transition(unet, net, batch, ramp)
    steps = [float((b - a).abs().max()) for a, b in zip(outs, outs[1:])]
    assert torch.equal(outs[0], y_old) and torch.allclose(outs[-1], y_new, rtol=1e-5, atol=1e-6)
    assert max(steps) < 1.5 * full / ramp  # no step moves the output by much more than 1/ramp of the change
    assert sum(steps) >= 0.99 * full       # and together they cover it

    jumped = outputs_across_transition(unet, net, batch, 0)
    jsteps = [float((b - a).abs().max()) for a, b in zip(jumped, jumped[1:])]
    assert max(jsteps) == pytest.approx(full, rel=1e-6)
    # "preserve" jumps the scheduled alphas too (the loop rescales the weights): it never ramps
    preserved = outputs_across_transition(unet, net, batch, 0, transition="preserve")
    assert all(torch.equal(a, b) for a, b in zip(jumped, preserved))

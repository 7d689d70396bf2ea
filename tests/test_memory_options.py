"""Memory options, tested as far as a CPU allows: gradient checkpointing, bf16 / fp16 weights, 8-bit AdamW's
missing-package error, and the encoders released once their outputs are cached.

(8-bit AdamW itself needs bitsandbytes and a CUDA GPU, and keeping Wan 2.2's inactive expert off the GPU needs
a GPU and a Wan 2.2 family: neither can run here.)
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from fixtures_models import tiny_sd15_path, tiny_wan21_path  # noqa: F401
from trainer.data.training_set import TrainingSet
from trainer.demo import make_images
from trainer.errors import TrainerError
from trainer.families import get_family
from trainer.job import parse_job
from trainer.loop import Callbacks, train
from trainer.lora import LoRANetwork


def _lora_gradients(family, checkpointing: bool) -> tuple[float, list[torch.Tensor]]:
    """Loss and LoRA gradients of one forward/backward on fixed inputs, with every LoRA weight non-zero (so
    that the gradients of both projections depend on the recomputed activations)."""
    network = LoRANetwork(family.target_modules(4, 4), linear_rank=4, linear_alpha=4, conv_rank=4, conv_alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    network.apply_to()
    denoiser = family.denoiser
    denoiser.train()
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()
    try:
        shape = (2, 4, 8, 8) if family.name == "sd15" else (1, 16, 3, 8, 8)
        latents = torch.randn(shape, generator=generator)
        cond = family.encode_prompts(["a red square"] * shape[0])
        cond = {"encoder_hidden_states": torch.stack([c["encoder_hidden_states"] for c in cond])}
        noisy = family.add_noise(latents, torch.randn(shape, generator=generator),
                                 torch.rand(shape[0], generator=generator))
        loss = F.mse_loss(family.predict(noisy, cond), noisy.target.float())
        loss.backward()
        return loss.item(), [p.grad.clone() for p in network.trainable_parameters()]
    finally:
        network.remove()
        denoiser.disable_gradient_checkpointing()


@pytest.mark.parametrize("family_name", ["sd15", "wan21"])
def test_gradient_checkpointing_gives_identical_gradients(family_name, tiny_sd15_path, tiny_wan21_path):
    path = tiny_sd15_path if family_name == "sd15" else tiny_wan21_path
    family = get_family(family_name).load(str(path), dtype=torch.float32)
    loss_plain, plain = _lora_gradients(family, checkpointing=False)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in family.denoiser.modules())
    loss_ckpt, ckpt = _lora_gradients(family, checkpointing=True)
    assert loss_ckpt == loss_plain
    assert len(plain) == len(ckpt) > 0
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)  # recomputation on the CPU is deterministic: bit-identical


def _sd15_job(model, data, out, **train_opts):
    return parse_job({
        "job": "mem", "output_dir": str(out),
        "model": {"family": "sd15", "path": str(model), "dtype": train_opts.pop("dtype", "fp32")},
        "datasets": [{"folder_path": str(data), "resolution": [32]}],
        "network": {"linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 4},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "seed": 5, **train_opts},
        "save": {"every": 4, "resume": "none"},
    })


class _Watch(Callbacks):
    """Records, at each step, whether the denoiser is checkpointing and the losses; silent."""

    def __init__(self, family=None):
        self.family, self.checkpointing, self.losses = family, [], []

    def log(self, message: str) -> None:
        pass

    def on_step(self, record: dict) -> None:
        self.losses.append(record["loss"])
        if self.family is not None:
            self.checkpointing.append(any(getattr(m, "gradient_checkpointing", False)
                                          for m in self.family.denoiser.modules()))


def test_gradient_checkpointing_job_option_trains_the_same_run(tiny_sd15_path, tmp_path):
    data = tmp_path / "images"
    make_images(data)
    runs = {}
    for flag in (False, True):
        job = _sd15_job(tiny_sd15_path, data, tmp_path / f"out_{flag}", gradient_checkpointing=flag)
        family = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
        training_set = TrainingSet.build(job.datasets, family,
                                         seed=0, log=lambda m: None)
        watch = _Watch(family)
        result = train(job, watch, family=family, training_set=training_set)
        runs[flag] = (watch, result)
    assert runs[True][0].checkpointing == [True] * 4
    assert runs[False][0].checkpointing == [False] * 4
    assert runs[True][0].losses == runs[False][0].losses
    state_plain, state_ckpt = runs[False][1].lora_state, runs[True][1].lora_state
    assert state_plain.keys() == state_ckpt.keys()
    assert all(torch.equal(state_plain[k], state_ckpt[k]) for k in state_plain)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_weights_train(dtype, torch_dtype, tiny_sd15_path, tmp_path):
    """model.dtype bf16 / fp16: the frozen UNet is loaded in that dtype, the LoRA trains in float32, losses are
    finite and the LoRA moves."""
    data = tmp_path / "images"
    make_images(data)
    job = _sd15_job(tiny_sd15_path, data, tmp_path / "out", dtype=dtype)
    family = get_family("sd15").load(str(tiny_sd15_path), dtype=torch_dtype)
    assert {p.dtype for p in family.denoiser.parameters()} == {torch_dtype}
    training_set = TrainingSet.build(job.datasets, family,
                                     seed=0, log=lambda m: None)
    watch = _Watch()
    result = train(job, watch, family=family, training_set=training_set)
    assert len(watch.losses) == 4 and all(loss is not None and loss == loss for loss in watch.losses)
    ups = [v for k, v in result.lora_state.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.dtype == torch.float32 for v in ups)
    assert any(v.abs().sum() > 0 for v in ups)  # lora_up starts at zero: it moved
    assert {p.dtype for p in family.denoiser.parameters()} == {torch_dtype}  # the base stayed frozen in its dtype


def test_adamw8bit_without_bitsandbytes_is_a_clear_error(tiny_sd15_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError, installed or not
    data = tmp_path / "images"
    make_images(data)
    job = _sd15_job(tiny_sd15_path, data, tmp_path / "out", optimizer="adamw8bit")
    watch = _Watch()
    with pytest.raises(TrainerError) as info:
        train(job, watch)
    message = str(info.value)
    assert "train.optimizer" in message and "bitsandbytes" in message and "adamw" in message
    assert watch.losses == []  # no step was taken


def test_encoders_are_released_once_cached(tiny_sd15_path, tmp_path):
    """After caching, train() drops the VAE and text encoder, and nothing else keeps them alive."""
    data = tmp_path / "images"
    make_images(data)
    job = _sd15_job(tiny_sd15_path, data, tmp_path / "out")
    family = get_family("sd15").load(str(tiny_sd15_path), dtype=torch.float32)
    vae = weakref.ref(family.loaded.vae)
    text_encoder = weakref.ref(family.loaded.text_encoders[0])
    training_set = TrainingSet.build(job.datasets, family,
                                     seed=0, log=lambda m: None)
    alive_at_first_step = []

    class Probe(_Watch):
        def on_step(self, record):
            if not alive_at_first_step:
                gc.collect()
                alive_at_first_step.append((vae() is not None, text_encoder() is not None))

    train(job, Probe(), family=family, training_set=training_set)
    assert alive_at_first_step == [(False, False)]
    assert family.loaded.vae is None and family.loaded.text_encoders == []

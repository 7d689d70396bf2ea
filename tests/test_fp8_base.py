"""model.dtype fp8: the denoiser's block Linears stored as float8_e4m3fn, dequantized per layer in forward.

The layer is checked against F.linear with its dequantized weight (forward and input gradient, bit for bit, no
weight gradient); training a tiny Wan 2.1 and SD 1.5 with fp8 is compared with bf16 (same LoRA keys, a close
loss curve); the two-expert family keeps fp8 weights across expert switches; the memory saving is measured
(stored bytes, and that backward does not keep dequantized weights alive).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fixtures_models import tiny_flux_path, tiny_sd15_path, tiny_sdxl_path, tiny_wan21_path, tiny_wan22_14b_path  # noqa: F401,E501
from tests.media import textured_frames, write_caption, write_image, write_video
from trainer.bench import peak_tensor_bytes
from trainer.errors import JobError
from trainer.families import get_family
from trainer.families.base import module_group
from trainer.fp8_base import (FP8, Fp8Linear, check_device, dequantize, quantize_denoiser, quantize_family,
                              quantize_tensor, stored_bytes)
from trainer.job import parse_job
from trainer.loop import train
from trainer.lora import LoRANetwork


def _linear(out_features=48, in_features=32, bias=True, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(7.0)  # well past 1: the scale must matter
    return layer.to(dtype).requires_grad_(False)


# ---- the layer ----


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_gradient_equal_the_dequantized_linear(bias):
    base = _linear(bias=bias)
    layer = Fp8Linear.from_linear(base)
    assert isinstance(layer, nn.Linear) and module_group(layer) == "linear"
    assert layer.weight.dtype == FP8 and not layer.weight.requires_grad and layer.scale.dtype == torch.float32
    w = dequantize(layer.weight, layer.scale, torch.bfloat16)

    x = torch.randn(3, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = layer(x)
    ref = F.linear(x_ref, w, base.bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert layer.weight.grad is None
    if bias:
        assert layer.bias is base.bias  # the bias stays as it was (bf16), shared, not copied


def test_fp32_input_gets_its_gradient_in_fp32_and_autocast_picks_the_compute_dtype():
    layer = Fp8Linear.from_linear(_linear())
    x = torch.randn(4, 32, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.float16):
        assert layer(x.detach()).dtype == torch.float16


def test_quantization_error_is_small_relative_to_the_weight():
    torch.manual_seed(1)
    for scale in (1e-3, 1.0, 300.0):
        w = torch.randn(256, 128) * scale
        q, s = quantize_tensor(w)
        back = dequantize(q, s, torch.float32)
        # e4m3 keeps 3 mantissa bits: rounding is within 2^-4 relative for normal values; overall relative error
        # (Frobenius) of a Gaussian matrix lands near 2.5%
        rel = float((back - w).norm() / w.norm())
        assert rel < 0.04, rel
        assert float((back - w).abs().max()) <= float(w.abs().max()) * 2 ** -4 + 1e-12
        assert float(back.abs().max()) == pytest.approx(float(w.abs().max()), rel=2 ** -4)
    assert torch.equal(dequantize(*quantize_tensor(torch.zeros(4, 4)), torch.float32), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_tensor(torch.tensor([[1.0, float("inf")]]))


def test_backward_keeps_no_dequantized_weight_alive():
    """Peak live tensor bytes of one forward + backward through a stack of wide layers: a bf16 Linear needs only
    its activations, and so must the fp8 one (the weights are dequantized one layer at a time, in forward and
    again in backward); saving the dequantized weights would add all of them (8 MiB here) to the peak."""
    torch.manual_seed(0)
    bf16 = nn.Sequential(*[_linear(512, 512, seed=i) for i in range(16)])
    fp8 = nn.Sequential(*[Fp8Linear.from_linear(m) for m in bf16])
    weights = sum(m.weight.numel() * 2 for m in bf16)
    x = torch.randn(4, 512, dtype=torch.bfloat16)

    def step(model):
        def run():
            inp = x.clone().requires_grad_(True)
            model(inp).float().sum().backward()
        return run

    peak_fp8, _ = peak_tensor_bytes(step(fp8))
    peak_bf16, _ = peak_tensor_bytes(step(bf16))
    one_weight = 512 * 512 * 2
    print(f"peak live bytes fp8 {peak_fp8}, bf16 {peak_bf16}, all bf16 weights {weights}")
    # at most one layer's dequantized weight at a time (measured: exactly one more), never all of them
    assert peak_fp8 <= peak_bf16 + 2 * one_weight < weights / 4


# ---- the denoiser ----


def test_block_linears_are_quantized_and_the_lora_finds_and_wraps_them(tiny_wan21_path):
    family = get_family("wan21").load(str(tiny_wan21_path), dtype=torch.bfloat16)
    d = family.denoiser
    before = stored_bytes(d)
    with torch.no_grad():
        ref = {n: m.weight.float().clone() for n, m in d.named_modules() if type(m) is nn.Linear}
    count = quantize_family(family, "cpu")
    after = stored_bytes(d)
    print(f"tiny Wan 2.1 denoiser bytes fp8 / bf16 = {after / before:.3f}")
    assert after < 0.9 * before
    quantized = {n for n, m in d.named_modules() if isinstance(m, Fp8Linear)}
    assert len(quantized) == count > 0 and all(n.startswith("blocks.") for n in quantized)
    # embeddings, the head and the norms stay in bf16
    assert d.proj_out.weight.dtype == torch.bfloat16 and type(d.proj_out) is nn.Linear
    assert type(d.condition_embedder.time_embedder.linear_1) is nn.Linear  # (diffusers keeps it in fp32)
    for n in quantized:
        m = d.get_submodule(n)
        err = (dequantize(m.weight, m.scale, torch.float32) - ref[n]).norm() / ref[n].norm()
        assert err < 0.05
    assert quantize_denoiser(d) == 0  # twice is harmless

    targets = family.target_modules(4, 0)
    assert {t.name for t in targets} >= quantized
    net = LoRANetwork(targets, linear_rank=4, linear_alpha=4, conv_rank=0, conv_alpha=0).apply_to()
    lora = net.lora[next(k for k, n in net.module_names.items() if n in quantized)]
    assert lora._orig_forward.__func__ is Fp8Linear.forward  # the LoRA wraps the fp8 forward
    with torch.no_grad():
        lora.up.weight.fill_(0.01)
    x = torch.randn(2, lora.base.in_features, dtype=torch.bfloat16)
    out = lora.base(x)
    expected = F.linear(x, dequantize(lora.base.weight, lora.base.scale, torch.bfloat16), lora.base.bias) + \
        (lora.up(lora.down(x.float())) * lora.scale).to(torch.bfloat16)
    assert torch.equal(out, expected)
    net.remove()


def test_real_sizes_put_nearly_all_weights_in_fp8():
    """The full-size Wan 2.1 14B and Flux transformers, built on the meta device (no memory): the block Linears
    quantized are what holds the weights, so the stored size is close to half of bf16."""
    from diffusers import FluxTransformer2DModel, WanTransformer3DModel

    from trainer.fp8_base import quantizable

    with torch.device("meta"):
        wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                                    in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824,
                                    num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                    eps=1e-6)
        flux = FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)
    for name, model, billions in (("Wan 2.1 14B", wan, 14.0), ("Flux", flux, 11.9)):
        total = sum(p.numel() for p in model.parameters())
        in_fp8 = sum(m.weight.numel() for n, m in model.named_modules() if quantizable(n, m))
        ratio = (in_fp8 + 2 * (total - in_fp8)) / (2 * total)
        print(f"{name}: {total / 1e9:.2f} B parameters, {in_fp8 / total:.4f} in fp8 Linears; "
              f"bytes fp8 / bf16 = {ratio:.3f} ({(in_fp8 + 2 * (total - in_fp8)) / 2**30:.1f} GiB)")
        assert total / 1e9 == pytest.approx(billions, rel=0.05)
        assert ratio < 0.52


def test_fp8_is_refused_off_cpu_and_cuda():
    check_device("cpu")
    with pytest.raises(JobError, match="model.dtype"):
        check_device("mps")


# ---- training ----


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    data = tmp_path_factory.mktemp("clips")
    for i in range(2):
        write_video(data / f"c{i}.mp4", textured_frames(8, 48, 32, seed=i), num_frames=8, width=48, height=32, gop=4)
        write_caption(data / f"c{i}.mp4", f"clip number {i}")
    return data


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    data = tmp_path_factory.mktemp("images")
    for i in range(2):
        write_image(data / f"i{i}.png", 32, 32, seed=i)
        write_caption(data / f"i{i}.png", f"image number {i}")
    return data


def _run(family, model, data, out, dtype, **dataset):
    job = parse_job({
        "job": f"fp8_{family}_{dtype}", "output_dir": str(out),
        "model": {"family": family, "path": str(model), "dtype": dtype},
        "datasets": [{"folder_path": str(data), "resolution": [32], **dataset}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": 6, "lr": 1e-3, "seed": 3, "batch_size": 1},
        "save": {"every": 6, "keep_last": 1, "resume": "none"},
    })
    result = train(job)
    return [r["loss"] for r in result.records], load_file(str(result.lora_path))


@pytest.mark.parametrize("family, data, frames", [("wan21", "clips", 5), ("sd15", "images", 1)])
def test_training_with_fp8_weights_follows_bf16(family, data, frames, tiny_wan21_path, tiny_sd15_path, request,
                                                tmp_path):
    model = tiny_wan21_path if family == "wan21" else tiny_sd15_path
    folder = request.getfixturevalue(data)
    kw = {"num_frames": frames} if frames > 1 else {}
    losses_fp8, lora_fp8 = _run(family, model, folder, tmp_path / "fp8", "fp8", **kw)
    losses_bf16, lora_bf16 = _run(family, model, folder, tmp_path / "bf16", "bf16", **kw)
    assert all(math.isfinite(x) for x in losses_fp8) and len(losses_fp8) == 6
    assert lora_fp8.keys() == lora_bf16.keys()
    assert all(lora_fp8[k].dtype == lora_bf16[k].dtype and lora_fp8[k].shape == lora_bf16[k].shape
               for k in lora_fp8)
    diff = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses_fp8, losses_bf16))
    print(f"{family}: max relative loss difference fp8 vs bf16 over 6 steps {diff:.4f}; "
          f"fp8 {[round(x, 4) for x in losses_fp8]} bf16 {[round(x, 4) for x in losses_bf16]}")
    assert diff < 0.05  # same data, noise and timesteps: only the base weights' rounding differs


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_the_other_block_layouts_train_with_fp8(family, images, request, tmp_path):
    """SDXL's UNet (linear projections in its transformer blocks) and Flux (double and single-stream blocks)."""
    model = request.getfixturevalue(f"tiny_{family}_path")
    job = parse_job({
        "job": f"fp8_{family}", "output_dir": str(tmp_path),
        "model": {"family": family, "path": str(model), "dtype": "fp8"},
        "datasets": [{"folder_path": str(images), "resolution": [32]}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": 2, "lr": 1e-3, "seed": 3, "batch_size": 1},
        "save": {"every": 2, "keep_last": 1, "resume": "none"},
    })
    family_obj = get_family(family).load(str(model), dtype=torch.bfloat16)
    result = train(job, family=family_obj)
    assert all(math.isfinite(r["loss"]) for r in result.records) and len(result.records) == 2
    layers = [n for n, m in family_obj.denoiser.named_modules() if isinstance(m, Fp8Linear)]
    assert layers and load_file(str(result.lora_path))
    if family == "flux":
        assert any(n.startswith("single_transformer_blocks.") for n in layers)
        assert type(family_obj.denoiser.proj_out) is nn.Linear  # the head stays bf16


def test_two_experts_stay_fp8_across_switches(tiny_wan22_14b_path, clips, tmp_path):
    """Wan 2.2 A14B: both experts are quantized, and expert switches (each moves one expert to the device and
    the other to the CPU) keep their weights fp8; both LoRA files come out. With gradient checkpointing (its
    recomputed forward runs the fp8 layers again)."""
    job = parse_job({
        "job": "fp8_moe", "output_dir": str(tmp_path),
        "model": {"family": "wan22_14b", "path": str(tiny_wan22_14b_path), "dtype": "fp8"},
        "datasets": [{"folder_path": str(clips), "resolution": [32], "num_frames": 5}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": 6, "lr": 1e-3, "seed": 3, "switch_boundary_every": 2, "gradient_checkpointing": True},
        "save": {"every": 6, "keep_last": 1, "resume": "none"},
    })
    family = get_family("wan22_14b").load(str(tiny_wan22_14b_path), dtype=torch.bfloat16)
    switches = []
    activate = family.activate

    def spy(expert, device=None):
        switches.append(expert)
        return activate(expert, device)

    family.activate = spy
    result = train(job, family=family)
    assert len(set(switches)) == 2 and len(switches) >= 3
    for name, expert in family.experts.items():
        layers = [m for m in expert.modules() if isinstance(m, Fp8Linear)]
        assert layers and all(m.weight.dtype == FP8 for m in layers), name
        assert expert.patch_embedding.weight.dtype == torch.bfloat16  # what is not quantized stays bf16
    assert all(math.isfinite(r["loss"]) for r in result.records)
    assert set(result.lora_paths) == {"high_noise", "low_noise"}


def test_a_scaled_fp8_single_file_is_loaded_in_bf16_and_requantized(tiny_wan21_path, tmp_path):
    """A ComfyUI *_fp8_scaled file is dequantized to bf16 on load (single_file/quantized.py) and its block
    Linears quantized again; the run trains, and every layer the file held in fp8 is fp8 again."""
    from diffusers import WanTransformer3DModel

    from family_helpers import native_state_dict
    from tests.test_single_file_fp8 import write_scaled
    from trainer.families.single_file.quantized import LEGACY
    from trainer.loop import Callbacks

    path = tmp_path / "tiny_wan_fp8_scaled.safetensors"
    written = write_scaled(path, native_state_dict(WanTransformer3DModel.from_pretrained(
        tiny_wan21_path, subfolder="transformer")), LEGACY)
    data = tmp_path / "clips"
    write_video(data / "clip.mp4", textured_frames(8, 32, 32), num_frames=8, width=32, height=32, gop=4)
    write_caption(data / "clip.mp4", "waves rolling")
    job = parse_job({
        "job": "fp8_file", "output_dir": str(tmp_path / "out"),
        "model": {"family": "wan21", "path": str(path), "dtype": "fp8", "config": str(tiny_wan21_path / "transformer"),
                  "encoders_from": str(tiny_wan21_path)},
        "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": 3, "batch_size": 1, "lr": 1e-3, "seed": 5},
        "save": {"every": 100, "resume": "none"},
    })
    logs = []

    class Log(Callbacks):
        def log(self, message):
            logs.append(message)

    run = train(job, Log())
    assert all(math.isfinite(r["loss"]) for r in run.records) and len(run.records) == 3
    assert f"model.dtype fp8: {len(written)} Linear layers of the denoiser stored as float8_e4m3fn" in logs

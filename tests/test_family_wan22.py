"""Wan 2.2 on tiny random pipelines: TI2V-5B (the 2.2 VAE, per-token timesteps, first-frame replacement) and
A14B T2V / I2V (two experts split at the pipeline's boundary), each against diffusers' own pipeline code."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fixtures_models import (  # noqa: F401
    tiny_wan21_path,
    tiny_wan22_5b_path,
    tiny_wan22_14b_i2v_path,
    tiny_wan22_14b_path,
)
from tests.media import textured_frames, write_caption, write_image, write_video
from trainer.data.training_set import TrainingSet
from trainer.errors import ModelError
from trainer.export import delta_from_file
from trainer.families import get_family
from trainer.families.base import NoisyBatch
from trainer.families.wan21 import Wan21, wan_target_modules
from trainer.families.wan22_5b import Wan22TI2V
from trainer.families.wan22_14b import Wan22A14B, Wan22A14BI2V, expert_lora_path
from trainer.job import DatasetConfig, parse_job
from trainer.loop import train
from trainer.metrics import read_records
from trainer.validation import FixedNoiseProbe
from family_helpers import edit_json

FAST_EXIT = {"loss_improvement_rate_below": 0.005, "min_gradient_stability": 0.3, "max_loss_cv": 1.0}
# Full-size transformer configs (from the released diffusers folders), built on the meta device.
FULL = {
    "TI2V-5B": dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, ffn_dim=14336,
                    num_layers=30),
    "A14B-T2V": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, ffn_dim=13824,
                     num_layers=40),
    "A14B-I2V": dict(num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16, ffn_dim=13824,
                     num_layers=40),
}


def quiet(_line):
    pass


def pixels_of(seed: int, frames: int = 5, height: int = 32, width: int = 64) -> torch.Tensor:
    clip = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    return torch.from_numpy(clip).permute(3, 0, 1, 2).float()[None] / 127.5 - 1.0



def assert_native_round_trip(transformer, names):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    keys = [Wan21.export_prefix(n) for n in names]
    assert len(set(keys)) == len(keys)
    for name, key in zip(names, keys):
        (back,) = convert_wan_transformer_to_diffusers({key.removeprefix("diffusion_model.") + ".weight":
                                                        torch.empty(0)})
        assert back == f"{name}.weight"
    return keys


def clip_folder(tmp_path, name, width=64, height=32):
    folder = tmp_path / name
    write_video(folder / "clip.mp4", textured_frames(12, width, height), num_frames=12, width=width, height=height,
                gop=4)
    write_caption(folder / "clip.mp4", "[trigger] waves rolling")
    write_image(folder / "still.png", width, height, seed=3)
    write_caption(folder / "still.png", "a still frame")
    return folder


def apply_file_like_comfyui(module_by_prefix, lora_file):
    deltas = delta_from_file(lora_file)
    assert set(deltas) <= set(module_by_prefix), set(deltas) - set(module_by_prefix)
    with torch.no_grad():
        for prefix, d in deltas.items():
            module_by_prefix[prefix].weight += d.reshape(module_by_prefix[prefix].weight.shape).float()


# ================================================================ TI2V-5B

@pytest.fixture(scope="module")
def ti2v(tiny_wan22_5b_path):
    return Wan22TI2V.load(str(tiny_wan22_5b_path), torch.float32)


@pytest.fixture(scope="module")
def ti2v_pipes(tiny_wan22_5b_path):
    """The folder's own WanPipeline and a WanImageToVideoPipeline on the same components (as diffusers runs
    TI2V-5B image-to-video: expand_timesteps, no image encoder)."""
    from diffusers import DiffusionPipeline, WanImageToVideoPipeline, WanPipeline

    t2v = DiffusionPipeline.from_pretrained(tiny_wan22_5b_path)
    assert isinstance(t2v, WanPipeline) and t2v.config.expand_timesteps
    i2v = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                  scheduler=t2v.scheduler, transformer=t2v.transformer, expand_timesteps=True)
    return t2v, i2v


def test_ti2v_facts_and_latents(ti2v):
    assert get_family("wan22_5b") is Wan22TI2V
    assert Wan22TI2V.resolution_factor == ti2v.resolution_factor == 32  # VAE 16 x patch 2
    assert ti2v.flow_shift == 5.0 and ti2v.supports_i2v and ti2v.loaded.vae.config.z_dim == 48
    pixels = pixels_of(0)
    out = ti2v.encode_pixels(pixels)
    assert out["latents"].shape == (1, 48, 2, 2, 4)
    vae = ti2v.loaded.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 48, 1, 1, 1)
    assert not torch.allclose(std, torch.ones_like(std))  # the tiny VAE's normalization is not the identity
    torch.testing.assert_close(out["latents"], (vae.encode(pixels).latent_dist.mode() - mean) / std)
    assert out["i2v"].tolist() == [0.0] and out["first_frame_latents"].eq(0).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        ti2v.encode_pixels(torch.zeros(1, 3, 1, 48, 32))


def test_ti2v_first_frame_equals_pipeline_prepare_latents(ti2v, ti2v_pipes):
    _, pipe = ti2v_pipes
    pixels = pixels_of(1)
    out = ti2v.encode_pixels(pixels, i2v=True)
    _, condition, mask = pipe.prepare_latents(pixels[:, :, 0], 1, 48, 32, 64, 5, torch.float32, "cpu",
                                              torch.Generator().manual_seed(0))
    assert out["i2v"].tolist() == [1.0]
    torch.testing.assert_close(out["first_frame_latents"], condition)
    torch.testing.assert_close(ti2v.noise_mask(out, out["latents"].shape, "cpu", torch.float32), mask)


def test_ti2v_predict_is_the_pipeline_denoising_step(ti2v, ti2v_pipes):
    _, pipe = ti2v_pipes
    pixels = torch.cat([pixels_of(2), pixels_of(3)])
    t2v_item, i2v_item = ti2v.encode_pixels(pixels[:1]), ti2v.encode_pixels(pixels[1:], i2v=True)
    text = torch.stack([c["encoder_hidden_states"] for c in ti2v.encode_prompts(["a boat", "a red car"])])
    latents = torch.randn(2, 48, 2, 2, 4, generator=torch.Generator().manual_seed(4))
    target = torch.randn(2, 48, 2, 2, 4, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([811.0, 303.0])
    cond = {"encoder_hidden_states": text,
            **{k: torch.cat([t2v_item[k], i2v_item[k]]) for k in ("first_frame_latents", "i2v")}}
    ours = ti2v.predict(NoisyBatch(model_input=latents, timesteps=t, target=target), cond)

    def pipeline_step(row, i2v):
        """WanImageToVideoPipeline.__call__'s expand_timesteps branch (WanPipeline's when i2v is False)."""
        x = latents[row : row + 1]
        if i2v:
            _, condition, mask = pipe.prepare_latents(pixels[row : row + 1, :, 0], 1, 48, 32, 64, 5,
                                                      torch.float32, "cpu", None)
            x = (1 - mask) * condition + mask * x
        else:
            mask = torch.ones(x.shape)
        timestep = (mask[0][0][:, ::2, ::2] * t[row]).flatten().unsqueeze(0)
        return pipe.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text[row : row + 1],
                                return_dict=False)[0]

    torch.testing.assert_close(ours[:1], pipeline_step(0, False))
    theirs = pipeline_step(1, True)
    torch.testing.assert_close(ours[1:, :, 1:], theirs[:, :, 1:])
    # The conditioning frame of an I2V item carries no loss: its prediction is the target itself.
    assert torch.equal(ours[1, :, 0], target[1, :, 0]) and not torch.allclose(ours[0, :, 0], target[0, :, 0])
    pred_grad = torch.zeros_like(latents, requires_grad=True)
    masked = torch.where(ti2v.noise_mask(cond, latents.shape, "cpu", torch.float32).bool(), pred_grad, target)
    masked.sum().backward()
    assert pred_grad.grad[1, :, 0].eq(0).all() and pred_grad.grad[1, :, 1:].eq(1).all()


def test_ti2v_export_names_tiny_and_full_size(ti2v):
    from diffusers import WanTransformer3DModel

    targets = ti2v.target_modules(4, 4)
    keys = assert_native_round_trip(ti2v.denoiser, [t.name for t in targets])
    assert len(keys) == 21 and "diffusion_model.patch_embedding" in keys
    with torch.device("meta"):
        full = WanTransformer3DModel(patch_size=(1, 2, 2), text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                     qk_norm="rms_norm_across_heads", eps=1e-6, **FULL["TI2V-5B"])
    names = [t.name for t in wan_target_modules(full, 16, 0)]
    assert len(names) == 30 * 10
    assert_native_round_trip(full, names)


def test_ti2v_datasets_choose_i2v_and_the_cache_keeps_them_apart(ti2v, tmp_path):
    folder = clip_folder(tmp_path, "clips")
    plain = DatasetConfig(folder_path=str(folder), resolution=[32], num_frames=5, cache_latents_to_disk=True)
    first = DatasetConfig(folder_path=str(folder), resolution=[32], num_frames=5, cache_latents_to_disk=True,
                          do_i2v=True)
    ts = TrainingSet.build([plain, first], ti2v, seed=0, log=quiet)
    flags = sorted((s.item.kind, s.cond["i2v"].item()) for s in ts.samples)
    assert flags == [("image", 0.0), ("image", 1.0), ("video", 0.0), ("video", 1.0)]
    i2v_video = next(s for s in ts.samples if s.item.kind == "video" and s.cond["i2v"].item() == 1.0)
    assert not i2v_video.cond["first_frame_latents"].eq(0).all()
    # a batch mixing I2V and T2V items of one shape stacks the conditioning per item
    batch = ts.collate([i for i, s in enumerate(ts.samples) if s.item.kind == "video"], None)
    assert sorted(batch["cond"]["i2v"].tolist()) == [0.0, 1.0]
    # the do_i2v setting is part of the disk cache key: both variants come back from disk, unchanged
    again = TrainingSet.build([plain, first], ti2v, seed=0, log=quiet)
    for a, b in zip(ts.samples, again.samples):
        assert torch.equal(a.latent, b.latent) and all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)


def test_ti2v_loss_counts_only_the_predicted_frames(ti2v):
    # The given first frame of an I2V item must not dilute the loss: the mean runs over the other frames only
    # (the old plain mean was the masked one times (F - 1) / F), and a T2V item counts every frame.
    from trainer.families.base import masked_mse

    shape = torch.Size([2, 48, 3, 2, 2])
    cond = {"i2v": torch.tensor([0.0, 1.0])}
    mask = ti2v.loss_mask(cond, shape)
    assert mask.shape == (2, 1, 3, 2, 2) and mask[0].eq(1).all()
    assert mask[1, :, 0].eq(0).all() and mask[1, :, 1:].eq(1).all()
    pred, target = torch.randn(shape), torch.randn(shape)
    target[1, :, 0] = pred[1, :, 0]  # what predict returns on the given frame
    per_item = masked_mse(pred, target, mask, per_item=True)
    torch.testing.assert_close(per_item[0], (pred[0] - target[0]).square().mean())
    torch.testing.assert_close(per_item[1], (pred[1, :, 1:] - target[1, :, 1:]).square().mean())
    whole = masked_mse(pred, target, mask)
    sq = (pred - target).square()
    torch.testing.assert_close(whole, (sq[0].sum() + sq[1, :, 1:].sum()) / (sq[0].numel() + sq[1, :, 1:].numel()))
    assert masked_mse(pred, target) == torch.nn.functional.mse_loss(pred, target)  # no mask: the plain mean


def test_ti2v_i2v_run_learns_transitions_and_exports(tiny_wan22_5b_path, tmp_path):
    data = clip_folder(tmp_path, "clips")
    spec = {
        "job": "ti2v", "output_dir": str(tmp_path / "out"),
        "model": {"family": "wan22_5b", "path": str(tiny_wan22_5b_path), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32], "num_frames": 5,
                      "do_i2v": True}],
        "network": {"linear": 4, "linear_alpha": 4, "alpha_schedule": {"linear_alpha_phases": {
            "foundation": {"alpha": 4, "min_steps": 100, "exit_criteria": FAST_EXIT},
            "emphasis": {"alpha": 8, "min_steps": 100}}}},
        "train": {"steps": 200, "batch_size": 1, "lr": 3e-3, "seed": 3},
        "save": {"every": 100, "resume": "none"},
    }
    job = parse_job(spec)
    fam = Wan22TI2V.load(str(tiny_wan22_5b_path), torch.float32)
    ts = TrainingSet.build(job.datasets, fam, seed=0, log=quiet)
    video = next(i for i, s in enumerate(ts.samples) if s.item.kind == "video")
    probe = FixedNoiseProbe(ts, fam, items=2)
    before = probe.loss()
    masks = []
    loss_mask = fam.loss_mask
    fam.loss_mask = lambda cond, shape: masks.append(loss_mask(cond, shape)) or masks[-1]  # the loop asks for it
    result = train(job, family=fam, training_set=ts)
    del fam.loss_mask
    assert len(masks) >= 200 and any(m[:, :, 0].eq(0).all() for m in masks)
    assert [t["to_phase"] for t in result.transitions] == ["emphasis"]
    assert [r["step"] for r in read_records(job.metrics_path)] == list(range(1, 201))
    sd = load_file(str(result.lora_path))
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    assert {v.item() for k, v in sd.items() if k.endswith(".alpha")} == {8.0}
    apply_file_like_comfyui({Wan22TI2V.export_prefix(t.name): t.module for t in fam.target_modules(4, 0)},
                            result.lora_path)
    after = probe.loss()
    assert after < 0.95 * before, (before, after)
    assert ts.samples[video].cond["i2v"].item() == 1.0


# ================================================================ A14B

@pytest.fixture(scope="module")
def a14b(tiny_wan22_14b_path):
    return Wan22A14B.load(str(tiny_wan22_14b_path), torch.float32)


@pytest.fixture(scope="module")
def a14b_i2v(tiny_wan22_14b_i2v_path):
    return Wan22A14BI2V.load(str(tiny_wan22_14b_i2v_path), torch.float32)


def test_a14b_loads_two_experts_and_the_boundary(a14b, a14b_i2v, tiny_wan22_14b_path):
    from diffusers import WanPipeline

    assert get_family("wan22_14b") is Wan22A14B and get_family("wan22_14b_i2v") is Wan22A14BI2V
    pipe = WanPipeline.from_pretrained(tiny_wan22_14b_path)
    assert a14b.boundary_ratio == pipe.config.boundary_ratio == 0.875 and a14b_i2v.boundary_ratio == 0.9
    experts = a14b.experts
    assert set(experts) == {"high_noise", "low_noise"} and a14b.active_expert == "high_noise"
    for name, component in (("high_noise", pipe.transformer), ("low_noise", pipe.transformer_2)):
        ours, theirs = experts[name].state_dict(), component.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert not any(p.requires_grad for p in experts[name].parameters())
    assert not torch.equal(experts["high_noise"].proj_out.weight, experts["low_noise"].proj_out.weight)
    assert a14b.describe()["boundary_ratio"] == 0.875 and a14b.describe("low_noise")["expert"] == "low_noise"
    assert not getattr(a14b, "supports_i2v", False)
    assert a14b_i2v.supports_i2v and a14b_i2v.item_cond_keys == ("image_condition",)


def test_a14b_bad_folders(tmp_path, tiny_wan22_14b_path, tiny_wan21_path):
    with pytest.raises(ModelError, match="model.family 'wan21'"):
        Wan22A14B.load(str(tiny_wan21_path), torch.float32)
    with pytest.raises(ModelError, match="model.family 'wan22_14b'"):
        Wan22A14BI2V.load(str(tiny_wan22_14b_path), torch.float32)
    with pytest.raises(ModelError, match="model.family 'wan22_14b'"):
        get_family("wan21_i2v").load(str(tiny_wan22_14b_path), torch.float32)
    bad = shutil.copytree(tiny_wan22_14b_path, tmp_path / "no_boundary")
    edit_json(bad / "model_index.json", boundary_ratio=None)
    with pytest.raises(ModelError, match="boundary_ratio"):
        Wan22A14B.load(str(bad), torch.float32)
    mismatch = shutil.copytree(tiny_wan22_14b_path, tmp_path / "mismatch")
    edit_json(mismatch / "transformer_2" / "config.json", text_dim=64)
    with pytest.raises(ModelError, match="differ in text_dim"):
        Wan22A14B.load(str(mismatch), torch.float32)


@pytest.mark.parametrize("which", ["t2v", "i2v"])
def test_each_expert_only_sees_its_own_timesteps(which, a14b, a14b_i2v, tiny_wan22_14b_path,
                                                 tiny_wan22_14b_i2v_path):
    from diffusers import DiffusionPipeline

    fam, path = (a14b, tiny_wan22_14b_path) if which == "t2v" else (a14b_i2v, tiny_wan22_14b_i2v_path)
    pipe = DiffusionPipeline.from_pretrained(path)
    # The pipeline's switch: `transformer` while t >= boundary_ratio * num_train_timesteps.
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(0)
    latents = torch.zeros(20000, 1)
    for expert in ("high_noise", "low_noise"):
        u = fam.sample_timesteps(20000, gen, expert=expert)
        t = fam.add_noise(latents, latents, u).timesteps  # what the loop hands the transformer
        if expert == "high_noise":
            assert (t >= boundary).all() and t.min() < boundary + 0.2 and t.max() > 999.9
        else:
            assert (t < boundary).all() and t.max() > boundary - 0.2 and t.min() < 5.0
        assert set(fam.experts_of_timesteps(t)) == {expert}
    # the pipeline's own inference timesteps are assigned to the same experts
    pipe.scheduler.set_timesteps(40)
    ts = pipe.scheduler.timesteps.float()
    assert fam.experts_of_timesteps(ts) == ["high_noise" if x >= boundary else "low_noise" for x in ts.tolist()]
    # within its range an expert sees the shifted distribution, conditioned on the range
    u_b = fam.u_range("high_noise")[0]
    torch.testing.assert_close(fam.sigmas_from_u(torch.tensor([u_b], dtype=torch.float64)),
                               torch.tensor([pipe.config.boundary_ratio], dtype=torch.float64))
    # the active expert is the default
    fam.activate("low_noise")
    try:
        u = fam.sample_timesteps(1000, gen)
        assert set(fam.experts_of_timesteps(fam.add_noise(latents[:1000], latents[:1000], u).timesteps)) == \
            {"low_noise"}
    finally:
        fam.activate("high_noise")


def test_a14b_predict_targets_and_activation_per_expert(a14b, tiny_wan22_14b_path):
    latents = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(7))
    cond = {"encoder_hidden_states": a14b.encode_prompts(["a boat"])[0]["encoder_hidden_states"][None]}
    noisy = NoisyBatch(model_input=latents, timesteps=torch.tensor([500.0]), target=latents)
    outs = {}
    for expert, module in a14b.experts.items():
        outs[expert] = a14b.predict(noisy, cond, expert=expert)
        direct = module(hidden_states=latents, timestep=noisy.timesteps, encoder_hidden_states=cond[
            "encoder_hidden_states"], return_dict=False)[0]
        torch.testing.assert_close(outs[expert], direct)
        targets = a14b.target_modules(4, 0, expert=expert)
        modules = dict(module.named_modules())
        assert len(targets) == 20 and all(modules[t.name] is t.module for t in targets)
    assert not torch.allclose(outs["high_noise"], outs["low_noise"])
    torch.testing.assert_close(a14b.predict(noisy, cond), outs["high_noise"])  # the active one by default
    with pytest.raises(ValueError, match="expert must be one of"):
        a14b.predict(noisy, cond, expert="medium")

    fam = Wan22A14B.load(str(tiny_wan22_14b_path), torch.float32)  # a throwaway instance: meta drops weights
    low = fam.activate("low_noise", device="meta")
    assert low is fam.denoiser is fam.experts["low_noise"] and fam.active_expert == "low_noise"
    assert all(p.device.type == "meta" for p in low.parameters())
    assert all(p.device.type == "cpu" for p in fam.experts["high_noise"].parameters())
    assert fam.target_modules(4, 0)[0].module is dict(low.named_modules())[fam.target_modules(4, 0)[0].name]


def test_a14b_i2v_condition_and_step_equal_the_pipeline(a14b_i2v, tiny_wan22_14b_i2v_path):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_wan22_14b_i2v_path)
    assert pipe.image_encoder is None and pipe.transformer.config.image_dim is None
    pixels = pixels_of(8, height=32, width=48)
    out = a14b_i2v.encode_pixels(pixels)
    assert set(out) == {"latents", "image_condition"}
    _, condition = pipe.prepare_latents(pixels[:, :, 0], 1, 16, 32, 48, 5, torch.float32, "cpu", None)
    torch.testing.assert_close(out["image_condition"], condition)
    text = a14b_i2v.encode_prompts(["a car"])[0]["encoder_hidden_states"][None]
    latents = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(9))
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    for t in (950.0, 400.0):
        expert = a14b_i2v.experts_of_timesteps(torch.tensor([t]))[0]
        current = pipe.transformer if t >= boundary else pipe.transformer_2
        theirs = current(hidden_states=torch.cat([latents, condition], dim=1), timestep=torch.tensor([t]),
                         encoder_hidden_states=text, return_dict=False)[0]
        ours = a14b_i2v.predict(NoisyBatch(latents, torch.tensor([t]), latents),
                                {"encoder_hidden_states": text, "image_condition": out["image_condition"]},
                                expert=expert)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("config", ["A14B-T2V", "A14B-I2V"])
def test_a14b_full_size_export_names(config):
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        full = WanTransformer3DModel(patch_size=(1, 2, 2), text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                     qk_norm="rms_norm_across_heads", eps=1e-6, **FULL[config])
    names = [t.name for t in wan_target_modules(full, 16, 8)]
    assert len(names) == 40 * 10 + 1
    keys = assert_native_round_trip(full, names)
    assert "diffusion_model.blocks.39.ffn.2" in keys


def test_expert_lora_paths(tmp_path):
    assert expert_lora_path(tmp_path / "job.safetensors", "high_noise") == tmp_path / "job_high_noise.safetensors"
    assert expert_lora_path("out/my.job.safetensors", "low_noise").name == "my.job_low_noise.safetensors"
    with pytest.raises(ValueError):
        expert_lora_path("x.safetensors", "transformer_2")


def test_loop_trains_only_the_chosen_expert(tiny_wan22_14b_i2v_path, tmp_path):
    """With train_high_noise off, only the low-noise expert trains, on its own timesteps; the other expert
    is untouched. (Both experts in one run: tests/test_train_moe.py.)"""
    data = clip_folder(tmp_path, "clips", width=48)
    job = parse_job({
        "job": "low", "output_dir": str(tmp_path / "out"),
        "model": {"family": "wan22_14b_i2v", "path": str(tiny_wan22_14b_i2v_path), "dtype": "fp32",
                  "train_high_noise": False},
        "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5, "do_i2v": True}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": 30, "lr": 3e-3, "seed": 1}, "save": {"every": 30, "resume": "none"},
    })
    fam = Wan22A14BI2V.load(str(tiny_wan22_14b_i2v_path), torch.float32)
    fam.activate("low_noise", device="cpu")
    high_before = {k: v.clone() for k, v in fam.experts["high_noise"].state_dict().items()}
    seen = []
    sample = fam.sample_timesteps

    def recording(n, generator, expert=None):
        u = sample(n, generator, expert)
        seen.extend(fam.sigmas_from_u(u).mul(1000).tolist())
        return u

    fam.sample_timesteps = recording
    ts = TrainingSet.build(job.datasets, fam, seed=0, log=quiet)
    result = train(job, family=fam, training_set=ts)
    assert len(seen) == 30 and max(seen) < 900.0
    assert all(torch.equal(v, high_before[k]) for k, v in fam.experts["high_noise"].state_dict().items())
    assert result.lora_path.name == "low_low_noise.safetensors" and set(result.lora_paths) == {"low_noise"}
    sd = load_file(str(result.lora_path))
    assert sd and all(k.startswith("diffusion_model.blocks.") for k in sd)
    low_modules = {Wan21.export_prefix(t.name): t.module for t in fam.target_modules(4, 0, expert="low_noise")}
    apply_file_like_comfyui(low_modules, result.lora_path)


# ================================================================ real ComfyUI (skips without COMFYUI_ROOT)

@pytest.mark.comfyui
def test_comfyui_applies_every_key_of_ti2v_and_per_expert_exports(tmp_path):
    from tests.e2e import comfy_env
    from tests.test_family_wan_i2v import comfyui_sized_wan, probe_family_export_in_comfyui
    from trainer.families.base import LoadedModel

    comfy_env.require_comfyui()
    transformer = comfyui_sized_wan(0, 48, 48)
    result, _ = probe_family_export_in_comfyui(Wan22TI2V(LoadedModel(denoiser=transformer)), transformer,
                                               tmp_path, "ti2v")
    assert result["model_config"] == "WAN22_T2V"
    for cls, channels in ((Wan22A14B, 16), (Wan22A14BI2V, 36)):
        experts = {"high_noise": comfyui_sized_wan(0, channels), "low_noise": comfyui_sized_wan(1, channels)}
        family = cls(LoadedModel(denoiser=experts["high_noise"],
                                 extra={"experts": experts, "active_expert": "high_noise", "boundary_ratio": 0.9}))
        for expert, module in experts.items():
            probe_family_export_in_comfyui(family, module, tmp_path, f"{cls.name}_{expert}", expert=expert)

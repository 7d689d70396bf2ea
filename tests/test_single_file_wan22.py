"""Wan 2.2 single files: TI2V-5B and A14B expert pairs detected from their headers, the refusals, the Wan 2.2 VAE
file, and loading / training from files equal to the diffusers folders of the same weights; ComfyUI-encoder
adapters for the Wan 2.2 families (the real-ComfyUI side: tests/e2e/test_comfyui_single_file_wan22.py)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from family_helpers import header_only_file, meta_shapes, native_state_dict, native_wan22_vae_state, tiny_wan22_vae
from fixtures_models import (  # noqa: F401
    tiny_wan21_path,
    tiny_wan22_5b_path,
    tiny_wan22_14b_i2v_path,
    tiny_wan22_14b_path,
)
from tests.media import textured_frames, write_caption, write_video
from trainer.comfy_encoders import ExternalEncoders, for_family
from trainer.errors import JobError, ModelError
from trainer.families import get_family
from trainer.families.single_file import detect_variant, known_variants, load_single_file, load_wan22_vae_file
from trainer.families.single_file.wan22 import expert_named
from trainer.job import parse_job
from trainer.loop import train

RELEASED = {v.name: v for v in known_variants()}


def released_file(tmp_path, variant: str, name: str, prefix: str = "") -> str:
    shapes, model = meta_shapes(RELEASED[variant].config, prefix=prefix)
    path = tmp_path / name
    header_only_file(path, shapes)
    return path, sum(p.numel() for p in model.parameters())


def expert_files(tmp_path, folder, names=("high_noise", "low_noise")):
    """The two experts of a tiny A14B folder as ComfyUI-layout files (transformer -> high, transformer_2 -> low)."""
    from diffusers import WanTransformer3DModel

    out = []
    for sub, name in zip(("transformer", "transformer_2"), names):
        model = WanTransformer3DModel.from_pretrained(folder, subfolder=sub)
        path = tmp_path / f"tiny_{name}.safetensors"
        save_file(native_state_dict(model, "model.diffusion_model."), str(path))
        out.append(path)
    return out


def clips(tmp_path, width=32):
    data = tmp_path / "clips"
    write_video(data / "clip.mp4", textured_frames(8, width, 32), num_frames=8, width=width, height=32, gop=4)
    write_caption(data / "clip.mp4", "waves rolling")
    return data


def job_for(tmp_path, name, family, path, data, steps=6, **model):
    return parse_job({
        "job": name, "output_dir": str(tmp_path / name),
        "model": {"family": family, "path": str(path), "dtype": "fp32", **model},
        "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": steps, "batch_size": 1, "lr": 1e-3, "seed": 5, "switch_boundary_every": 3},
        "save": {"every": 100, "resume": "none"},
    })


def assert_same_weights(got, want):
    got, want = got.state_dict(), want.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------------------------------------- released shapes


def test_released_wan22_files_are_detected_from_their_headers(tmp_path):
    five, n5 = released_file(tmp_path, "wan22_ti2v_5b", "wan2.2_ti2v_5B_fp16.safetensors")
    found = detect_variant(five)
    assert (found.name, found.family, found.flow_shift) == ("wan22_ti2v_5b", "wan22_5b", 5.0)
    assert 4.5e9 < n5 < 5.5e9  # TI2V-5B
    i2v, n14 = released_file(tmp_path, "wan22_i2v_a14b", "wan2.2_i2v_high_noise_14B_fp16.safetensors",
                             prefix="model.diffusion_model.")
    assert detect_variant(i2v).family == "wan22_14b_i2v"  # in_channels 36 without img_emb: no Wan 2.1 model
    assert 13.5e9 < n14 < 15e9
    t2v, _ = released_file(tmp_path, "wan22_t2v_a14b", "expert.safetensors")
    # identical shapes: Wan 2.1 T2V 14B unless the family says Wan 2.2 A14B
    assert detect_variant(t2v).name == "wan21_t2v_14b"
    assert detect_variant(t2v, family="wan22_14b").name == "wan22_t2v_a14b"
    assert RELEASED["wan22_t2v_a14b"].config == RELEASED["wan21_t2v_14b"].config
    c5 = RELEASED["wan22_ti2v_5b"].config
    assert (c5["num_attention_heads"] * c5["attention_head_dim"], c5["num_layers"], c5["ffn_dim"],
            c5["in_channels"], c5["out_channels"], c5["image_dim"]) == (3072, 30, 14336, 48, 48, None)
    ci = RELEASED["wan22_i2v_a14b"].config
    assert (ci["in_channels"], ci["out_channels"], ci["image_dim"], ci["added_kv_proj_dim"]) == (36, 16, None, None)
    assert get_family("wan22_14b").default_boundary_ratio == 0.875
    assert get_family("wan22_14b_i2v").default_boundary_ratio == 0.9


def test_expert_files_are_refused_clearly_before_loading(tmp_path):
    from trainer.comfy_bridge import single_file_model

    high, _ = released_file(tmp_path, "wan22_t2v_a14b", "wan2.2_t2v_high_noise_14B_fp16.safetensors")
    low, _ = released_file(tmp_path, "wan22_t2v_a14b", "wan2.2_t2v_low_noise_14B_fp16.safetensors")
    i2v_low, _ = released_file(tmp_path, "wan22_i2v_a14b", "wan2.2_i2v_low_noise_14B_fp16.safetensors")
    small, _ = released_file(tmp_path, "wan21_t2v_1.3b", "wan2.1_t2v_1.3B_fp16.safetensors")
    assert expert_named(high) == "high_noise" and expert_named(low) == "low_noise" and expert_named(small) is None
    # every refusal below happens on the headers, before any tensor is read (these files hold no data)
    for family in ("wan21", None):
        with pytest.raises(ModelError, match="named like a Wan 2.2 A14B high_noise expert.*model.low_noise_path"):
            load_single_file(high, torch.float32, family=family, encoders_from=tmp_path)
    with pytest.raises(ModelError, match="named like a Wan 2.2 A14B low_noise expert"):
        single_file_model(low, "bf16")
    with pytest.raises(ModelError, match="two expert files, and the low-noise one is missing"):
        load_single_file(high, torch.float32, family="wan22_14b", encoders_from=tmp_path)
    with pytest.raises(ModelError, match="two expert files, and the low-noise one is missing"):
        single_file_model(i2v_low, "bf16")  # an I2V expert is Wan 2.2 A14B by its shapes alone
    with pytest.raises(ModelError, match="experts are swapped"):
        load_single_file(low, torch.float32, family="wan22_14b", low_noise_path=high, encoders_from=tmp_path)
    with pytest.raises(ModelError, match="same file"):
        single_file_model(high, "bf16", low_noise_path=high)
    with pytest.raises(ModelError, match="not the same Wan 2.2 A14B variant.*in_channels: 16 vs 36"):
        single_file_model(high, "bf16", low_noise_path=i2v_low)
    with pytest.raises(ModelError, match="low_noise_path is only for the two experts"):
        load_single_file(small, torch.float32, low_noise_path=low, encoders_from=tmp_path)
    with pytest.raises(ModelError, match="trained by model.family 'wan22_14b_i2v', not 'wan22_14b'"):
        load_single_file(i2v_low, torch.float32, family="wan22_14b", low_noise_path=i2v_low, encoders_from=tmp_path)
    spec = single_file_model(high, "bf16", low_noise_path=low)
    assert spec["family"] == "wan22_14b" and spec["low_noise_path"] == str(low)
    assert spec["single_file"]["variant"] == "wan22_t2v_a14b"


def test_job_field_low_noise_path(tmp_path):
    def model(**m):
        return parse_job({"job": "j", "output_dir": str(tmp_path), "model": m,
                          "datasets": [{"folder_path": str(tmp_path)}]}, require_datasets=False).model

    m = model(family="wan22_14b", path="/m/high.safetensors", low_noise_path="low.safetensors")
    assert m.low_noise_path.endswith("low.safetensors") and m.path == "/m/high.safetensors"
    with pytest.raises(JobError, match="model.low_noise_path.*give the low-noise expert file"):
        model(family="wan22_14b_i2v", path="/m/high.safetensors")
    with pytest.raises(JobError, match="model.low_noise_path.*wan21 has one denoiser"):
        model(family="wan21", path="/m/a.safetensors", low_noise_path="/m/b.safetensors")
    with pytest.raises(JobError, match="a diffusers folder holds both experts"):
        model(family="wan22_14b", path="/m/folder", low_noise_path="/m/b.safetensors")
    assert model(family="wan22_14b", path="/m/folder").low_noise_path is None


# ---------------------------------------------------------------------------------------------- Wan 2.2 VAE file


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    vae = tiny_wan22_vae(seed=2)
    path = tmp_path_factory.mktemp("vae22") / "wan2.2_vae.safetensors"
    save_file(native_wan22_vae_state(vae), str(path))
    return path, vae


def test_wan22_vae_file_equals_the_diffusers_vae(vae_file, tmp_path):
    path, reference = vae_file
    vae = load_wan22_vae_file(path)
    assert_same_weights(vae, reference)
    assert vae.config.latents_mean == reference.config.latents_mean and len(vae.config.latents_std) == 48
    assert (vae.config.z_dim, vae.config.patch_size, vae.config.scale_factor_spatial, vae.config.is_residual) == \
        (48, 2, 16, True)
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(pixels).latent_dist.mode(), reference.encode(pixels).latent_dist.mode())
    from trainer.families.single_file import load_wan_vae_file

    wan21 = tmp_path / "wan_2.1_vae.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1), "decoder.head.0.gamma":
               torch.ones(4, 1, 1, 1), "encoder.conv1.weight": torch.ones(4, 3, 3, 3, 3)}, str(wan21))
    with pytest.raises(ModelError, match="is the Wan 2.1 VAE.*needs the Wan 2.2 VAE"):
        load_wan22_vae_file(wan21)
    with pytest.raises(ModelError, match="only Wan 2.2 TI2V-5B uses.*Wan 2.2 A14B models need the Wan 2.1 VAE"):
        load_wan_vae_file(path)


# ---------------------------------------------------------------------------------------------- TI2V-5B


@pytest.fixture(scope="module")
def ti2v_files(tiny_wan22_5b_path, vae_file, tmp_path_factory):
    """A tiny 5B folder whose VAE is the released Wan 2.2 VAE architecture (tiny widths), and the same weights as
    ComfyUI files: the transformer (diffusion_models) and the VAE (vae)."""
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("ti2v")
    folder = root / "folder"
    shutil.copytree(tiny_wan22_5b_path, folder)
    shutil.rmtree(folder / "vae")
    vae_path, vae = vae_file
    vae.save_pretrained(folder / "vae")
    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
    model_file = root / "wan2.2_ti2v_tiny.safetensors"
    save_file(native_state_dict(transformer), str(model_file))
    return folder, model_file, vae_path


def test_ti2v_from_files_equals_the_folder_and_trains_identically(ti2v_files, tmp_path):
    folder, model_file, vae_path = ti2v_files
    cls = get_family("wan22_5b")
    reference = cls.load(str(folder), torch.float32)
    family = cls.from_single_file(str(model_file), torch.float32, config=folder / "transformer",
                                  encoders_from=folder, vae_file=vae_path)
    assert family.name == "wan22_5b" and family.flow_shift == reference.flow_shift == 5.0
    assert family.resolution_factor == reference.resolution_factor == 32 and family.temporal_factor == 4
    assert_same_weights(family.denoiser, reference.denoiser)
    assert_same_weights(family.loaded.vae, reference.loaded.vae)
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    ours, theirs = family.encode_pixels(pixels, i2v=True), reference.encode_pixels(pixels, i2v=True)
    for key in ("latents", "first_frame_latents", "i2v"):
        assert torch.equal(ours[key], theirs[key]), key
    data = clips(tmp_path)
    folder_run = train(job_for(tmp_path, "folder", "wan22_5b", folder, data), family=reference)
    file_run = train(job_for(tmp_path, "file", "wan22_5b", folder, data), family=family)
    losses = [r["loss"] for r in folder_run.records]
    assert len(losses) == 6 and losses == [r["loss"] for r in file_run.records]


def test_ti2v_uses_comfyui_style_vae_for_latents_and_first_frame(ti2v_files):
    """A duck-typed ComfyUI VAE (IMAGE frames [F, H, W, 3] in [0, 1] -> raw posterior mean, as comfy.sd.VAE.encode
    with the Wan 2.2 VAE) through the wan22_5b adapter gives the pipeline's normalized latents, for the clip and
    for the first frame alone; the family calls it for both."""
    folder, model_file, vae_path = ti2v_files
    diffusers_vae = load_wan22_vae_file(vae_path)

    class ComfyLikeVAE:
        latent_channels = 48
        first_stage_model = diffusers_vae
        calls = 0

        def encode(self, frames):
            type(self).calls += 1
            x = (frames * 2 - 1).permute(3, 0, 1, 2)[None]
            with torch.no_grad():
                return diffusers_vae.encode(x).latent_dist.mode()

    encoders = for_family("wan22_5b", vae=ComfyLikeVAE())
    assert isinstance(encoders, ExternalEncoders) and encoders.spatial_factor == 16 and encoders.encode_prompts is None
    cls = get_family("wan22_5b")
    reference = cls.load(str(folder), torch.float32)
    family = cls.from_single_file(str(model_file), torch.float32, config=folder / "transformer",
                                  encoders_from=folder, encoders=encoders)
    assert family.loaded.vae is None and family.resolution_factor == 32
    pixels = (torch.rand(1, 3, 5, 32, 64) * 255).round() / 127.5 - 1
    ours, theirs = family.encode_pixels(pixels, i2v=True), reference.encode_pixels(pixels, i2v=True)
    assert ComfyLikeVAE.calls == 2  # the clip and its first frame: both through the ComfyUI VAE
    for key in ("latents", "first_frame_latents"):
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), (key, (ours[key] - theirs[key]).abs().max())
    with pytest.raises(ValueError, match="needs the Wan 2.2 VAE"):
        for_family("wan22_5b", vae=type("V", (), {"latent_channels": 16})())
    with pytest.raises(ValueError, match="needs the Wan 2.1 VAE"):
        for_family("wan22_14b", vae=ComfyLikeVAE())
    with pytest.raises(ValueError, match="no CLIP image encoder"):
        for_family("wan22_14b_i2v", clip_vision=object())


# ---------------------------------------------------------------------------------------------- A14B pairs


def test_a14b_pair_from_files_equals_the_folder_and_trains_identically(tiny_wan22_14b_path, tmp_path):
    high, low = expert_files(tmp_path, tiny_wan22_14b_path)
    cls = get_family("wan22_14b")
    reference = cls.load(str(tiny_wan22_14b_path), torch.float32)
    family = cls.from_single_file(str(high), torch.float32, config=tiny_wan22_14b_path / "transformer",
                                  encoders_from=tiny_wan22_14b_path, low_noise_path=low)
    assert family.name == "wan22_14b" and family.active_expert == "high_noise"
    assert family.boundary_ratio == reference.boundary_ratio == 0.875 and family.flow_shift == reference.flow_shift
    for expert in ("high_noise", "low_noise"):
        assert_same_weights(family.experts[expert], reference.experts[expert])
    assert not any(p.requires_grad for e in family.experts.values() for p in e.parameters())
    data = clips(tmp_path)
    folder_run = train(job_for(tmp_path, "folder", "wan22_14b", tiny_wan22_14b_path, data), family=reference)
    # the job-file path (python -m trainer run): the loop loads the pair itself from model.path + low_noise_path
    file_run = train(job_for(tmp_path, "file", "wan22_14b", high, data, low_noise_path=str(low),
                             config=str(tiny_wan22_14b_path / "transformer"), encoders_from=str(tiny_wan22_14b_path)))
    assert [r.get("expert") for r in file_run.records] == ["high_noise"] * 3 + ["low_noise"] * 3
    assert [r["loss"] for r in folder_run.records] == [r["loss"] for r in file_run.records]
    assert set(file_run.lora_paths) == {"high_noise", "low_noise"}


def test_a14b_i2v_pair_from_files_and_a_wan21_folder_for_encoders(tiny_wan22_14b_i2v_path, tiny_wan21_path,
                                                                    tiny_wan22_5b_path, tmp_path):
    high, low = expert_files(tmp_path, tiny_wan22_14b_i2v_path)
    cls = get_family("wan22_14b_i2v")
    reference = cls.load(str(tiny_wan22_14b_i2v_path), torch.float32)
    family = load_single_file(high, torch.float32, config=tiny_wan22_14b_i2v_path / "transformer",
                              encoders_from=tiny_wan22_14b_i2v_path, low_noise_path=low)  # no family: the pair says
    assert family.name == "wan22_14b_i2v" and family.boundary_ratio == 0.9 and not family.uses_clip
    for expert in ("high_noise", "low_noise"):
        assert_same_weights(family.experts[expert], reference.experts[expert])
    pixels = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    ours, theirs = family.encode_pixels(pixels), reference.encode_pixels(pixels)
    assert torch.equal(ours["image_condition"], theirs["image_condition"])
    # the umt5 and Wan 2.1 VAE of a Wan 2.1 folder serve as well; shift and boundary are then the released ones
    other = load_single_file(high, torch.float32, config=tiny_wan22_14b_i2v_path / "transformer",
                             encoders_from=tiny_wan21_path, family="wan22_14b_i2v", low_noise_path=low)
    assert other.boundary_ratio == 0.9 and other.flow_shift == 3.0
    with pytest.raises(ModelError, match="wan22_5b"):
        load_single_file(high, torch.float32, config=tiny_wan22_14b_i2v_path / "transformer", family="wan22_14b_i2v",
                         encoders_from=tiny_wan22_5b_path, low_noise_path=low)


def test_node_spec_and_job_mapping_carry_the_low_noise_file(tiny_wan22_14b_path, tmp_path):
    from trainer import comfy_bridge as cb
    from trainer.comfy_bridge import Dataset

    high, low = expert_files(tmp_path, tiny_wan22_14b_path, names=("t2v_high_noise", "t2v_low_noise"))
    config = str(tiny_wan22_14b_path / "transformer")
    spec = cb.single_file_model(high, "fp32", config, low_noise_path=low)
    assert spec["family"] == "wan22_14b" and spec["low_noise_path"] == str(low)
    mapping = cb.build_job_mapping(job_name="j", model={**spec, "encoders_from": str(tiny_wan22_14b_path)},
                                   dataset=Dataset(configs=({"folder_path": "/x"},)),
                                   network={"linear": 4, "linear_alpha": 4}, schedule=None, train={"steps": 2},
                                   output_dir=tmp_path, resume=False, save_every=10)
    assert mapping["model"]["low_noise_path"] == str(low) and mapping["model"]["family"] == "wan22_14b"
    assert parse_job(mapping, require_datasets=False).model.low_noise_path == str(low)
    family = cb.load_model_for_nodes({**spec, "encoders_from": str(tiny_wan22_14b_path)}, torch.float32)
    assert family.name == "wan22_14b" and set(family.experts) == {"high_noise", "low_noise"}

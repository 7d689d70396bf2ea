"""Single-file (ComfyUI-format) Wan models: variant detection from shapes, strict loading with diffusers' key
conversion, the shipped configs, the errors, and training equivalence with the diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from family_helpers import header_only_file, meta_shapes, native_state_dict
from fixtures_models import tiny_wan21_path  # noqa: F401
from tests.media import textured_frames, write_caption, write_video
from trainer.errors import ModelError
from trainer.families import get_family
from trainer.families.single_file import (
    CONFIG_DIR,
    detect_variant,
    known_variants,
    load_single_file,
    wan_facts_from_config,
)
from trainer.job import parse_job
from trainer.loop import train


@pytest.fixture(scope="module")
def tiny_native_file(tiny_wan21_path, tmp_path_factory):
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(tiny_wan21_path, subfolder="transformer")
    path = tmp_path_factory.mktemp("single") / "tiny_wan.safetensors"
    save_file(native_state_dict(transformer, "model.diffusion_model."), str(path))
    return path, transformer


# ---------------------------------------------------------------------------------------------- shipped configs


def test_every_shipped_variant_is_detected_from_its_shapes(tmp_path):
    variants = known_variants()
    assert {v.name for v in variants} >= {"wan21_t2v_1.3b", "wan21_t2v_14b", "wan21_i2v_14b"}
    facts = [json.dumps(wan_facts_from_config(v.config), sort_keys=True) for v in variants]
    # by design the only shared shapes: a Wan 2.2 A14B T2V expert is Wan 2.1 T2V 14B (the family tells them apart)
    shared = {v.name for v, f in zip(variants, facts) if facts.count(f) > 1}
    assert shared <= {"wan21_t2v_14b", "wan22_t2v_a14b"}, "two shipped variants would be indistinguishable"
    sizes = {}
    for v in variants:
        shapes, model = meta_shapes(v.config, prefix="" if "t2v" in v.name else "model.diffusion_model.")
        sizes[v.name] = sum(p.numel() for p in model.parameters())
        file = tmp_path / f"{v.name}.safetensors"
        header_only_file(file, shapes)
        found = detect_variant(file, family=v.family)
        assert found.name == v.name and found.family == v.family
        assert get_family(found.family).name == v.family
    # the released sizes: 1.3B T2V ~1.42e9 params, 14B T2V ~14.3e9, 14B I2V (image branch) ~16.4e9
    assert 1.3e9 < sizes["wan21_t2v_1.3b"] < 1.5e9
    assert 13.5e9 < sizes["wan21_t2v_14b"] < 15e9
    assert 14.5e9 < sizes["wan21_i2v_14b"] < 17e9


def test_shipped_configs_are_architecture_facts_only():
    for path in CONFIG_DIR.glob("*.json"):
        assert path.stat().st_size < 4096, path
        doc = json.loads(path.read_text())
        assert set(doc) <= {"name", "family", "description", "source", "component", "flow_shift", "config"}
        assert doc["config"]["_class_name"] == "WanTransformer3DModel"


# ---------------------------------------------------------------------------------------------- loading


def test_tiny_file_loads_exactly_with_its_config(tiny_native_file, tiny_wan21_path):
    path, reference = tiny_native_file
    family = load_single_file(path, torch.float32, config=tiny_wan21_path / "transformer",
                              encoders_from=tiny_wan21_path)
    assert family.name == "wan21" and family.loaded.extra["variant"] == "custom"
    got, want = family.denoiser.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 4)
    text = torch.randn(1, 8, reference.config.text_dim)
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert torch.equal(family.denoiser(x, t, text, return_dict=False)[0],
                           reference(x, t, text, return_dict=False)[0])
    assert family.flow_shift == 3.0  # the encoders folder's scheduler
    assert family.resolution_factor == 16 and family.temporal_factor == 4


def test_from_single_file_classmethod_and_dtype(tiny_native_file, tiny_wan21_path):
    path, reference = tiny_native_file
    family = get_family("wan21").from_single_file(str(path), torch.bfloat16, config=tiny_wan21_path / "transformer",
                                                  encoders_from=tiny_wan21_path)
    # the dtypes diffusers' from_pretrained(torch_dtype=bf16) gives the folder: _keep_in_fp32_modules stay fp32
    folder = get_family("wan21").load(str(tiny_wan21_path), torch.bfloat16)
    want = {k: v.dtype for k, v in folder.denoiser.state_dict().items()}
    assert {k: v.dtype for k, v in family.denoiser.state_dict().items()} == want
    assert torch.float32 in want.values() and torch.bfloat16 in want.values()
    assert not any(p.requires_grad for p in family.denoiser.parameters())
    with pytest.raises(ModelError, match="wan21_i2v"):
        get_family("wan21_i2v").from_single_file(str(path), torch.float32, config=tiny_wan21_path / "transformer",
                                                 encoders_from=tiny_wan21_path)


def test_unknown_size_lists_what_was_found(tiny_native_file):
    path, _ = tiny_native_file
    with pytest.raises(ModelError) as err:
        detect_variant(path)
    text = str(err.value)
    assert str(path) in text and "matches no known variant" in text
    assert "dim=24" in text and "num_layers=2" in text and "in_channels=16" in text and "text_dim=32" in text
    assert "wan21_t2v_1.3b: dim=1536" in text and "wan21_t2v_14b: dim=5120" in text


def test_config_mismatch_names_the_differences(tiny_native_file, tiny_wan21_path):
    path, _ = tiny_native_file
    cfg = json.loads((tiny_wan21_path / "transformer" / "config.json").read_text())
    cfg["num_layers"] = 3
    with pytest.raises(ModelError, match="num_layers: file 2 vs config 3"):
        detect_variant(path, config=cfg)


def test_wrong_files_fail_before_loading(tmp_path, tiny_wan21_path):
    sd_unet = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sd_unet))
    with pytest.raises(ModelError, match="not a model file the trainer knows"):
        detect_variant(sd_unet)
    with pytest.raises(ModelError, match="only .safetensors"):
        detect_variant(tmp_path / "model.ckpt")
    with pytest.raises(ModelError, match="no such file"):
        detect_variant(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        detect_variant(garbage)
    shapes, _ = meta_shapes(known_variants()[0].config)
    vace = tmp_path / "vace.safetensors"
    header_only_file(vace, {**shapes, "vace_blocks.0.after_proj.bias": (1536,)})
    with pytest.raises(ModelError, match="VACE"):
        detect_variant(vace)


def test_unsupported_quantization_and_missing_encoders_are_refused(tiny_native_file, tiny_wan21_path, tmp_path):
    path, reference = tiny_native_file
    cfg = tiny_wan21_path / "transformer"
    with pytest.raises(ModelError, match="holds only the transformer.*CLIP.*VAE"):
        load_single_file(path, torch.float32, config=cfg)
    # scaled-fp8 files load dequantized (tests/test_single_file_fp8.py); block-scaled formats are refused by name
    sd = native_state_dict(reference)
    quant = json.dumps({"format": "nvfp4"}).encode()
    sd["blocks.0.ffn.0.comfy_quant"] = torch.tensor(list(quant), dtype=torch.uint8)
    sd["blocks.0.ffn.0.weight_scale_2"] = torch.tensor(1.0)
    scaled = tmp_path / "nvfp4.safetensors"
    save_file(sd, str(scaled))
    with pytest.raises(ModelError, match=r"quantized as nvfp4 \(ComfyUI's mixed-precision format"):
        load_single_file(scaled, torch.float32, config=cfg, encoders_from=tiny_wan21_path)


def test_plain_fp8_file_is_upcast(tiny_native_file, tiny_wan21_path, tmp_path):
    path, reference = tiny_native_file
    fp8 = tmp_path / "fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in native_state_dict(reference).items()}, str(fp8))
    family = load_single_file(fp8, torch.float32, config=tiny_wan21_path / "transformer",
                              encoders_from=tiny_wan21_path)
    want = {k: v.to(torch.float8_e4m3fn).float() for k, v in reference.state_dict().items()}
    for k, v in family.denoiser.state_dict().items():
        assert torch.equal(v, want[k]), k


# ---------------------------------------------------------------------------------------------- training


def test_training_from_single_file_equals_training_from_folder(tiny_native_file, tiny_wan21_path, tmp_path):
    path, _ = tiny_native_file
    data = tmp_path / "clips"
    write_video(data / "clip.mp4", textured_frames(8, 32, 32), num_frames=8, width=32, height=32, gop=4)
    write_caption(data / "clip.mp4", "waves rolling")

    def job(name):
        return parse_job({
            "job": name, "output_dir": str(tmp_path / name),
            "model": {"family": "wan21", "path": str(tiny_wan21_path), "dtype": "fp32"},
            "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
            "network": {"linear": 4, "linear_alpha": 4},
            "train": {"steps": 12, "batch_size": 1, "lr": 1e-3, "seed": 5},
            "save": {"every": 100, "resume": "none"},
        })

    folder_run = train(job("folder"))
    single = load_single_file(path, torch.float32, config=tiny_wan21_path / "transformer",
                              encoders_from=tiny_wan21_path)
    file_run = train(job("file"), family=single)
    losses_a = [r["loss"] for r in folder_run.records]
    losses_b = [r["loss"] for r in file_run.records]
    assert len(losses_a) == 12
    assert losses_a == pytest.approx(losses_b, rel=1e-5, abs=1e-7)
    # the same from a job file alone (what `python -m trainer run` and Export Job use)
    cli_job = job("cli")
    cli_job.model.path = str(path)
    cli_job.model.config = str(tiny_wan21_path / "transformer")
    cli_job.model.encoders_from = str(tiny_wan21_path)
    cli_run = train(cli_job)
    assert [r["loss"] for r in cli_run.records] == pytest.approx(losses_a, rel=1e-5, abs=1e-7)
    for k, v in folder_run.lora_state.items():
        assert torch.allclose(v, file_run.lora_state[k], rtol=1e-4, atol=1e-6), k


def test_bf16_training_from_single_file_equals_the_folder(tiny_native_file, tiny_wan21_path, tmp_path):
    # bf16: the folder keeps diffusers' _keep_in_fp32_modules in fp32 and so must the file (cast all to bf16, the
    # losses differed by up to 1.7e-3 within 6 steps)
    path, _ = tiny_native_file
    data = tmp_path / "clips"
    write_video(data / "clip.mp4", textured_frames(8, 32, 32), num_frames=8, width=32, height=32, gop=4)
    write_caption(data / "clip.mp4", "waves rolling")

    def job(name, model_path, **model):
        return parse_job({
            "job": name, "output_dir": str(tmp_path / name),
            "model": {"family": "wan21", "path": str(model_path), "dtype": "bf16", **model},
            "datasets": [{"folder_path": str(data), "resolution": [32], "num_frames": 5}],
            "network": {"linear": 4, "linear_alpha": 4},
            "train": {"steps": 6, "batch_size": 1, "lr": 1e-3, "seed": 5},
            "save": {"every": 100, "resume": "none"},
        })

    folder_run = train(job("folder", tiny_wan21_path))
    file_run = train(job("file", path, config=str(tiny_wan21_path / "transformer"),
                         encoders_from=str(tiny_wan21_path)))
    assert [r["loss"] for r in file_run.records] == [r["loss"] for r in folder_run.records]


# ---------------------------------------------------------------------------------------------- node helpers


def test_node_helpers_list_resolve_and_spec(tiny_native_file, tiny_wan21_path, tmp_path):
    from trainer import comfy_bridge as cb

    listing = {"diffusion_models": ["b.safetensors", "a.gguf", "sub/c.safetensors"],
               "checkpoints": ["b.safetensors"]}
    assert cb.model_file_choices(listing) == ["checkpoints/b.safetensors", "diffusion_models/b.safetensors",
                                              "diffusion_models/sub/c.safetensors"]
    path, _ = tiny_native_file
    full = {("diffusion_models", "tiny.safetensors"): str(path)}
    assert cb.resolve_model_file("diffusion_models/tiny.safetensors", lambda f, n: full.get((f, n))) == path
    from trainer.errors import JobError
    with pytest.raises(JobError, match="not in ComfyUI's models/diffusion_models"):
        cb.resolve_model_file("diffusion_models/gone.safetensors", lambda f, n: None)
    with pytest.raises(JobError, match="pick one"):
        cb.resolve_model_file("loras/x.safetensors", lambda f, n: None)

    with pytest.raises(ModelError, match="matches no known variant"):
        cb.single_file_model(path, "fp32")
    spec = cb.single_file_model(path, "fp32", str(tiny_wan21_path / "transformer"))
    assert spec["family"] == "wan21" and spec["single_file"]["variant"] == "custom"
    from trainer.comfy_bridge import Dataset
    mapping = cb.build_job_mapping(job_name="j", model=spec, dataset=Dataset(configs=({"folder_path": "/x"},)),
                                   network={"linear": 4, "linear_alpha": 4}, schedule=None, train={"steps": 2},
                                   output_dir=tmp_path, resume=False, save_every=10)
    # the job file names the file and the config it needs; the node-only spec stays out
    assert mapping["model"] == {"family": "wan21", "path": str(path), "dtype": "fp32",
                                "config": str(tiny_wan21_path / "transformer")}
    assert parse_job(mapping, require_datasets=False).model.config == str(tiny_wan21_path / "transformer")


# ---------------------------------------------------------------------------------------------- ComfyUI conventions


def test_comfy_text_conversions_match_the_pipeline_conventions():
    from trainer.comfy_encoders import escape_comfy_weights, truncate_comfy_tokens, wan_text_from_comfy

    assert escape_comfy_weights(r"a (red:1.2) car \ x") == r"a \(red:1.2\) car \ x"
    long = {"umt5xxl": [[(7 + i, 1.0) for i in range(600)] + [(1, 1.0)] + [(0, 1.0)] * 3]}
    tokens, count = truncate_comfy_tokens(long, 512)
    seq = tokens["umt5xxl"][0]
    assert count == 512 and len(seq) == 512 and seq[510][0] == 7 + 510 and seq[511][0] == 1  # 511 + </s>
    short = {"umt5xxl": [[(9, 1.0), (8, 1.0), (1, 1.0)] + [(0, 1.0)] * 509]}
    tokens, count = truncate_comfy_tokens(short, 512)
    assert count == 3 and [t[0] for t in tokens["umt5xxl"][0][:4]] == [9, 8, 1, 0] and len(tokens["umt5xxl"][0]) == 512
    cond = torch.randn(1, 520, 6)
    out = wan_text_from_comfy(cond, 3, 512)
    assert out.shape == (512, 6) and torch.equal(out[:3], cond[0, :3]) and not out[3:].any()


def test_comfy_pixel_conversions():
    from diffusers import AutoencoderKLWan

    from trainer.comfy_encoders import normalize_wan_latents, wan_pixels_to_comfy

    pixels = torch.rand(2, 3, 5, 8, 16) * 2 - 1
    frames = wan_pixels_to_comfy(pixels)
    assert len(frames) == 2 and frames[0].shape == (5, 8, 16, 3)
    assert torch.allclose(frames[1][2, 3, 4], (pixels[1, :, 2, 3, 4] + 1) / 2)
    cfg = AutoencoderKLWan().config  # the Wan 2.1 VAE's statistics
    raw = torch.randn(1, 16, 2, 3, 3)
    mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    assert torch.allclose(normalize_wan_latents(raw), (raw - mean) / std)

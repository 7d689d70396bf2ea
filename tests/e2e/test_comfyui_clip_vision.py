"""Wan 2.1 I2V from ComfyUI-format files only, CLIP vision included, in a real ComfyUI (COMFYUI_ROOT; skips
cleanly without it).

A tiny CLIP ViT-H-shaped vision tower exists twice from the same fp16 weights: as the models/clip_vision file a
ComfyUI user has (clip_vision_h.safetensors layout, loaded by CLIPVisionLoader's code path) and as a diffusers
image_encoder. Checked:
- first frames through ComfyUI's CLIP vision and trainer.comfy_encoders (the wan21_i2v adapter) give the family's
  image embeddings (WanImageToVideoPipeline.encode_image) -- and ComfyUI's own preprocessing does not;
- a graph of Load Training Model (ComfyUI file) + CLIPLoader + VAELoader + CLIPVisionLoader + dataset + network
  + schedule + Train trains, with no diffusers folder, the same loss curve as Load Training Model (diffusers
  folder) of the same weights (same seed, CPU, float32); without the CLIP vision input it is refused by name.

ComfyUI builds its CLIP vision from a fixed ViT-H config whatever the file holds; tests/e2e/comfy_tiny_clip_vision
(a test-only node pack) points that one construction at the tiny model's config, see tiny_clip_vision.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.e2e import comfy_env
from tests.e2e.test_comfyui_single_file import TE_FILE, VAE_FILE, _graph, _losses, _run, _with_defaults

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WAN_FILE = "tiny_wan_i2v.safetensors"
CV_FILE = "tiny_clip_vision_h.safetensors"
WAN_FOLDER = "tiny-wan21-i2v-diffusers"
CLIPS = "my_clips"


def first_frames() -> list[np.ndarray]:
    """First frames of the sizes a dataset gives: smaller than the 224 crop, larger, portrait, a smooth ramp; the
    last one is already 224x224 (no resize)."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    smooth = np.stack([np.add.outer(ramp[:80], ramp[:96]) / 2] * 3, -1).astype(np.uint8)
    return [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), rng.integers(0, 256, (300, 260, 3), dtype=np.uint8),
            smooth, rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)]


def tiny_wan_i2v_transformer(seed: int = 0):
    """A Wan 2.1 I2V-shaped transformer (in_channels 36, CLIP image branch) for the tiny umt5 (text_dim 4096)
    and the tiny CLIP vision (width 16)."""
    from diffusers import WanTransformer3DModel

    from tests.e2e.tiny_clip_vision import WIDTH

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", image_dim=WIDTH, added_kv_proj_dim=24, rope_max_seq_len=32,
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny weights as ComfyUI files (under a ComfyUI base dir) and as a WanImageToVideoPipeline folder."""
    root, python = comfy_env.require_comfyui()
    pytest.importorskip("google.protobuf", reason="transformers' SentencePiece converter needs protobuf")
    pytest.importorskip("sentencepiece")
    from safetensors.torch import save_file

    from tests.e2e.tiny_clip_vision import build_tiny_clip_vision
    from tests.e2e.tiny_models import save_safetensors, wan_native_state_dict
    from tests.e2e.tiny_text_encoder import build_tiny_umt5
    from trainer.families.single_file import load_wan_vae_file
    from trainer.tiny import build_tiny_wan21_i2v

    work = tmp_path_factory.mktemp("clip_vision")
    base = comfy_env.prepare_base_dir(work / "base", {"phase-trainer": REPO,
                                                      "comfy_tiny_umt5": HERE / "comfy_tiny_umt5",
                                                      "comfy_tiny_clip_vision": HERE / "comfy_tiny_clip_vision"})
    for sub in ("text_encoders", "vae", "clip_vision", "diffusers"):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    vision = build_tiny_clip_vision(work / "clip_vision")
    shutil.copy(vision["comfy_file"], base / "models" / "clip_vision" / CV_FILE)
    text = build_tiny_umt5(work / "umt5")
    shutil.copy(text["comfy_file"], base / "models" / "text_encoders" / TE_FILE)
    save_file({"pixels": torch.zeros(1, 3, 1, 16, 16)}, str(work / "pixels.safetensors"))
    _run([python, HERE / "comfy_vae_encode.py", work, work / "pixels.safetensors"], root)  # ComfyUI's WanVAE
    shutil.copy(work / "wan_vae.safetensors", base / "models" / "vae" / VAE_FILE)

    transformer = tiny_wan_i2v_transformer()
    save_safetensors(wan_native_state_dict(transformer), base / "models" / "diffusion_models" / WAN_FILE)
    folder = build_tiny_wan21_i2v(base / "models" / "diffusers" / WAN_FOLDER)
    for part in ("transformer", "text_encoder", "tokenizer", "vae", "image_encoder", "image_processor"):
        shutil.rmtree(folder / part)
    transformer.save_pretrained(folder / "transformer")
    shutil.copytree(text["text_encoder"], folder / "text_encoder")
    shutil.copytree(text["tokenizer"], folder / "tokenizer")
    shutil.copytree(vision["image_encoder"], folder / "image_encoder")
    shutil.copytree(vision["image_processor"], folder / "image_processor")
    load_wan_vae_file(work / "wan_vae.safetensors").save_pretrained(folder / "vae")

    from tests.e2e.test_comfyui_nodes import make_clip_folder

    make_clip_folder(base / "input" / CLIPS, count=2, frames=5, size=32)
    return {"root": root, "python": python, "base": base, "work": work, "folder": folder, "text": text,
            "vision": vision}


def test_comfyui_clip_vision_gives_the_family_image_embeddings(models):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionModel

    from trainer.families.base import LoadedModel
    from trainer.families.wan21_i2v import Wan21I2V, clip_image_processor_class

    work, vision = models["work"], models["vision"]
    images = first_frames()
    save_file({f"image{i}": torch.from_numpy(im) for i, im in enumerate(images)}, str(work / "frames.safetensors"))
    out = _run([models["python"], HERE / "comfy_clip_vision_encode.py", vision["comfy_file"], vision["comfy_config"],
                work / "clip_vision", work / "frames.safetensors", work / "comfy_image.safetensors"], models["root"])
    assert "CLIPVisionModelProjection" in out and "layers 32" in out, out  # ComfyUI's own class, ViT-H detected
    assert "real ViT-H config accepted: 224 layers 32 width 1280" in out, out  # clip_vision_h passes the check
    comfy = load_file(str(work / "comfy_image.safetensors"))
    scale = comfy["family"].abs().max().item()

    # In ComfyUI's process: the adapter vs the family's own encoder and processor (the same processor class).
    assert comfy["adapter"].shape == comfy["family"].shape == (4, 257, 16)
    same_process = (comfy["adapter"] - comfy["family"]).abs().max().item()
    print(f"max |adapter - family| in ComfyUI's python {same_process:.3e} (embedding max {scale:.2f})")
    assert same_process < 1e-5 * max(1.0, scale), same_process
    # ComfyUI's own resize (torch bicubic on floats) is not the pipeline's: the adapter's preprocessing matters.
    own = (comfy["comfy_own"] - comfy["family"]).abs().max().item()
    print(f"max |ComfyUI's own preprocessing - family| {own:.3e}")
    assert own > 100 * same_process

    # Here (the trainer's venv): the same weights and frames through the family.
    encoder = CLIPVisionModel.from_pretrained(vision["image_encoder"], torch_dtype=torch.float32).eval()
    processor = clip_image_processor_class().from_pretrained(vision["image_processor"])
    family = Wan21I2V(LoadedModel(denoiser=torch.nn.Identity(), extra={
        "dtype": torch.float32, "image_encoder": encoder, "image_processor": processor}))
    ours = torch.cat([family.encode_first_frame_clip(
        (torch.from_numpy(im).permute(2, 0, 1).float() / 127.5 - 1.0)[None, :, None]) for im in images])
    across = (ours - comfy["adapter"]).abs().max().item()
    unresized = (ours[3] - comfy["adapter"][3]).abs().max().item()
    print(f"max |adapter in ComfyUI - family here ({type(processor).__name__})| {across:.3e}, "
          f"{unresized:.3e} for the frame already at 224")
    # transformers 5 would pick its torchvision image-processor backend in ComfyUI's venv and PIL here; the family
    # pins PIL, so the first-frame embeddings agree across the two environments, resized or not.
    assert unresized < 1e-5 * max(1.0, scale), unresized
    assert across < 1e-5 * max(1.0, scale), across


def _start(models) -> comfy_env.ComfyServer:
    extra_env = {"OMP_NUM_THREADS": "1", "PT_TINY_UMT5_CONFIG": str(models["text"]["comfy_config"]),
                 "PT_TINY_CLIP_VISION_CONFIG": str(models["vision"]["comfy_config"])}
    return comfy_env.start_server(models["base"], root=models["root"], python=models["python"], env=extra_env)


def test_graph_of_comfyui_files_with_clip_vision_matches_the_diffusers_folder(models):
    base = models["base"]
    config = models["folder"] / "transformer" / "config.json"  # tiny size: no released variant matches
    file_model = {"class_type": "PhaseTrainerLoadModelFile", "inputs": {
        "model_file": f"diffusion_models/{WAN_FILE}", "dtype": "fp32", "config": str(config)}}
    folder_model = {"class_type": "PhaseTrainerLoadModel", "inputs": {
        "family": "wan21_i2v", "diffusers_folder": WAN_FOLDER, "dtype": "fp32"}}
    from_files = _graph(file_model, job="i2v_from_files", encoders=True)
    from_files["9"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CV_FILE}}
    from_files["8"]["inputs"]["clip_vision"] = ["9", 0]
    no_vision = _graph(file_model, job="i2v_no_vision", encoders=True)
    with _start(models) as server:
        info = server.object_info()
        assert "CLIPVisionLoader" in info and info["PhaseTrainerTrain"]["input"]["optional"]["clip_vision"]
        with pytest.raises(comfy_env.ComfyUIError, match="connect ComfyUI.s CLIP vision"):
            server.run_prompt(_with_defaults(no_vision, info), timeout=900)
        server.run_prompt(_with_defaults(from_files, info), timeout=900)
        server.run_prompt(_with_defaults(_graph(folder_model, job="i2v_from_folder", encoders=False), info),
                          timeout=900)
    files_curve, folder_curve = _losses(base, "i2v_from_files"), _losses(base, "i2v_from_folder")
    print("loss from ComfyUI files:", files_curve)
    print("loss from diffusers folder:", folder_curve)
    assert len(files_curve) == len(folder_curve) == 6
    worst = max(abs(a - b) for a, b in zip(files_curve, folder_curve))
    print(f"max |loss difference| {worst:.3e}")
    assert worst < 1e-4 * max(1.0, max(folder_curve)), worst
    assert len(set(round(x, 6) for x in files_curve)) > 1  # a real curve, not one repeated value
    loras = sorted(p for p in (base / "models" / "loras").glob("i2v_from_files*.safetensors") if "_step" not in p.name)
    assert loras, sorted(p.name for p in (base / "models" / "loras").iterdir())
    from safetensors.torch import load_file

    keys = load_file(str(loras[-1]))
    assert any(".cross_attn.k_img." in k for k in keys)  # the image cross-attention was trained too

"""ComfyUI's own SD 1.5 / SDXL CLIP and VAE, through trainer.comfy_encoders, give the tensors the sd15 / sdxl
families' own encoders give (real ComfyUI, COMFYUI_ROOT; skips cleanly without it; the conversion functions
themselves are tests/test_comfy_encoders_sd.py).

A checkpoint ComfyUI loads (tests/e2e/sd_checkpoints.py: full-size random CLIP towers and VAE, a small UNet, fp16)
is loaded by ComfyUI's CheckpointLoaderSimple code path under ComfyUI's python (comfy_sd_encode.py), which
encodes captions and images with the adapter; the library loads the same file with diffusers' conversions and
encodes them as StableDiffusionPipeline / StableDiffusionXLPipeline would, with ComfyUI's comfy/sd1_tokenizer.
The captions include weight syntax and backslashes, a caption longer than 77 tokens and an empty one; both
sides compute in float32 from the same fp16 weights."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e import comfy_env
from tests.e2e.sd_checkpoints import build_checkpoint

SCRIPT = comfy_env.Path(__file__).with_name("comfy_sd_encode.py")
LONG = "a photo of a small grey cat sitting on a red mat next to a window, " * 8  # ~130 tokens
CAPTIONS = ["a photo of a red car", r"a (red:1.3) car, ((blue)) sky, \(literal\) a\b [x] {y}", LONG, ""]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("family_name", ["sd15", "sdxl"])
def test_comfyui_clip_and_vae_give_the_family_encodings(family_name, tmp_path, tmp_path_factory):
    from trainer.families.single_file import load_single_file

    root, python = comfy_env.require_comfyui()
    ckpt = build_checkpoint(family_name, tmp_path_factory.getbasetemp() / "sd_checkpoints")
    torch.manual_seed(3)
    pixels = torch.rand(2, 3, 1, 64, 48) * 2 - 1
    save_file({"pixels": pixels}, str(tmp_path / "pixels.safetensors"))
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    out = tmp_path / "comfy.safetensors"
    run = subprocess.run([str(python), str(SCRIPT), family_name, str(ckpt["path"]), str(tmp_path / "captions.json"),
                          str(tmp_path / "pixels.safetensors"), str(out)],
                         cwd=root, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout.strip())
    comfy = load_file(str(out))

    family = load_single_file(ckpt["path"], torch.float32, config=ckpt["config"], family=family_name,
                              tokenizer_from=root / "comfy" / "sd1_tokenizer")
    ours = family.encode_prompts(CAPTIONS)
    latents = family.encode_pixels(pixels)
    del family

    width = 768 if family_name == "sd15" else 2048
    report = {}
    for i, item in enumerate(ours):
        hidden = item["encoder_hidden_states"]
        assert comfy[f"h{i}"].shape == hidden.shape == (77, width)
        report[f"hidden[{i}]"] = max_diff(comfy[f"h{i}"], hidden)
        assert report[f"hidden[{i}]"] < 2e-4 * max(1.0, float(hidden.abs().max())), (i, report)
        # CLIPSetLastLayer at the pipeline's own layer gives the same tensors
        assert max_diff(comfy[f"last{i}"], comfy[f"h{i}"]) < 1e-6
        if family_name == "sdxl":
            report[f"pooled[{i}]"] = max_diff(comfy[f"p{i}"], item["text_embeds"])
            assert comfy[f"p{i}"].shape == item["text_embeds"].shape == (1280,)
            assert report[f"pooled[{i}]"] < 2e-4 * max(1.0, float(item["text_embeds"].abs().max())), report
    # distinct captions give distinct encodings (not a degenerate encoder)
    assert max_diff(ours[0]["encoder_hidden_states"], ours[1]["encoder_hidden_states"]) > 1e-2
    # what the adapter changes: a plain CLIPTextEncode reads the weights and encodes every 77-token chunk
    assert comfy["raw1"].shape[0] == 77 and max_diff(comfy["raw1"], ours[1]["encoder_hidden_states"]) > 1e-2
    assert comfy["raw2"].shape[0] == 154
    assert max_diff(comfy["raw0"], ours[0]["encoder_hidden_states"]) < 2e-4 * max(
        1.0, float(ours[0]["encoder_hidden_states"].abs().max()))
    # CLIPSetLastLayer at another layer is refused
    assert int(comfy["refused"][0]) == 1

    assert comfy["latents"].shape == latents.shape == (2, 4, 8, 6)
    report["latents"] = max_diff(comfy["latents"], latents)
    print(f"{family_name}: max |comfy - family|: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items())
          + f" (hidden |max| {float(ours[0]['encoder_hidden_states'].abs().max()):.2f}, latent std "
          f"{float(latents.std()):.3f})")
    assert report["latents"] < 1e-4 * max(1.0, float(latents.abs().max())), report
    assert latents.std() > 0.01

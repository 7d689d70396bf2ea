"""FLUX.1 with real ComfyUI (COMFYUI_ROOT-gated; the conversions themselves are tested in
tests/test_single_file_flux.py):

- ComfyUI's DualCLIPLoader-type-flux CLIP (clip_l + t5xxl files) and VAELoader VAE (ae.safetensors), through
  trainer.comfy_encoders' flux adapter, give the tensors the Flux family's own encoders give (FluxPipeline's:
  T5 hidden states padded to max_sequence_length, CLIP-L pooled output, (z - shift) * scale latents);
- a Flux file in BFL's layout loads through the Load Training Model (ComfyUI file) node's path
  (comfy_bridge.single_file_model / load_model_for_nodes) bit for bit, and the LoRA the trainer exports for it
  applies to the same file in ComfyUI with no ignored key and exactly the intended weight change;
- in a running ComfyUI, a graph of ComfyUI files only (the Flux file, DualCLIPLoader flux, VAELoader) trains a
  LoRA with the same loss curve as the diffusers folder of the same weights, and UNETLoader + LoraLoaderModelOnly
  load it onto the same file with no "lora key not loaded".

The weights: tests/e2e/flux_tiny_models.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.e2e import comfy_env

HERE = Path(__file__).resolve().parent
CAPTIONS = [
    "a photo of ohwx, a red fox in the snow",
    "a (red:1.5) fox \\ jumps, over the [lazy] dog \\(not a weight\\)",  # ComfyUI weight syntax, backslashes
    "Zebra ünïcode 漢字  over   the dog",                               # characters the tokenizers split oddly
    "",
    " ".join(["slow motion photo of waves breaking on rocks"] * 40),     # past 77 CLIP and 256 T5 tokens
]
LENGTHS = (512, 64)  # the family's default; a short one that truncates the long caption


REPO = HERE.parents[1]
IMAGES = "flux_images"


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """The tiny weights (flux_tiny_models.build), also placed in a ComfyUI base dir for the server test."""
    root, _ = comfy_env.require_comfyui()
    from tests.e2e.flux_tiny_models import COMFY_MODEL_OPTIONS, build
    from tests.e2e.test_comfyui_nodes import make_image_folder

    work = tmp_path_factory.mktemp("flux_e2e")
    files = build(work, Path(root))
    base = comfy_env.prepare_base_dir(work / "base", {"phase-trainer": REPO,
                                                      "comfy_tiny_flux": HERE / "comfy_tiny_flux"})
    for sub, name in (("diffusion_models", "flux"), ("text_encoders", "clip_l"), ("text_encoders", "t5xxl"),
                      ("vae", "ae")):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
        (base / "models" / sub / files[name].name).symlink_to(files[name])
    (base / "models" / "diffusers").mkdir(parents=True, exist_ok=True)
    (base / "models" / "diffusers" / files["folder"].name).symlink_to(files["folder"])
    make_image_folder(base / "input" / IMAGES, count=2, size=32)
    (work / "te_options.json").write_text(json.dumps(COMFY_MODEL_OPTIONS))
    return {**files, "base": base, "te_options": work / "te_options.json"}


def _comfy_encode(flux, tmp_path, pixels):
    root, python = comfy_env.require_comfyui()
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    save_file({"pixels": pixels}, str(tmp_path / "pixels.safetensors"))
    out = tmp_path / "comfy.safetensors"
    run = subprocess.run([str(python), str(HERE / "comfy_flux_encode.py"), flux["clip_l"], flux["t5xxl"], flux["ae"],
                          tmp_path / "captions.json", tmp_path / "pixels.safetensors", out, *map(str, LENGTHS)],
                         cwd=root, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(run.stdout.strip().splitlines()[-1])
    return load_file(str(out))


def test_comfyui_flux_clip_and_vae_give_the_family_encodings(flux, tmp_path):
    from trainer.families.single_file import load_single_file

    torch.manual_seed(2)
    pixels = torch.rand(2, 3, 1, 32, 48) * 2 - 1
    comfy = _comfy_encode(flux, tmp_path, pixels)

    worst_h = worst_p = 0.0
    for length in LENGTHS:
        family = load_single_file(flux["flux"], torch.float32, config=flux["folder"], encoders_from=flux["folder"],
                                  max_sequence_length=length)
        ours = family.encode_prompts(CAPTIONS)
        for i, item in enumerate(ours):
            h, p = comfy[f"h{length}_{i}"], comfy[f"p{length}_{i}"]
            assert h.shape == item["encoder_hidden_states"].shape == (length, 32)
            assert p.shape == item["pooled_projections"].shape == (32,)
            worst_h = max(worst_h, (h - item["encoder_hidden_states"]).abs().max().item())
            worst_p = max(worst_p, (p - item["pooled_projections"]).abs().max().item())
    tokenizer = family.loaded.tokenizers[0]
    want_ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True).input_ids
    for i, ids in enumerate(want_ids):
        assert comfy[f"clip_ids_{i}"].tolist() == ids, CAPTIONS[i]  # ComfyUI's tokens = the pipeline's, exactly
    print(f"T5 hidden states max |comfy - family| {worst_h:.3e}, CLIP pooled {worst_p:.3e}")
    assert worst_h < 1e-4 and worst_p < 1e-4

    from_folder = family.encode_pixels(pixels)  # the folder's VAE (diffusers AutoencoderKL, same weights)
    from_file = load_single_file(flux["flux"], torch.float32, config=flux["folder"], encoders_from=flux["folder"],
                                 vae_file=flux["ae"]).encode_pixels(pixels)
    assert torch.equal(from_file, from_folder)
    assert comfy["latents"].shape == from_folder.shape == (2, 16, 4, 6)
    diff = (comfy["latents"] - from_folder).abs().max().item()
    print(f"latents max |comfy - family| {diff:.3e} (latent std {from_folder.std().item():.3f})")
    assert diff < 1e-4 * max(1.0, from_folder.abs().max().item()) and from_folder.std() > 0.01


def test_flux_file_through_the_node_path_and_its_lora_in_comfyui(flux, tmp_path):
    from diffusers import FluxTransformer2DModel

    from tests.e2e.test_comfyui_lora_keys import trainer_lora
    from trainer import comfy_bridge as cb

    root, python = comfy_env.require_comfyui()
    spec = cb.single_file_model(flux["flux"], "fp32", str(flux["folder"]))
    assert spec["family"] == "flux" and spec["single_file"]["variant"] == "custom"
    family = cb.load_model_for_nodes({**spec, "encoders_from": str(flux["folder"])}, torch.float32)
    reference = FluxTransformer2DModel.from_pretrained(flux["folder"], subfolder="transformer")
    for k, v in reference.state_dict().items():
        assert torch.equal(family.denoiser.state_dict()[k], v), k

    lora = tmp_path / "flux_lora.safetensors"
    expected = trainer_lora(family.denoiser, family, lora)
    dump = tmp_path / "deltas"
    dump.mkdir()
    out = tmp_path / "probe.json"
    run = subprocess.run([str(python), str(HERE / "comfy_flux_probe.py"), str(flux["flux"]), str(lora),
                          "--dump-dir", str(dump), "--out", str(out)],
                         cwd=root, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-4000:]
    (result,) = json.loads(out.read_text())
    assert result["model_config"] == "Flux" and result["unet_config"]["hidden_size"] == 256
    assert result["model_missing"] == [] and result["model_unexpected"] == []
    assert result["not_loaded"] == [], result["not_loaded"][:5]
    assert result["not_patched"] == [] and result["changed_without_patch"] == []
    assert sorted(result["lora_targets"]) == sorted(expected)

    # ComfyUI puts q, k, v (and a single block's MLP input) into slices of its fused weights: a target is then
    # [weight key, [dim, offset, size]]; the slices, ordered by offset, must tile the weight's delta
    fused: dict[str, list] = {}
    for prefix, target in result["lora_targets"].items():
        key, offset = (target, 0) if isinstance(target, str) else (target[0], target[1][1])
        fused.setdefault(key, []).append((offset, prefix))
    assert sorted(fused) == result["patched_keys"]
    deltas = load_file(result["deltas_file"])
    worst = 0.0
    for target, prefixes in fused.items():
        want = torch.cat([expected[p] for _, p in sorted(prefixes)]).double()
        worst = max(worst, (deltas[target].double() - want).abs().max().item())
    print(f"ComfyUI applied {len(expected)} LoRA modules to {len(fused)} weights, 0 ignored; "
          f"max |delta - ours| {worst:.2e}")
    assert worst < 1e-6


def _train_prompt(model_node: dict, job: str, comfy_encoders: bool, flux: dict) -> dict:
    prompt = {
        "1": model_node,
        "2": {"class_type": "PhaseTrainerImageFolderDataset", "inputs": {
            "folder": IMAGES, "resolution": "32", "trigger_word": "", "caption_ext": "txt", "default_caption": "",
            "caption_dropout_rate": 0.0, "num_repeats": 1}},
        "3": {"class_type": "PhaseTrainerLoRANetwork", "inputs": {"linear": 4, "linear_alpha": 4, "conv": 0,
                                                                  "conv_alpha": 0}},
        "4": {"class_type": "PhaseTrainerTrain", "inputs": {
            "model": ["1", 0], "dataset": ["2", 0], "network": ["3", 0], "job_name": job,
            "steps": 4, "learning_rate": 1e-3, "optimizer": "adamw", "lr_scheduler": "constant",
            "warmup_steps": 0, "batch_size": 2, "gradient_accumulation": 1, "seed": 7, "save_every": 10,
            "resume": False, "gradient_checkpointing": False}},
    }
    if comfy_encoders:
        prompt["5"] = {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": flux["clip_l"].name, "clip_name2": flux["t5xxl"].name, "type": "flux", "device": "default"}}
        prompt["6"] = {"class_type": "VAELoader", "inputs": {"vae_name": flux["ae"].name}}
        prompt["4"]["inputs"].update({"clip": ["5", 0], "vae": ["6", 0]})
    return prompt


def test_graph_of_comfyui_flux_files_trains_like_the_folder_and_the_lora_loads_back(flux, monkeypatch):
    from tests.e2e.test_comfyui_single_file_sd15 import run_training

    base = flux["base"]
    loras = base / "models" / "loras"
    config = flux["folder"] / "transformer" / "config.json"  # tiny size: no released variant matches
    file_model = {"class_type": "PhaseTrainerLoadModelFile", "inputs": {
        "model_file": f"diffusion_models/{flux['flux'].name}", "dtype": "fp32", "config": str(config)}}
    folder_model = {"class_type": "PhaseTrainerLoadModel", "inputs": {
        "family": "flux", "diffusers_folder": flux["folder"].name, "dtype": "fp32"}}
    monkeypatch.setenv("PT_TINY_FLUX_TE", str(flux["te_options"]))  # read by the server's comfy_tiny_flux
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with comfy_env.start_server(base) as server:
        lora, from_files = run_training(server, _train_prompt(file_model, "flux_from_files", True, flux), loras)
        _, from_folder = run_training(server, _train_prompt(folder_model, "flux_from_folder", False, flux), loras)
        server.run_prompt({
            "1": {"class_type": "UNETLoader", "inputs": {"unet_name": flux["flux"].name, "weight_dtype": "default"}},
            "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora.name,
                                                                  "strength_model": 1.0}},
            "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "flux_merged"}},
        }, timeout=900)
        log = server.log()
    print(f"losses from ComfyUI files: {from_files}; from the diffusers folder: {from_folder}")
    assert len(from_files) == len(from_folder) == 4 and len(set(from_folder)) > 1
    assert torch.allclose(torch.tensor(from_files), torch.tensor(from_folder), rtol=1e-4, atol=1e-6)
    assert "lora key not loaded" not in log, [line for line in log.splitlines() if "not loaded" in line][:5]
    assert list((base / "output").glob("flux_merged*.safetensors"))

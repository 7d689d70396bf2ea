"""Training from ComfyUI-format files only, in a real ComfyUI (COMFYUI_ROOT; skips cleanly without it).

The same tiny Wan 2.1 weights exist twice: as the files a ComfyUI user has (models/diffusion_models transformer
under Wan's native names, models/text_encoders umt5 file with its spiece_model, models/vae Wan 2.1 VAE) and as
a diffusers WanPipeline folder. Checked:
- text: ComfyUI's umt5 CLIP (comfy.sd.load_clip, type wan) through trainer.comfy_encoders gives WanPipeline's
  prompt embeddings (same tokens, truncation to 512, zero padding) -- and ComfyUI's encoding without the
  adapter's escaping/truncation does not;
- a graph of Load Training Model (ComfyUI file) + CLIPLoader + VAELoader + dataset + network + schedule + Train
  run over HTTP trains a LoRA that ComfyUI's LoRA loader applies to that same file with zero unloaded keys;
- the same graph with Load Training Model (diffusers folder) instead of the three files gives the same loss
  curve (same seed, CPU, float32) within float tolerance.

ComfyUI builds its UMT5 from a fixed XXL config whatever the file holds; tests/e2e/comfy_tiny_umt5 (a test-only
node pack) points that one construction at the tiny model's config, see tests/e2e/tiny_text_encoder.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.e2e import comfy_env

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WAN_FILE = "tiny_wan_t2v.safetensors"
TE_FILE = "tiny_umt5.safetensors"
VAE_FILE = "tiny_wan_vae.safetensors"
WAN_FOLDER = "tiny-wan21-diffusers"
CLIPS = "my_clips"
WORKFLOW = "wan21_from_comfyui_files"
WF_MODEL = "wan2.1_t2v_1.3B_fp16.safetensors"
WF_TEXT = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WF_VAE = "wan_2.1_vae.safetensors"
CAPTIONS = [
    "a moving texture number 3",
    "a (red:1.5) fox \\ jumps, over the [lazy] dog",   # ComfyUI weight syntax and its escape character
    "Zebra ünïcode 漢字  over   the dog",              # characters the tokenizer does not know; extra spaces
    " ".join(["slow motion video of waves breaking on rocks"] * 60),  # past 512 tokens: truncated
]


def _run(cmd: list, root: Path, env: dict | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny weights as ComfyUI files (under a ComfyUI base dir) and as a diffusers folder."""
    root, python = comfy_env.require_comfyui()
    pytest.importorskip("google.protobuf", reason="transformers' SentencePiece converter needs protobuf")
    pytest.importorskip("sentencepiece")
    from safetensors.torch import save_file

    from tests.e2e.tiny_models import save_safetensors, tiny_wan_transformer, wan_native_state_dict
    from tests.e2e.tiny_text_encoder import build_tiny_umt5
    from trainer.families.single_file import load_wan_vae_file
    from trainer.tiny import build_tiny_wan21

    work = tmp_path_factory.mktemp("single_file")
    base = comfy_env.prepare_base_dir(work / "base", {"phase-trainer": REPO,
                                                      "comfy_tiny_umt5": HERE / "comfy_tiny_umt5"})
    from tests.e2e.test_comfyui_nodes import SETTINGS  # no minimap etc. in the thumbnail

    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    for sub in ("text_encoders", "vae", "diffusers"):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
    text = build_tiny_umt5(work / "umt5")
    shutil.copy(text["comfy_file"], base / "models" / "text_encoders" / TE_FILE)
    # The VAE is made by ComfyUI's own WanVAE class (the script also encodes a clip; unused here).
    save_file({"pixels": torch.zeros(1, 3, 1, 16, 16)}, str(work / "pixels.safetensors"))
    _run([python, HERE / "comfy_vae_encode.py", work, work / "pixels.safetensors"], root)
    shutil.copy(work / "wan_vae.safetensors", base / "models" / "vae" / VAE_FILE)

    transformer = tiny_wan_transformer(seed=0)
    save_safetensors(wan_native_state_dict(transformer), base / "models" / "diffusion_models" / WAN_FILE)
    folder = build_tiny_wan21(base / "models" / "diffusers" / WAN_FOLDER)
    for part in ("transformer", "text_encoder", "tokenizer", "vae"):
        shutil.rmtree(folder / part)
    transformer.save_pretrained(folder / "transformer")
    shutil.copytree(text["text_encoder"], folder / "text_encoder")
    shutil.copytree(text["tokenizer"], folder / "tokenizer")
    load_wan_vae_file(work / "wan_vae.safetensors").save_pretrained(folder / "vae")

    from tests.e2e.test_comfyui_nodes import make_clip_folder

    make_clip_folder(base / "input" / CLIPS, count=2, frames=5, size=32)
    # The names the workflow uses (a real user's files), here the tiny weights under them.
    for sub, tiny, real in (("diffusion_models", WAN_FILE, WF_MODEL), ("text_encoders", TE_FILE, WF_TEXT),
                            ("vae", VAE_FILE, WF_VAE)):
        (base / "models" / sub / real).symlink_to(base / "models" / sub / tiny)
    return {"root": root, "python": python, "base": base, "work": work, "folder": folder, "text": text}


def test_comfyui_umt5_clip_gives_the_wan_pipeline_prompt_embeddings(models):
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, UMT5EncoderModel

    from trainer.families.base import LoadedModel
    from trainer.families.wan21 import Wan21

    work, text = models["work"], models["text"]
    (work / "captions.json").write_text(json.dumps([prompt_clean(c) for c in CAPTIONS]))
    out = _run([models["python"], HERE / "comfy_umt5_encode.py", text["comfy_file"], text["comfy_config"],
                work / "captions.json", work / "comfy_text.safetensors"], models["root"])
    assert "WanTEModel" in out, out  # ComfyUI's Wan text encoder class, built by its CLIP loader
    comfy = load_file(str(work / "comfy_text.safetensors"))

    encoder = UMT5EncoderModel.from_pretrained(text["text_encoder"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(text["tokenizer"])
    family = Wan21(LoadedModel(denoiser=torch.nn.Identity(), text_encoders=[encoder], tokenizers=[tokenizer],
                               extra={"max_sequence_length": 512, "dtype": torch.float32}))
    ours = family.encode_prompts(CAPTIONS)
    worst = 0.0
    for i, caption in enumerate(CAPTIONS):
        a, b = ours[i]["encoder_hidden_states"], comfy[f"h{i}"]
        assert a.shape == b.shape == (512, 4096)
        real = int((a.abs().sum(-1) > 0).sum())
        assert real == int((b.abs().sum(-1) > 0).sum())  # same number of real tokens, zeros after
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        assert diff < 1e-4 * max(1.0, a.abs().max().item()), (caption[:40], diff)
    print(f"max |comfy - diffusers| prompt embedding difference {worst:.3e}")
    # Without the adapter ComfyUI reads "(red:1.5)" as a weight and never truncates: different tensors.
    assert comfy["raw3"].shape[0] > 512
    assert (comfy["raw1"][:512] - ours[1]["encoder_hidden_states"]).abs().max() > 1e-2


def _graph(model_node: dict, *, job: str, encoders: bool) -> dict:
    prompt = {
        "1": model_node,
        "4": {"class_type": "PhaseTrainerVideoFolderDataset", "inputs": {
            "folder": CLIPS, "resolution": "32", "trigger_word": "", "caption_ext": "txt", "default_caption": "",
            "caption_dropout_rate": 0.0, "num_repeats": 1, "num_frames": 5}},
        "5": {"class_type": "PhaseTrainerLoRANetwork", "inputs": {"linear": 4, "linear_alpha": 4, "conv": 0,
                                                                  "conv_alpha": 0}},
        "6": {"class_type": "PhaseTrainerAlphaPhase", "inputs": {
            "name": "foundation", "alpha": 4.0, "group": "auto", "min_steps": 2,
            "loss_improvement_rate_below": 0.001, "min_gradient_stability": 0.55, "min_loss_r2": 0.1}},
        "7": {"class_type": "PhaseTrainerAlphaPhase", "inputs": {
            "previous": ["6", 0], "name": "emphasis", "alpha": 8.0, "group": "auto", "min_steps": 2,
            "loss_improvement_rate_below": 0.001, "min_gradient_stability": 0.0, "min_loss_r2": 0.0}},
        "8": {"class_type": "PhaseTrainerTrain", "inputs": {
            "model": ["1", 0], "dataset": ["4", 0], "network": ["5", 0], "schedule": ["7", 0], "job_name": job,
            "steps": 6, "learning_rate": 1e-3, "optimizer": "adamw", "lr_scheduler": "constant",
            "warmup_steps": 0, "batch_size": 2, "gradient_accumulation": 1, "seed": 7, "save_every": 3,
            "resume": False, "gradient_checkpointing": False}},
    }
    if encoders:
        prompt["2"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": TE_FILE, "type": "wan",
                                                              "device": "default"}}
        prompt["3"] = {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}}
        prompt["8"]["inputs"].update(clip=["2", 0], vae=["3", 0])
    return prompt


def _with_defaults(prompt: dict, info: dict) -> dict:
    """Fill every widget input the graph leaves out with the node's default from /object_info (the nodes gain
    inputs over time; this graph names only what it needs)."""
    for node in prompt.values():
        spec = info[node["class_type"]]["input"]
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                if name in node["inputs"] or len(entry) < 2 or not isinstance(entry[1], dict):
                    continue
                if "default" in entry[1]:
                    node["inputs"][name] = entry[1]["default"]
    return prompt


def _losses(base: Path, job: str) -> list[float]:
    job_dir = base / "output" / "phase_trainer" / job
    files = sorted(job_dir.rglob("*.jsonl"))
    assert files, sorted(p.name for p in job_dir.rglob("*"))
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("step") is not None]
    return losses


def _start(models) -> comfy_env.ComfyServer:
    # Both variables reach only the server's process: one thread (tiny ops on a busy 2-core machine) and the
    # tiny UMT5 config for tests/e2e/comfy_tiny_umt5.
    extra_env = {"OMP_NUM_THREADS": "1", "PT_TINY_UMT5_CONFIG": str(models["text"]["comfy_config"])}
    return comfy_env.start_server(models["base"], root=models["root"], python=models["python"], env=extra_env)


def test_graph_of_comfyui_files_trains_a_lora_that_loads_back_and_matches_the_diffusers_folder(models):
    base = models["base"]
    config = models["folder"] / "transformer" / "config.json"  # tiny size: no released variant matches
    file_model = {"class_type": "PhaseTrainerLoadModelFile", "inputs": {
        "model_file": f"diffusion_models/{WAN_FILE}", "dtype": "fp32", "config": str(config)}}
    folder_model = {"class_type": "PhaseTrainerLoadModel", "inputs": {
        "family": "wan21", "diffusers_folder": WAN_FOLDER, "dtype": "fp32"}}
    server = _start(models)
    with server:
        info = server.object_info()
        assert "PhaseTrainerLoadModelFile" in info and "CLIPLoader" in info
        server.run_prompt(_with_defaults(_graph(file_model, job="from_files", encoders=True), info), timeout=900)
        server.run_prompt(_with_defaults(_graph(folder_model, job="from_folder", encoders=False), info), timeout=900)
    files_curve, folder_curve = _losses(base, "from_files"), _losses(base, "from_folder")
    print("loss from ComfyUI files:", files_curve)
    print("loss from diffusers folder:", folder_curve)
    assert len(files_curve) == len(folder_curve) == 6
    worst = max(abs(a - b) for a, b in zip(files_curve, folder_curve))
    print(f"max |loss difference| {worst:.3e}")
    assert worst < 1e-4 * max(1.0, max(folder_curve)), worst
    assert len(set(round(x, 6) for x in files_curve)) > 1  # a real curve, not one repeated value

    loras = sorted(p for p in (base / "models" / "loras").glob("from_files*.safetensors") if "_step" not in p.name)
    assert loras, sorted(p.name for p in (base / "models" / "loras").iterdir())
    result = comfy_env.probe(base / "models" / "diffusion_models" / WAN_FILE, loras[-1])
    assert result["model_config"] == "WAN21_T2V"
    assert result["not_loaded"] == [] and result["not_patched"] == [], result["not_loaded"][:5]
    assert result["patches_applied"] > 0 and all(v > 0 for v in result["max_abs_delta"].values())


def test_fp8_base_weights_train_in_comfyui_from_files(models):
    """model dtype fp8 in the node (the denoiser's block Linears stored as float8 inside ComfyUI's process, under
    its inference_mode(False)): the graph of ComfyUI files trains, the losses follow the fp32 run's, and the LoRA
    loads back onto the file with 0 unloaded keys."""
    import math

    base = models["base"]
    config = models["folder"] / "transformer" / "config.json"
    runs = {}
    server = _start(models)
    with server:
        info = server.object_info()
        for dtype in ("fp8", "fp32"):
            job = f"dtype_{dtype}"
            model = {"class_type": "PhaseTrainerLoadModelFile", "inputs": {
                "model_file": f"diffusion_models/{WAN_FILE}", "dtype": dtype, "config": str(config)}}
            server.run_prompt(_with_defaults(_graph(model, job=job, encoders=True), info), timeout=900)
            runs[dtype] = _losses(base, job)
    print("fp8:", runs["fp8"], "fp32:", runs["fp32"])
    assert len(runs["fp8"]) == 6 and all(math.isfinite(x) for x in runs["fp8"])
    worst = max(abs(a - b) / b for a, b in zip(runs["fp8"], runs["fp32"]))
    print(f"max relative loss difference fp8 vs fp32 {worst:.3%}")
    assert worst < 0.05, worst
    (lora,) = sorted(p for p in (base / "models" / "loras").glob("dtype_fp8_*.safetensors") if "_step" not in p.name)
    result = comfy_env.probe(base / "models" / "diffusion_models" / WAN_FILE, lora)
    assert result["not_loaded"] == [] and result["not_patched"] == [] and result["patches_applied"] > 0


def _workflow_spec() -> dict:
    note = ("Wan 2.1 T2V LoRA from the files ComfyUI already has: no diffusers folder, no second download.\n\n"
            f"1. models/diffusion_models: the Wan 2.1 model file (here {WF_MODEL}); 1.3B/14B T2V are detected "
            "from its weights.\n"
            f"2. models/text_encoders: umt5 ({WF_TEXT}); models/vae: the Wan 2.1 VAE ({WF_VAE}).\n"
            f"3. Clips (mp4/webm/mov/mkv) with same-name .txt captions in ComfyUI/input/{CLIPS}/.\n"
            "4. Queue. Captions and clips are encoded once with this CLIP and VAE and cached; then the encoders "
            "are released for training. The LoRA lands in models/loras for the stock LoraLoader.")
    return {
        "nodes": {
            "note": ("Note", (20, 20), {"text": note}, "Read me"),
            "model": ("PhaseTrainerLoadModelFile", (20, 300),
                      {"model_file": f"diffusion_models/{WF_MODEL}", "dtype": "bf16"}, None),
            "clip": ("CLIPLoader", (20, 470), {"clip_name": WF_TEXT, "type": "wan"}, None),
            "vae": ("VAELoader", (20, 640), {"vae_name": WF_VAE}, None),
            "data": ("PhaseTrainerVideoFolderDataset", (20, 760),
                     {"folder": CLIPS, "resolution": "480", "trigger_word": "ohwx", "num_frames": 33}, None),
            "net": ("PhaseTrainerLoRANetwork", (470, 20), {"linear": 32, "linear_alpha": 32, "conv": 0,
                                                           "conv_alpha": 0}, None),
            "sched": ("PhaseTrainerAlphaSchedulePreset", (470, 330),
                      {"preset": "video", "group": "auto", "foundation_min_steps": 600, "balance_min_steps": 900,
                       "emphasis_min_steps": 600}, None),
            "train": ("PhaseTrainerTrain", (920, 20), {"job_name": "my_wan_lora", "steps": 3000,
                                                       "learning_rate": 1e-4, "batch_size": 1, "save_every": 250,
                                                       "gradient_checkpointing": True}, None),
            "plot": ("PhaseTrainerPlotMetrics", (1400, 20), {}, None),
            "save": ("SaveImage", (1400, 560), {"filename_prefix": "phase_trainer/my_wan_lora_metrics"}, None),
        },
        "links": [("model", "model", "train", "model"), ("clip", "CLIP", "train", "clip"),
                  ("vae", "VAE", "train", "vae"), ("data", "dataset", "train", "dataset"),
                  ("net", "network", "train", "network"), ("sched", "schedule", "train", "schedule"),
                  ("train", "metrics", "plot", "metrics"), ("plot", "image", "save", "images")],
    }


def test_workflow_from_comfyui_files_loads_in_the_frontend_and_trains(models):
    """workflows/wan21_from_comfyui_files.json (built in the real frontend; PT_WRITE_WORKFLOWS=1 rewrites it and
    its thumbnail) loads with every node known, converts to API format and, shrunk to the tiny weights, trains
    a LoRA that loads back with zero unloaded keys."""
    from tests.e2e import test_comfyui_nodes as nodes_test

    if not Path(nodes_test.CHROMIUM).exists():
        pytest.skip(f"no {nodes_test.CHROMIUM} (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api")
    base = models["base"]
    with _start(models) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=nodes_test.CHROMIUM, args=nodes_test.CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url)
        page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        if os.environ.get("PT_WRITE_WORKFLOWS"):
            _write_workflow(page, nodes_test)
        result = page.evaluate(nodes_test.LOAD_AND_CONVERT_JS,
                               json.loads((REPO / "workflows" / f"{WORKFLOW}.json").read_text()))
        browser.close()
        assert result["missing"] == []
        api = result["output"]
        types = sorted(node["class_type"] for node in api.values())
        assert {"PhaseTrainerLoadModelFile", "CLIPLoader", "VAELoader", "PhaseTrainerTrain"} <= set(types)
        assert "PhaseTrainerLoadModel" not in types  # nothing from a diffusers folder
        api = nodes_test.tiny_run(api, steps=2, job="wf_files")
        for node in api.values():
            if node["class_type"] == "PhaseTrainerLoadModelFile":  # the tiny size is no released variant
                node["inputs"].update(dtype="fp32", config=str(models["folder"] / "transformer" / "config.json"))
        server.run_prompt(api, timeout=900)
    (lora,) = sorted(p for p in (base / "models" / "loras").glob("wf_files_*.safetensors") if "_step" not in p.name)
    result = comfy_env.probe(base / "models" / "diffusion_models" / WF_MODEL, lora)
    assert result["model_config"] == "WAN21_T2V"
    assert result["not_loaded"] == [] and result["not_patched"] == [] and result["patches_applied"] > 0


def _write_workflow(page, nodes_test) -> None:
    from PIL import Image

    out = REPO / "workflows"
    result = page.evaluate(nodes_test.BUILD_GRAPH_JS, _workflow_spec())
    assert result["problems"] == [], result["problems"]
    page.evaluate(nodes_test.FIT_VIEW_JS, list(nodes_test.VIEW_RECT))
    graph = json.loads(page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).workflow)"))
    path = out / f"{WORKFLOW}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(graph, indent=1) + "\n")
    os.replace(tmp, path)
    page.wait_for_timeout(600)  # DOM widgets follow the canvas on the next frames
    shot = out / f".{WORKFLOW}.full.png"
    x0, y0, x1, y1 = nodes_test.VIEW_RECT
    page.screenshot(path=str(shot), clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    with Image.open(shot) as img:
        img.thumbnail((800, 450))
        img.convert("RGB").save(out / f"{WORKFLOW}.png", optimize=True)
    shot.unlink()

"""The example workflows that train from ComfyUI-format files, in a real ComfyUI (COMFYUI_ROOT; skips cleanly
without it) and its real frontend in headless Chromium.

workflows/flux_from_comfyui_files.json and workflows/wan22_a14b_from_comfyui_files.json are built here with
LiteGraph in the frontend (PT_WRITE_WORKFLOWS=1 rewrites them and their thumbnails, as for the other workflows):
    PT_WRITE_WORKFLOWS=1 COMFYUI_ROOT=... pytest tests/e2e/test_comfyui_workflows_from_files.py

One ComfyUI server serves the module. Its models/ folders hold tiny real weights under the names the workflows
use (a user's files): a FLUX.1-dev-style transformer, clip_l, t5xxl and the ae VAE (tests/e2e/flux_tiny_models.py,
ComfyUI sized through the test-only pack tests/e2e/comfy_tiny_flux), and a Wan 2.2 A14B expert pair with a tiny
umt5 and a Wan 2.1 VAE made by ComfyUI's own class (tests/e2e/comfy_tiny_umt5). Checked:
- every workflow in workflows/ (also the four older ones, after the Train node gained clip_vision and Load
  Training Model (ComfyUI file) low_noise_file) is served as a template, loads with no missing node type and
  converts to an API prompt in which every input of every node is present and valid for /object_info: a widget
  value saved in an older widget order would land on the wrong input and fail this;
- each of the two workflows, shrunk to the tiny weights, runs in the server to its LoRA(s), which ComfyUI's LoRA
  loader applies to the same model file(s) with zero unloaded keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e import comfy_env
from tests.e2e import test_comfyui_nodes as nodes_test

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKFLOWS = REPO / "workflows"
PACK = "phase-trainer"

FLUX_WF = "flux_from_comfyui_files"
WAN22_WF = "wan22_a14b_from_comfyui_files"
IMAGES, CLIPS = "my_images", "my_clips"
# the released files' names, as a user has them
FLUX_MODEL, CLIP_L, T5XXL, FLUX_VAE = "flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", \
    "ae.safetensors"
WAN_HIGH, WAN_LOW = "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"
UMT5, WAN_VAE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"
# what the four older workflows pick, so their combo values can be checked against the server's lists
OLDER_NAMES = {"diffusers": ("stable-diffusion-v1-5", "Wan2.1-T2V-1.3B-Diffusers"),
               "checkpoints": ("v1-5-pruned-emaonly.safetensors",),
               "diffusion_models": ("wan2.1_t2v_1.3B_fp16.safetensors",)}


# ---------------------------------------------------------------------------------------------- the workflows
# Specs as in tests/e2e/test_comfyui_nodes.py: nodes {key: (type, (x, y), {widget: value}, title)} and links
# (from, output, to, input); values for real use, shrunk by the tests.


def _flux_spec() -> dict:
    note = ("FLUX.1 LoRA from the files ComfyUI already has: no diffusers folder, no second download.\n\n"
            f"1. models/diffusion_models: the FLUX.1 dev (or schnell) file, here {FLUX_MODEL}; the variant is "
            "detected from its weights.\n"
            f"2. models/text_encoders: {T5XXL} and {CLIP_L} (DualCLIPLoader, type flux); models/vae: {FLUX_VAE}.\n"
            f"3. Images with same-name .txt captions in ComfyUI/input/{IMAGES}/ (each one is trained at each "
            "resolution listed, never upscaled).\n"
            "4. Queue. Captions and images are encoded once with this CLIP and VAE and cached; then the encoders "
            "are released for training. The LoRA lands in models/loras (my_flux_lora_00001.safetensors) for the "
            "stock LoraLoader.")
    return {
        "nodes": {
            "note": ("Note", (20, 20), {"text": note}, "Read me"),
            "model": ("PhaseTrainerLoadModelFile", (20, 300),
                      {"model_file": f"diffusion_models/{FLUX_MODEL}", "dtype": "bf16"}, None),
            "clip": ("DualCLIPLoader", (20, 480), {"clip_name1": T5XXL, "clip_name2": CLIP_L, "type": "flux"},
                     None),
            "vae": ("VAELoader", (20, 680), {"vae_name": FLUX_VAE}, None),
            "data": ("PhaseTrainerImageFolderDataset", (20, 800),
                     {"folder": IMAGES, "resolution": "512, 768, 1024", "trigger_word": "ohwx",
                      "caption_dropout_rate": 0.05}, None),
            "net": ("PhaseTrainerLoRANetwork", (470, 20), {"linear": 16, "linear_alpha": 16, "conv": 0,
                                                           "conv_alpha": 0}, None),
            "sched": ("PhaseTrainerAlphaSchedulePreset", (470, 330),
                      {"preset": "image", "group": "auto", "foundation_min_steps": 400, "balance_min_steps": 600,
                       "emphasis_min_steps": 400}, None),
            "train": ("PhaseTrainerTrain", (920, 20), {"job_name": "my_flux_lora", "steps": 2000,
                                                       "learning_rate": 1e-4, "batch_size": 1, "save_every": 250,
                                                       "gradient_checkpointing": True}, None),
            "plot": ("PhaseTrainerPlotMetrics", (1400, 20), {}, None),
            "save": ("SaveImage", (1400, 560), {"filename_prefix": "phase_trainer/my_flux_lora_metrics"}, None),
        },
        "links": [("model", "model", "train", "model"), ("clip", "CLIP", "train", "clip"),
                  ("vae", "VAE", "train", "vae"), ("data", "dataset", "train", "dataset"),
                  ("net", "network", "train", "network"), ("sched", "schedule", "train", "schedule"),
                  ("train", "metrics", "plot", "metrics"), ("plot", "image", "save", "images")],
    }


def _wan22_spec() -> dict:
    note = ("Wan 2.2 T2V A14B LoRA from the files ComfyUI already has. A14B is two models, high noise and low "
            "noise: both train, each gets its own LoRA.\n\n"
            f"1. models/diffusion_models: {WAN_HIGH} as model_file, {WAN_LOW} as low_noise_file.\n"
            f"2. models/text_encoders: {UMT5} (CLIPLoader type wan); models/vae: {WAN_VAE} (A14B uses the "
            "Wan 2.1 VAE).\n"
            f"3. Clips (mp4/webm/mov/mkv) with same-name .txt captions in ComfyUI/input/{CLIPS}/; num_frames "
            "4k+1 (33, 81).\n"
            "4. Queue. Captions and clips are encoded once and cached, then the encoders are released. The experts "
            "take turns every 100 steps, each on its own noise levels. In models/loras: "
            "my_wan22_lora_00001_high_noise.safetensors for the high-noise model (Train's lora output) and "
            "..._low_noise for the low-noise one (lora_low_noise).")
    return {
        "nodes": {
            "note": ("Note", (20, 20), {"text": note}, "Read me"),
            "model": ("PhaseTrainerLoadModelFile", (20, 300),
                      {"model_file": f"diffusion_models/{WAN_HIGH}", "dtype": "bf16",
                       "low_noise_file": f"diffusion_models/{WAN_LOW}"}, None),
            "clip": ("CLIPLoader", (20, 520), {"clip_name": UMT5, "type": "wan"}, None),
            "vae": ("VAELoader", (20, 690), {"vae_name": WAN_VAE}, None),
            "data": ("PhaseTrainerVideoFolderDataset", (20, 810),
                     {"folder": CLIPS, "resolution": "480", "trigger_word": "ohwx", "num_frames": 33}, None),
            "net": ("PhaseTrainerLoRANetwork", (470, 20), {"linear": 32, "linear_alpha": 32, "conv": 0,
                                                           "conv_alpha": 0}, None),
            "sched": ("PhaseTrainerAlphaSchedulePreset", (470, 330),
                      {"preset": "video", "group": "auto", "foundation_min_steps": 600, "balance_min_steps": 900,
                       "emphasis_min_steps": 600}, None),
            "train": ("PhaseTrainerTrain", (920, 20), {"job_name": "my_wan22_lora", "steps": 3000,
                                                       "learning_rate": 1e-4, "batch_size": 1, "save_every": 250,
                                                       "gradient_checkpointing": True}, None),
            "plot": ("PhaseTrainerPlotMetrics", (1400, 20), {}, None),
            "save": ("SaveImage", (1400, 560), {"filename_prefix": "phase_trainer/my_wan22_lora_metrics"}, None),
        },
        "links": [("model", "model", "train", "model"), ("clip", "CLIP", "train", "clip"),
                  ("vae", "VAE", "train", "vae"), ("data", "dataset", "train", "dataset"),
                  ("net", "network", "train", "network"), ("sched", "schedule", "train", "schedule"),
                  ("train", "metrics", "plot", "metrics"), ("plot", "image", "save", "images")],
    }


SPECS = {FLUX_WF: _flux_spec, WAN22_WF: _wan22_spec}


def write_workflow(page, name: str, spec: dict) -> None:
    """Build `spec` in the page and save it (what the frontend's Export writes) with a thumbnail."""
    from PIL import Image

    result = page.evaluate(nodes_test.BUILD_GRAPH_JS, spec)
    assert result["problems"] == [], (name, result["problems"])
    page.evaluate(nodes_test.FIT_VIEW_JS, list(nodes_test.VIEW_RECT))
    graph = json.loads(page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).workflow)"))
    path = WORKFLOWS / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(graph, indent=1) + "\n")
    os.replace(tmp, path)
    page.wait_for_timeout(600)  # DOM widgets follow the canvas on the next frames
    shot = WORKFLOWS / f".{name}.full.png"
    x0, y0, x1, y1 = nodes_test.VIEW_RECT
    page.screenshot(path=str(shot), clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    with Image.open(shot) as img:
        img.thumbnail((800, 450))
        img.convert("RGB").save(WORKFLOWS / f"{name}.png", optimize=True)
    shot.unlink()


# ---------------------------------------------------------------------------------------------- fixtures


def _run(cmd: list, root: Path) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=root, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A ComfyUI server whose models/ hold the tiny weights under the workflows' file names."""
    root, python = comfy_env.require_comfyui()
    pytest.importorskip("google.protobuf", reason="transformers' SentencePiece converter needs protobuf")
    pytest.importorskip("sentencepiece")
    import torch
    from safetensors.torch import save_file

    from tests.e2e.flux_tiny_models import COMFY_MODEL_OPTIONS
    from tests.e2e.flux_tiny_models import build as build_flux
    from tests.e2e.tiny_models import save_safetensors, tiny_wan_transformer, wan_native_state_dict
    from tests.e2e.tiny_text_encoder import build_tiny_umt5

    work = tmp_path_factory.mktemp("workflows_from_files")
    base = comfy_env.prepare_base_dir(work / "base", {PACK: REPO, "comfy_tiny_umt5": HERE / "comfy_tiny_umt5",
                                                      "comfy_tiny_flux": HERE / "comfy_tiny_flux"})
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(nodes_test.SETTINGS))
    models = base / "models"
    for sub in ("text_encoders", "vae", "diffusers"):
        (models / sub).mkdir(parents=True, exist_ok=True)

    flux = build_flux(work / "flux", root)
    for sub, key, name in (("diffusion_models", "flux", FLUX_MODEL), ("text_encoders", "clip_l", CLIP_L),
                           ("text_encoders", "t5xxl", T5XXL), ("vae", "ae", FLUX_VAE)):
        (models / sub / name).symlink_to(flux[key])
    (work / "flux_te_options.json").write_text(json.dumps(COMFY_MODEL_OPTIONS))

    text = build_tiny_umt5(work / "umt5")
    shutil.copy(text["comfy_file"], models / "text_encoders" / UMT5)
    # the Wan 2.1 VAE file is made by ComfyUI's own WanVAE class (the script also encodes a clip; unused here)
    save_file({"pixels": torch.zeros(1, 3, 1, 16, 16)}, str(work / "pixels.safetensors"))
    _run([python, HERE / "comfy_vae_encode.py", work, work / "pixels.safetensors"], root)
    shutil.copy(work / "wan_vae.safetensors", models / "vae" / WAN_VAE)
    high, low = tiny_wan_transformer(seed=10), tiny_wan_transformer(seed=11)
    for model, name in ((high, WAN_HIGH), (low, WAN_LOW)):
        save_safetensors(wan_native_state_dict(model), models / "diffusion_models" / name)
    high.save_config(work / "wan_config")  # the tiny size is no released variant: the node's config input

    nodes_test.make_image_folder(base / "input" / IMAGES, count=2, size=32)
    nodes_test.make_clip_folder(base / "input" / CLIPS, count=2, frames=5, size=32)
    for sub, names in OLDER_NAMES.items():  # listed by the server, never loaded here
        for name in names:
            if sub == "diffusers":
                (models / sub / name).mkdir()
                (models / sub / name / "model_index.json").write_text("{}")
            else:
                (models / sub / name).symlink_to(models / "diffusion_models" / WAN_HIGH)

    # Reach only the server's process: one thread (tiny ops on a busy 2-core machine), the tiny sizes for the
    # test-only packs.
    extra_env = {"OMP_NUM_THREADS": "1", "PT_TINY_UMT5_CONFIG": str(text["comfy_config"]),
                 "PT_TINY_FLUX_TE": str(work / "flux_te_options.json")}
    server = comfy_env.start_server(base, root=root, python=python, env=extra_env)
    with server:
        yield {"server": server, "base": base, "root": root, "python": python,
               "flux_config": flux["folder"] / "transformer" / "config.json",
               "wan_config": work / "wan_config" / "config.json"}


@pytest.fixture(scope="module")
def page(comfy):
    if not Path(nodes_test.CHROMIUM).exists():
        pytest.skip(f"no {nodes_test.CHROMIUM} (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=nodes_test.CHROMIUM, args=nodes_test.CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.errors = []
        pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
        pg.goto(comfy["server"].url)
        pg.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        if os.environ.get("PT_WRITE_WORKFLOWS"):
            for name, spec in SPECS.items():
                write_workflow(pg, name, spec())
        yield pg
        browser.close()


def convert(page, name: str) -> dict:
    return page.evaluate(nodes_test.LOAD_AND_CONVERT_JS, json.loads((WORKFLOWS / f"{name}.json").read_text()))


# ---------------------------------------------------------------------------------------------- API checks


def input_problems(prompt: dict, info: dict) -> list[str]:
    """What in an API prompt /object_info says is wrong: a required input missing, an input the node does not
    have, a widget value of the wrong type, outside its range or not among its options."""
    problems = []
    for node_id, node in prompt.items():
        kind = node["class_type"]
        spec = info[kind]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        for name in spec.get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{kind} #{node_id}: required input {name} missing")
        for name, value in node["inputs"].items():
            where = f"{kind} #{node_id}.{name} = {value!r}"
            if name not in declared:
                problems.append(f"{where}: no such input")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                continue  # a link
            problems += [f"{where}: {p}" for p in _value_problems(declared[name], value)]
    return problems


def _value_problems(entry: list, value) -> list[str]:
    kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
    options = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
    if options is not None:
        return [] if value in options else [f"not among {options[:6]}"]
    if kind == "COMFY_DYNAMICCOMBO_V3":
        keys = [o["key"] for o in opts["options"]]
        return [] if value in keys else [f"not among {keys}"]  # what these workflows hold: an option off
    checks = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "BOOLEAN": lambda v: isinstance(v, bool), "STRING": lambda v: isinstance(v, str)}
    if kind not in checks:
        return [f"a value for a {kind} socket"]
    if not checks[kind](value):
        return [f"not a {kind}"]
    if kind in ("INT", "FLOAT") and not (opts.get("min", value) <= value <= opts.get("max", value)):
        return [f"outside [{opts.get('min')}, {opts.get('max')}]"]
    return []


# Nodes of the loaded graph that lack an input socket or a widget which a node of the same type made now has.
SLOTS_MISSING_JS = """() => {
  const names = (xs) => (xs || []).map((s) => s.name);
  const out = [];
  for (const n of app.graph._nodes) {
    if (n.type === "Note") continue;
    const fresh = LiteGraph.createNode(n.type);
    const inputs = names(fresh.inputs).filter((x) => !names(n.inputs).includes(x));
    const widgets = names(fresh.widgets).filter((x) => !names(n.widgets).includes(x));
    if (inputs.length || widgets.length) out.push({ type: n.type, inputs, widgets });
  }
  return out;
}"""


def by_type(prompt: dict, class_type: str) -> list[dict]:
    return [node["inputs"] for node in prompt.values() if node["class_type"] == class_type]


# ---------------------------------------------------------------------------------------------- tests


def test_every_workflow_loads_in_the_frontend_with_every_input_valid(comfy, page):
    server = comfy["server"]
    info = server.object_info()
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert {FLUX_WF, WAN22_WF, "wan21_from_comfyui_files", "video_lora_wan21", "image_lora_sd15",
            "sample_then_train_sd15"} <= set(names)
    assert sorted(server.get("/workflow_templates").json().get(PACK, [])) == names
    for name in names:
        assert (WORKFLOWS / f"{name}.png").stat().st_size > 10_000, name
        assert server.get(f"/api/workflow_templates/{PACK}/{name}.json").status_code == 200
        result = convert(page, name)
        assert result["missing"] == [], (name, result["missing"])
        api = result["output"]
        assert input_problems(api, info) == [], name
        (train,) = by_type(api, "PhaseTrainerTrain")
        assert "clip_vision" not in train  # nothing connected: the optional input stays out of the prompt
        for model in by_type(api, "PhaseTrainerLoadModelFile"):
            want = f"diffusion_models/{WAN_LOW}" if name == WAN22_WF else "none"
            assert model["low_noise_file"] == want, name
        loaded_train_inputs = page.evaluate(
            "() => app.graph._nodes.find((n) => n.type === 'PhaseTrainerTrain').inputs.map((s) => s.name)")
        assert "clip_vision" in loaded_train_inputs, (name, loaded_train_inputs)
        # each node as loaded has every socket and widget a node made now has (clip_vision, low_noise_file...)
        assert page.evaluate(SLOTS_MISSING_JS) == [], name
    assert page.errors == []

    # The check catches a shifted widget order: a value list saved before an input that is now in the middle
    workflow = json.loads((WORKFLOWS / "wan21_from_comfyui_files.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "PhaseTrainerLoadModelFile":
            node["widgets_values"].insert(2, "none")  # as if low_noise_file had come before config
        if node["type"] == "PhaseTrainerTrain":
            del node["widgets_values"][3]  # an optimizer value missing: every later value moves up
    api = page.evaluate(nodes_test.LOAD_AND_CONVERT_JS, workflow)["output"]
    shifted = input_problems(api, info)
    assert any(p.startswith("PhaseTrainerLoadModelFile") and ".low_noise_file" in p for p in shifted), shifted
    assert any(p.startswith("PhaseTrainerTrain") and ".optimizer" in p for p in shifted), shifted


def _tiny(api: dict, config: Path, job: str, steps: int) -> dict:
    api = nodes_test.tiny_run(api, steps=steps, job=job)
    for inputs in by_type(api, "PhaseTrainerLoadModelFile"):  # fp32 on CPU; the tiny size is no released variant
        inputs.update(dtype="fp32", config=str(config))
    return api


def test_flux_workflow_trains_from_comfyui_files_and_the_lora_loads_back(comfy, page):
    result = convert(page, FLUX_WF)
    assert result["missing"] == []
    api = result["output"]
    types = {node["class_type"] for node in api.values()}
    assert {"PhaseTrainerLoadModelFile", "DualCLIPLoader", "VAELoader", "PhaseTrainerTrain"} <= types
    assert "PhaseTrainerLoadModel" not in types  # nothing from a diffusers folder
    (clip,) = by_type(api, "DualCLIPLoader")
    assert clip["type"] == "flux" and {clip["clip_name1"], clip["clip_name2"]} == {CLIP_L, T5XXL}
    comfy["server"].run_prompt(_tiny(api, comfy["flux_config"], "wf_flux", steps=2), timeout=900)
    loras = comfy["base"] / "models" / "loras"
    (lora,) = sorted(p for p in loras.glob("wf_flux_*.safetensors") if "_step" not in p.name)

    out = comfy["base"] / "flux_probe.json"
    _run([comfy["python"], HERE / "comfy_flux_probe.py", comfy["base"] / "models" / "diffusion_models" / FLUX_MODEL,
          lora, "--out", out], comfy["root"])
    (probe,) = json.loads(out.read_text())
    print(f"flux workflow: {lora.name}, {len(probe['lora_targets'])} modules -> {probe['patches_applied']} fused "
          f"weights, {len(probe['not_loaded'])} not loaded")
    assert probe["model_config"] == "Flux"
    assert probe["not_loaded"] == [] and probe["not_patched"] == [] and probe["patches_applied"] > 0
    assert sorted(probe["lora_targets"]) == sorted(nodes_test.lora_modules(lora))  # every module of the file
    assert all(v > 0 for v in probe["max_abs_delta"].values())  # trained: every patched weight changes


def test_wan22_a14b_workflow_trains_both_experts_from_comfyui_files(comfy, page):
    result = convert(page, WAN22_WF)
    assert result["missing"] == []
    api = result["output"]
    types = {node["class_type"] for node in api.values()}
    assert {"PhaseTrainerLoadModelFile", "CLIPLoader", "VAELoader", "PhaseTrainerTrain"} <= types
    assert "PhaseTrainerLoadModel" not in types
    (model,) = by_type(api, "PhaseTrainerLoadModelFile")
    assert (model["model_file"], model["low_noise_file"]) == (f"diffusion_models/{WAN_HIGH}",
                                                              f"diffusion_models/{WAN_LOW}")
    # the run switches expert every 100 steps: 102 steps train both
    comfy["server"].run_prompt(_tiny(api, comfy["wan_config"], "wf_wan22", steps=102), timeout=900)
    loras = comfy["base"] / "models" / "loras"
    for expert, model_file in (("high_noise", WAN_HIGH), ("low_noise", WAN_LOW)):
        (lora,) = [p for p in loras.glob(f"wf_wan22_*_{expert}.safetensors") if "_step" not in p.name]
        probe = comfy_env.probe(comfy["base"] / "models" / "diffusion_models" / model_file, lora)
        print(f"wan22 workflow: {lora.name}, {probe['model_config']}, {probe['patches_applied']} patches, "
              f"{len(probe['not_loaded'])} not loaded, max delta {max(probe['max_abs_delta'].values()):.2e}")
        nodes_test.assert_lora_applies(probe, lora)  # every module applied, each with a non-zero change

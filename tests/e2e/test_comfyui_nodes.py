"""The node pack inside a real ComfyUI (COMFYUI_ROOT; skips cleanly without it), driven through its own HTTP API
and its real frontend in headless Chromium.

One ComfyUI server (this repo linked into custom_nodes/) serves every test of the module; its models/ and
input/ folders hold tiny real models built here under the names the workflows in workflows/ expect:
- models/diffusers/stable-diffusion-v1-5: an SD 1.5-shaped pipeline whose UNet ComfyUI detects as SD15
  (320 channels, context 768) with a small VAE and a 1-layer 768-wide CLIP text encoder;
- models/checkpoints/v1-5-pruned-emaonly.safetensors: that same UNet in ComfyUI's checkpoint layout, with a
  random SD-sized VAE and CLIP-L (ComfyUI builds those at their real size whatever the file holds);
- models/diffusers/Wan2.1-T2V-1.3B-Diffusers: a Wan 2.1 pipeline whose transformer ComfyUI detects as Wan
  (1 head x 128, text_dim 4096) with a small VAE and a 1-layer 4096-wide UMT5;
- input/my_images (captioned PNGs) and input/my_clips (captioned MP4s).

Checked: the pack imports cleanly and /object_info lists every node; each workflow loads in the browser with
no missing node type and converts to API format; each runs through to a LoRA in models/loras that ComfyUI's
LoRA loader applies with zero unloaded keys (tests/e2e/probe_lora_keys.py); the live plot gets >= 2
phase_trainer.metrics messages and draws them; Cancel leaves a checkpoint and a resumed run continues from
it; Export Job writes a job file the CLI accepts; Plot Metrics and the native LORA_MODEL / LOSS_MAP outputs
feed ComfyUI's stock nodes; a run with the Train node's validation option on plots the validation loss and
the stop advice in the node, stops on the plateau and keeps the best LoRA.

Regenerate the workflows and their thumbnails (built with LiteGraph in the real frontend, then serialized):
    PT_WRITE_WORKFLOWS=1 COMFYUI_ROOT=... pytest tests/e2e/test_comfyui_nodes.py -k workflows
The screenshot docs/comfyui_train_node.png (the README's) is rewritten by the validation test with PT_WRITE_SCREENSHOT=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.e2e import comfy_env

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "workflows"
SCREENSHOT = REPO / "docs" / "comfyui_train_node.png"
PACK = "phase-trainer"

SD15_FOLDER = "stable-diffusion-v1-5"
WAN_FOLDER = "Wan2.1-T2V-1.3B-Diffusers"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
IMAGE_FOLDER = "my_images"
CLIP_FOLDER = "my_clips"

IMAGE_WF = "image_lora_sd15"
VIDEO_WF = "video_lora_wan21"
SAMPLE_WF = "sample_then_train_sd15"
ALL_WORKFLOWS = (IMAGE_WF, VIDEO_WF, SAMPLE_WF)

NODE_IDS = (
    "PhaseTrainerLoadModel", "PhaseTrainerLoadModelFile", "PhaseTrainerImageFolderDataset",
    "PhaseTrainerVideoFolderDataset", "PhaseTrainerImagesToDataset", "PhaseTrainerMergeDatasets",
    "PhaseTrainerLoRANetwork", "PhaseTrainerAlphaPhase", "PhaseTrainerAlphaSchedulePreset", "PhaseTrainerTrain",
    "PhaseTrainerPlotMetrics", "PhaseTrainerExportJob",
)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LIVE_EVENT = "phase_trainer.metrics"


# ---------------------------------------------------------------------------------------------- tiny models


def build_comfy_sd15_folder(path: Path) -> Path:
    """An SD 1.5 diffusers pipeline ComfyUI can also load: the tiny pipeline with the 320-channel UNet ComfyUI's
    detection accepts and a 768-wide (1-layer) CLIP text encoder to match its cross-attention."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.e2e.tiny_models import tiny_sd15_unet
    from trainer.tiny import build_tiny_sd15

    build_tiny_sd15(path)
    shutil.rmtree(path / "unet")
    tiny_sd15_unet(seed=0).save_pretrained(path / "unet")
    config = CLIPTextConfig.from_pretrained(path / "text_encoder")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 768, 256, 1
    config.num_attention_heads, config.projection_dim = 12, 768
    shutil.rmtree(path / "text_encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPTextModel(config).save_pretrained(path / "text_encoder")
    return path


def build_comfy_wan_folder(path: Path) -> Path:
    """A Wan 2.1 diffusers pipeline ComfyUI can also load: the tiny pipeline with a transformer of 1 head x 128,
    text_dim 4096 (ComfyUI's detection fixes it) and a 4096-wide 1-layer UMT5 to match."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from tests.e2e.tiny_models import tiny_wan_transformer
    from trainer.tiny import build_tiny_wan21

    build_tiny_wan21(path)
    shutil.rmtree(path / "transformer")
    tiny_wan_transformer(seed=0).save_pretrained(path / "transformer")
    old = UMT5Config.from_pretrained(path / "text_encoder")
    config = UMT5Config(vocab_size=old.vocab_size, d_model=4096, d_kv=16, d_ff=32, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=32,
                        feed_forward_proj="gated-gelu", pad_token_id=old.pad_token_id, eos_token_id=old.eos_token_id,
                        decoder_start_token_id=old.decoder_start_token_id)
    shutil.rmtree(path / "text_encoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UMT5EncoderModel(config).save_pretrained(path / "text_encoder")
    return path


def _random_like_init(model) -> dict:
    """A random state dict with `model`'s names and shapes (normal 0.02 weights, unit norms, zero biases), fp16.
    Filled here instead of by the model's own init: the SD-sized VAE and CLIP-L are ~200 M parameters."""
    import torch

    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("position_ids"):
            out[name] = torch.arange(tensor.shape[-1])[None]
        elif tensor.ndim == 1:
            is_norm = any(k in name for k in ("norm", "layer_norm")) and name.endswith("weight")
            out[name] = torch.ones(tensor.shape) if is_norm else torch.zeros(tensor.shape)
        else:
            out[name] = (torch.randn(tensor.shape, generator=gen) * 0.02)
        out[name] = out[name].to(torch.float16) if out[name].is_floating_point() else out[name]
    return out


def build_comfy_checkpoint(sd15_folder: Path, out_file: Path, comfy_root: Path, comfy_python: Path) -> Path:
    """An SD 1.5 checkpoint in ComfyUI's single-file layout for CheckpointLoaderSimple: the folder's UNet renamed
    to ldm keys with ComfyUI's own map (probe_lora_keys.diffusers_unet_to_ldm, run under ComfyUI's Python), plus
    a random VAE and CLIP-L of the real sizes (diffusers / transformers key names, which ComfyUI converts)."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    extra = {f"first_stage_model.{k}": v for k, v in _random_like_init(vae).items()}
    extra.update({f"cond_stage_model.transformer.{k}": v for k, v in _random_like_init(clip).items()})
    extra_file = out_file.with_name(out_file.name + ".extra")
    save_file(extra, str(extra_file))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])\n"
        "import comfy.cli_args; comfy.cli_args.args.cpu = True\n"
        "import torch, safetensors.torch\n"
        "from probe_lora_keys import diffusers_unet_to_ldm\n"
        "unet = diffusers_unet_to_ldm(safetensors.torch.load_file(sys.argv[3]))\n"
        "sd = {'model.diffusion_model.' + k: v.to(torch.float16) for k, v in unet.items()}\n"
        "sd.update(safetensors.torch.load_file(sys.argv[4]))\n"
        "safetensors.torch.save_file(sd, sys.argv[5] + '.tmp')\n"
        "import os; os.replace(sys.argv[5] + '.tmp', sys.argv[5])\n"
    )
    unet_file = sd15_folder / "unet" / "diffusion_pytorch_model.safetensors"
    done = subprocess.run([str(comfy_python), "-c", script, str(comfy_root), str(Path(__file__).parent),
                           str(unet_file), str(extra_file), str(out_file)], cwd=comfy_root, capture_output=True,
                          text=True, timeout=600)
    extra_file.unlink()
    if done.returncode != 0:
        raise comfy_env.ComfyUIError(f"building the checkpoint failed:\n{done.stderr[-3000:]}")
    return out_file


def make_image_folder(folder: Path, count: int = 6, size: int = 32) -> Path:
    from PIL import Image, ImageDraw

    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        name, color = list(colors.items())[i % 3]
        shape = "circle" if i % 2 else "square"
        img = Image.new("RGB", (size, size), (128, 128, 128))
        d = ImageDraw.Draw(img)
        box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color)
        img.save(folder / f"{i:02d}_{name}_{shape}.png")
        (folder / f"{i:02d}_{name}_{shape}.txt").write_text(f"a {name} {shape}")
    return folder


def make_clip_folder(folder: Path, count: int = 2, frames: int = 9, size: int = 32) -> Path:
    from tests.media import textured_frames, write_video

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_video(folder / f"clip{i}.mp4", textured_frames(frames, size, size, seed=i), width=size, height=size)
        (folder / f"clip{i}.txt").write_text(f"a moving texture number {i}")
    return folder


# ---------------------------------------------------------------------------------------------- the workflows
# Each spec: nodes {key: (type, (x, y), {widget: value}, title or None)} and links (from, output, to, input).
# Positions run left to right in the order data flows. Values are for real use; tests shrink them (tiny_run).

_IMAGE_EXITS = {"loss_improvement_rate_below": 0.001, "min_gradient_stability": 0.55, "min_loss_r2": 0.1}
_NOTE_W = 420


def _image_spec() -> dict:
    note = ("Image LoRA with progressive alpha phases (SD 1.5).\n\n"
            f"1. Put the SD 1.5 diffusers folder in models/diffusers/ (here: {SD15_FOLDER}).\n"
            f"2. Put your images with same-name .txt captions in ComfyUI/input/{IMAGE_FOLDER}/.\n"
            "3. Queue. The Train node plots loss, alpha and the phases live; the LoRA lands in models/loras "
            "(my_sd15_lora_00001.safetensors) for the stock LoraLoader.\n"
            "Cancel keeps a checkpoint: switch 'resume' on and queue again to continue.")
    return {
        "nodes": {
            "note": ("Note", (20, 20), {"text": note}, "Read me"),
            "model": ("PhaseTrainerLoadModel", (20, 300), {"family": "sd15", "diffusers_folder": SD15_FOLDER,
                                                           "dtype": "bf16"}, None),
            "data": ("PhaseTrainerImageFolderDataset", (20, 480),
                     {"folder": IMAGE_FOLDER, "resolution": "512", "trigger_word": "ohwx",
                      "caption_dropout_rate": 0.05}, None),
            "net": ("PhaseTrainerLoRANetwork", (20, 900), {"linear": 16, "linear_alpha": 16, "conv": 8,
                                                           "conv_alpha": 8}, None),
            "p1": ("PhaseTrainerAlphaPhase", (470, 20), {"name": "foundation", "alpha": 8, "group": "auto",
                                                         "min_steps": 500, **_IMAGE_EXITS}, "Phase 1: foundation"),
            "p2": ("PhaseTrainerAlphaPhase", (470, 420), {"name": "balance", "alpha": 14, "group": "auto",
                                                          "min_steps": 800, **_IMAGE_EXITS}, "Phase 2: balance"),
            "p3": ("PhaseTrainerAlphaPhase", (470, 820), {"name": "emphasis", "alpha": 20, "group": "auto",
                                                          "min_steps": 500, **_IMAGE_EXITS}, "Phase 3: emphasis"),
            "train": ("PhaseTrainerTrain", (920, 20), {"job_name": "my_sd15_lora", "steps": 2500,
                                                       "learning_rate": 1e-4, "batch_size": 1, "save_every": 250},
                      None),
            "plot": ("PhaseTrainerPlotMetrics", (1400, 20), {}, None),
            "save": ("SaveImage", (1400, 560), {"filename_prefix": "phase_trainer/my_sd15_lora_metrics"}, None),
        },
        "links": [("model", "model", "train", "model"), ("data", "dataset", "train", "dataset"),
                  ("net", "network", "train", "network"), ("p1", "schedule", "p2", "previous"),
                  ("p2", "schedule", "p3", "previous"), ("p3", "schedule", "train", "schedule"),
                  ("train", "metrics", "plot", "metrics"), ("plot", "image", "save", "images")],
    }


def _video_spec() -> dict:
    note = ("Video LoRA for Wan 2.1 T2V with the seed's video schedule.\n\n"
            f"1. Put the Wan 2.1 diffusers folder in models/diffusers/ (here: {WAN_FOLDER}).\n"
            f"2. Put clips (mp4/webm/mov/mkv) with same-name .txt captions in ComfyUI/input/{CLIP_FOLDER}/.\n"
            "3. Queue. Wan is almost all Linear layers: the schedule moves the linear alpha (group auto).\n"
            "num_frames must be 4k+1 (33, 81); the LoRA lands in models/loras.")
    return {
        "nodes": {
            "note": ("Note", (20, 20), {"text": note}, "Read me"),
            "model": ("PhaseTrainerLoadModel", (20, 300), {"family": "wan21", "diffusers_folder": WAN_FOLDER,
                                                           "dtype": "bf16"}, None),
            "data": ("PhaseTrainerVideoFolderDataset", (20, 480),
                     {"folder": CLIP_FOLDER, "resolution": "480", "trigger_word": "ohwx", "num_frames": 33},
                     None),
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
        "links": [("model", "model", "train", "model"), ("data", "dataset", "train", "dataset"),
                  ("net", "network", "train", "network"), ("sched", "schedule", "train", "schedule"),
                  ("train", "metrics", "plot", "metrics"), ("plot", "image", "save", "images")],
    }


def _sample_spec() -> dict:
    prompt = "a watercolor painting of a lighthouse at dusk"
    note = ("Sample, then train on the samples, then sample again with the LoRA.\n\n"
            f"The stock sampler makes a batch with {CHECKPOINT}; Images to Dataset turns it into training data; "
            f"Train fits a LoRA on the same model's diffusers folder (models/diffusers/{SD15_FOLDER}); the "
            "stock Load LoRA Model node applies the trained LoRA (the native LORA_MODEL output) and the second "
            "sampler draws with it, seed fixed so the two batches compare.")
    ks = {"seed": 1234, "control_after_generate": "fixed", "steps": 20, "cfg": 7.0, "sampler_name": "euler",
          "scheduler": "normal", "denoise": 1.0}
    return {
        "nodes": {
            "note": ("Note", (20, 20), {"text": note}, "Read me"),
            "ckpt": ("CheckpointLoaderSimple", (20, 330), {"ckpt_name": CHECKPOINT}, None),
            "latent": ("EmptyLatentImage", (20, 500), {"width": 512, "height": 512, "batch_size": 4}, None),
            "pos": ("CLIPTextEncode", (480, 20), {"text": prompt}, "Prompt"),
            "neg": ("CLIPTextEncode", (480, 300), {"text": "blurry, low quality"}, "Negative"),
            "ks1": ("KSampler", (940, 20), ks, "Sample the training images"),
            "dec1": ("VAEDecode", (940, 560), {}, None),
            "prev1": ("PreviewImage", (940, 680), {}, "Training images"),
            "todata": ("PhaseTrainerImagesToDataset", (1320, 20),
                       {"captions": prompt, "trigger_word": "ohwx", "resolution": ""}, None),
            "model": ("PhaseTrainerLoadModel", (1320, 380), {"family": "sd15", "diffusers_folder": SD15_FOLDER,
                                                             "dtype": "bf16"}, None),
            "net": ("PhaseTrainerLoRANetwork", (1320, 560), {"linear": 16, "linear_alpha": 16, "conv": 8,
                                                             "conv_alpha": 8}, None),
            "sched": ("PhaseTrainerAlphaSchedulePreset", (1320, 880),
                      {"preset": "image", "group": "auto", "foundation_min_steps": 150, "balance_min_steps": 200,
                       "emphasis_min_steps": 150}, None),
            "train": ("PhaseTrainerTrain", (1760, 20), {"job_name": "sample_then_train", "steps": 600,
                                                        "learning_rate": 1e-4, "batch_size": 2,
                                                        "save_every": 200}, None),
            "apply": ("LoraModelLoader", (2240, 20), {"strength_model": 1.0}, None),
            "pos2": ("CLIPTextEncode", (2240, 200), {"text": f"ohwx, {prompt}"}, "Prompt with trigger word"),
            "ks2": ("KSampler", (2700, 20), ks, "Sample again with the LoRA"),
            "dec2": ("VAEDecode", (2700, 560), {}, None),
            "save": ("SaveImage", (2700, 680), {"filename_prefix": "phase_trainer/after_lora"}, None),
        },
        "links": [("ckpt", "CLIP", "pos", "clip"), ("ckpt", "CLIP", "neg", "clip"), ("ckpt", "MODEL", "ks1", "model"),
                  ("pos", "CONDITIONING", "ks1", "positive"), ("neg", "CONDITIONING", "ks1", "negative"),
                  ("latent", "LATENT", "ks1", "latent_image"), ("ks1", "LATENT", "dec1", "samples"),
                  ("ckpt", "VAE", "dec1", "vae"), ("dec1", "IMAGE", "prev1", "images"),
                  ("dec1", "IMAGE", "todata", "images"), ("todata", "dataset", "train", "dataset"),
                  ("model", "model", "train", "model"), ("net", "network", "train", "network"),
                  ("sched", "schedule", "train", "schedule"), ("ckpt", "MODEL", "apply", "model"),
                  ("train", "lora", "apply", "lora"), ("ckpt", "CLIP", "pos2", "clip"),
                  ("apply", "model", "ks2", "model"), ("pos2", "CONDITIONING", "ks2", "positive"),
                  ("neg", "CONDITIONING", "ks2", "negative"), ("latent", "LATENT", "ks2", "latent_image"),
                  ("ks2", "LATENT", "dec2", "samples"), ("ckpt", "VAE", "dec2", "vae"),
                  ("dec2", "IMAGE", "save", "images")],
    }


WORKFLOW_SPECS = {IMAGE_WF: _image_spec, VIDEO_WF: _video_spec, SAMPLE_WF: _sample_spec}

# Builds a spec's graph with LiteGraph in the real frontend and returns app.graph.serialize().
BUILD_GRAPH_JS = """async (spec) => {
  app.graph.clear();
  const made = {};
  const problems = [];
  for (const [key, [type, pos, values, title]] of Object.entries(spec.nodes)) {
    const node = LiteGraph.createNode(type);
    if (!node) { problems.push(`no node type ${type}`); continue; }
    node.pos = pos;
    if (title) node.title = title;
    app.graph.add(node);
    for (const [name, value] of Object.entries(values)) {
      const w = (node.widgets || []).find((w) => w.name === name);
      if (!w) { problems.push(`${type} has no widget ${name}`); continue; }
      if (w.options?.values && Array.isArray(w.options.values) && !w.options.values.includes(value)) {
        problems.push(`${type}.${name}: ${value} is not an option (${w.options.values.slice(0, 5)})`);
      }
      w.value = value;
      w.callback?.(value);
    }
    made[key] = node;
  }
  for (const [from, output, to, input] of spec.links) {
    const a = made[from], b = made[to];
    const o = a.outputs.findIndex((s) => s.name === output || s.type === output);
    const i = b.inputs.findIndex((s) => s.name === input);
    if (o < 0 || i < 0) { problems.push(`cannot link ${from}.${output} -> ${to}.${input}`); continue; }
    a.connect(o, b, i);
  }
  for (const node of Object.values(made)) {
    if (node.type === "Note") node.size = [420, 260];
  }
  app.graph.setDirtyCanvas(true, true);
  return { problems };
}"""

LOAD_AND_CONVERT_JS = """async (workflow) => {
  await app.loadGraphData(workflow);
  const nodes = app.graph._nodes;
  const missing = nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type);
  const prompt = await app.graphToPrompt();
  return { missing, types: nodes.map((n) => n.type), output: prompt.output };
}"""


# Fits the graph into a rectangle of the page (CSS pixels) that no menu or toolbar covers.
FIT_VIEW_JS = """([x0, y0, x1, y1]) => {
  const nodes = app.graph._nodes;
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  for (const n of nodes) {
    const title = LiteGraph.NODE_TITLE_HEIGHT || 30;
    minX = Math.min(minX, n.pos[0]); minY = Math.min(minY, n.pos[1] - title);
    maxX = Math.max(maxX, n.pos[0] + n.size[0]); maxY = Math.max(maxY, n.pos[1] + n.size[1]);
  }
  const ds = app.canvas.ds, w = maxX - minX, h = maxY - minY, W = x1 - x0, H = y1 - y0;
  const scale = Math.min(W / w, H / h) * 0.97;
  ds.scale = scale;
  const rect = app.canvas.canvas.getBoundingClientRect();
  ds.offset = [(x0 - rect.left) / scale + (W / scale - w) / 2 - minX,
               (y0 - rect.top) / scale + (H / scale - h) / 2 - minY];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
}"""
VIEW_RECT = (70, 90, 1580, 930)  # clear of the side bar, the tabs and the zoom controls at 1600 x 1000


def write_workflows(page, out_dir: Path) -> dict:
    """Build every workflow in the page and save it (UI format, opening fitted to the view) with a thumbnail of
    the graph as the frontend draws it."""
    from PIL import Image

    written = {}
    for name, spec in WORKFLOW_SPECS.items():
        result = page.evaluate(BUILD_GRAPH_JS, spec())
        assert result["problems"] == [], (name, result["problems"])
        page.evaluate(FIT_VIEW_JS, list(VIEW_RECT))
        # What the frontend's own Export writes; as a JSON string: Playwright would turn undefined into null.
        graph = json.loads(page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).workflow)"))
        path = out_dir / f"{name}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(graph, indent=1) + "\n")
        os.replace(tmp, path)
        page.wait_for_timeout(600)  # DOM widgets (notes, plots) follow the canvas on the next frames
        shot = out_dir / f".{name}.full.png"
        x0, y0, x1, y1 = VIEW_RECT
        page.screenshot(path=str(shot), clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
        with Image.open(shot) as img:
            img.thumbnail((800, 450))
            img.convert("RGB").save(out_dir / f"{name}.png", optimize=True)
        shot.unlink()
        written[name] = path
    return written


# ---------------------------------------------------------------------------------------------- fixtures

FAST_SD15 = "tiny-sd15-fast"  # a 32-channel SD 1.5 pipeline: hundreds of steps in seconds, for the live run
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}


class Comfy:
    def __init__(self, server, base: Path, root: Path, python: Path):
        self.server, self.base, self.root, self.python = server, base, root, python

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"

    def job_dir(self, job: str) -> Path:
        return self.base / "output" / "phase_trainer" / job

    def run(self, prompt: dict, timeout: float = 600) -> tuple[dict, list[dict]]:
        return self.server.run_prompt(prompt, timeout=timeout)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root, python = comfy_env.require_comfyui()
    from trainer.tiny import build_tiny_sd15

    base = comfy_env.prepare_base_dir(tmp_path_factory.mktemp("comfy_nodes") / "base", {PACK: REPO})
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    diffusers = base / "models" / "diffusers"
    build_comfy_sd15_folder(diffusers / SD15_FOLDER)
    build_comfy_wan_folder(diffusers / WAN_FOLDER)
    build_tiny_sd15(diffusers / FAST_SD15)
    build_comfy_checkpoint(diffusers / SD15_FOLDER, base / "models" / "checkpoints" / CHECKPOINT, root, python)
    make_image_folder(base / "input" / IMAGE_FOLDER)
    make_clip_folder(base / "input" / CLIP_FOLDER)
    # One thread: the tiny models' ops are too small to share, and two threads on a busy 2-core machine run
    # the training steps several times slower. The variable only reaches the server's process.
    server = comfy_env.start_server(base, root=root, python=python, env={"OMP_NUM_THREADS": "1"})
    with server:
        yield Comfy(server, base, root, python)


@pytest.fixture(scope="module")
def page(comfy):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM} (Debian's chromium package)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.errors = []
        pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
        pg.goto(comfy.server.url)
        pg.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        yield pg
        browser.close()


def convert(page, name: str) -> dict:
    """Load a workflow file in the frontend; returns {missing, types, output (the API prompt)}."""
    return page.evaluate(LOAD_AND_CONVERT_JS, json.loads((WORKFLOWS / f"{name}.json").read_text()))


def by_type(prompt: dict, class_type: str) -> list[dict]:
    return [node["inputs"] for node in prompt.values() if node["class_type"] == class_type]


def tiny_run(prompt: dict, *, steps: int, job: str, lr: float = 1e-3) -> dict:
    """Shrink a converted workflow to the tiny models: fp32, 32 px, 5 frames, few steps, short phases."""
    for inputs in by_type(prompt, "PhaseTrainerLoadModel"):
        inputs["dtype"] = "fp32"
    for kind in ("PhaseTrainerImageFolderDataset", "PhaseTrainerVideoFolderDataset"):
        for inputs in by_type(prompt, kind):
            inputs["resolution"] = "32"
            if kind == "PhaseTrainerVideoFolderDataset":
                inputs["num_frames"] = 5
    for inputs in by_type(prompt, "PhaseTrainerAlphaPhase"):
        inputs["min_steps"] = 2
    for inputs in by_type(prompt, "PhaseTrainerAlphaSchedulePreset"):
        for phase in ("foundation", "balance", "emphasis"):
            inputs[f"{phase}_min_steps"] = 2
    for inputs in by_type(prompt, "PhaseTrainerTrain"):
        inputs.update(steps=steps, learning_rate=lr, batch_size=2, save_every=max(1, steps // 2), job_name=job,
                      gradient_checkpointing=False)
    for inputs in by_type(prompt, "EmptyLatentImage"):
        inputs.update(width=32, height=32, batch_size=2)
    for inputs in by_type(prompt, "KSampler"):
        inputs["steps"] = 2
    return prompt


def live_messages(messages: list[dict]) -> list[dict]:
    return [m["data"] for m in messages if m["type"] == LIVE_EVENT]


def lora_modules(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k[: -len(".lora_down.weight")] for k in f.keys() if k.endswith(".lora_down.weight")}


def assert_lora_applies(result: dict, lora_file: Path) -> None:
    """ComfyUI's LoRA loader mapped and patched every module of the file; nothing was ignored."""
    modules = lora_modules(lora_file)
    assert modules, lora_file
    assert result["not_loaded"] == [], f"ComfyUI ignored {len(result['not_loaded'])} keys: {result['not_loaded'][:5]}"
    assert result["not_patched"] == [] and result["model_missing"] == [] and result["model_unexpected"] == []
    assert sorted(result["lora_targets"]) == sorted(modules)
    assert result["patches_applied"] == len(modules)
    assert all(v > 0 for v in result["max_abs_delta"].values())  # trained up weights: every delta is non-zero


def new_loras(comfy: Comfy, job: str) -> list[Path]:
    return sorted(p for p in comfy.loras.glob(f"{job}_*.safetensors") if "_step" not in p.name)


# ---------------------------------------------------------------------------------------------- tests


def test_pack_loads_and_object_info_lists_every_node(comfy):
    log = comfy.server.log()
    ours = [line for line in log.splitlines() if f"custom_nodes/{PACK}" in line]
    # ComfyUI lists every pack with its import time, "(IMPORT FAILED)" when it raised
    assert any("seconds:" in line for line in ours) and not any("IMPORT FAILED" in line for line in ours), ours
    assert not any(line.startswith("Cannot import") and PACK in line for line in log.splitlines())
    info = comfy.server.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("PhaseTrainer")}
    assert sorted(ours) == sorted(NODE_IDS)
    assert {v["category"] for v in ours.values()} == {"Phase Trainer"}
    train = info["PhaseTrainerTrain"]
    assert train["output"] == ["LORA_MODEL", "PT_METRICS", "LOSS_MAP", "STRING", "LORA_MODEL"]
    assert train["output_name"][-1] == "lora_low_noise"
    # the validation option group: off, or on with its settings; optional and after every older widget
    kind, spec = train["input"]["optional"]["validation"]
    assert kind == "COMFY_DYNAMICCOMBO_V3" and [o["key"] for o in spec["options"]] == ["off", "on"]
    assert sorted(spec["options"][1]["inputs"]["required"]) == sorted(
        ["every", "items", "patience", "min_delta", "stop_on_plateau"])
    assert train["input_order"]["optional"].index("validation") > train["input_order"]["optional"].index(
        "max_grad_norm")
    tip = info["PhaseTrainerLoadModel"]["input"]["required"]["family"][1]["tooltip"]
    assert all(f"{name}:" in tip for name in info["PhaseTrainerLoadModel"]["input"]["required"]["family"][1][
        "options"]), tip
    assert train["output_node"] is True and "unique_id" in train["input"]["hidden"]
    # the native types are the stock training nodes' own
    assert "LORA_MODEL" in json.dumps(info["LoraModelLoader"]["input"]) and "LOSS_MAP" in json.dumps(
        info["LossGraphNode"]["input"])
    assert info["PhaseTrainerLoadModel"]["input"]["required"]["diffusers_folder"][1]["options"][:3] == sorted(
        [SD15_FOLDER, WAN_FOLDER, FAST_SD15])
    folders = info["PhaseTrainerImageFolderDataset"]["input"]["required"]["folder"][1]["options"]
    assert IMAGE_FOLDER in folders and CLIP_FOLDER in folders
    r = comfy.server.get("/extensions/" + PACK + "/phase_trainer.js")
    assert r.status_code == 200 and "registerExtension" in r.text


def test_workflows_load_in_the_frontend_and_convert_to_api_format(comfy, page):
    if os.environ.get("PT_WRITE_WORKFLOWS"):
        write_workflows(page, WORKFLOWS)
    info = comfy.server.object_info()
    templates = comfy.server.get("/workflow_templates").json()
    # the *_from_comfyui_files workflows are checked (loaded, converted, run) in tests/e2e/test_comfyui_single_file.py
    # (Wan 2.1) and tests/e2e/test_comfyui_workflows_from_files.py (FLUX.1, Wan 2.2 A14B)
    assert sorted(templates.get(PACK, [])) == sorted(ALL_WORKFLOWS + (
        "wan21_from_comfyui_files", "flux_from_comfyui_files", "wan22_a14b_from_comfyui_files"))
    for name in ALL_WORKFLOWS:
        assert (WORKFLOWS / f"{name}.png").stat().st_size > 10_000
        served = comfy.server.get(f"/api/workflow_templates/{PACK}/{name}.json")
        assert served.status_code == 200 and served.json()["nodes"]
        result = convert(page, name)
        assert result["missing"] == [], (name, result["missing"])
        api = result["output"]
        assert api and all(node["class_type"] in info for node in api.values()), name
        assert "Note" in result["types"] and "Note" not in {n["class_type"] for n in api.values()}
        (train,) = by_type(api, "PhaseTrainerTrain")
        assert isinstance(train["model"], list) and isinstance(train["dataset"], list)
    assert page.errors == []


def test_image_workflow_in_the_browser_live_plot_cancel_and_resume(comfy, page):
    """The real frontend queues the image workflow (on the fast tiny model): the plot fills live, Cancel stops
    it with a checkpoint, and queuing again with resume on continues from that checkpoint to the end."""
    steps, job = 260, "browser_live"
    result = convert(page, IMAGE_WF)
    assert result["missing"] == []
    page.evaluate("""([steps, job, model]) => {
      window.__pt = { live: [], done: [] };
      const { api } = window.comfyAPI.api;
      api.addEventListener("phase_trainer.metrics", (e) => window.__pt.live.push(e.detail));
      for (const t of ["execution_success", "execution_interrupted", "execution_error"]) {
        api.addEventListener(t, (e) => window.__pt.done.push(t));
      }
      const set = (node, name, value) => { node.widgets.find((w) => w.name === name).value = value; };
      for (const n of app.graph._nodes) {
        if (n.type === "PhaseTrainerLoadModel") { set(n, "diffusers_folder", model); set(n, "dtype", "fp32"); }
        if (n.type === "PhaseTrainerImageFolderDataset") set(n, "resolution", "32");
        if (n.type === "PhaseTrainerAlphaPhase") {
          set(n, "min_steps", 80); set(n, "loss_improvement_rate_below", 0.005); set(n, "min_gradient_stability", 0.45);
        }
        if (n.type === "PhaseTrainerTrain") {
          set(n, "steps", steps); set(n, "job_name", job); set(n, "learning_rate", 0.001); set(n, "batch_size", 2);
          set(n, "save_every", 50); set(n, "resume", false);
        }
      }
    }""", [steps, job, FAST_SD15])
    train_plot = "app.graph._nodes.find((n) => n.type === 'PhaseTrainerTrain').phaseTrainerPlot.plot"

    page.evaluate("app.queuePrompt(0, 1)")
    page.wait_for_function(f"{train_plot}.length >= 60", timeout=300_000)
    requests.post(comfy.server.url + "/interrupt", timeout=30)  # what the frontend's Cancel button posts
    page.wait_for_function("window.__pt.done.length >= 1", timeout=300_000)
    first = page.evaluate("({ live: window.__pt.live, done: window.__pt.done, rows: " + train_plot + ".length })")
    assert first["done"] == ["execution_interrupted"]
    assert first["live"][-1]["done"] and first["live"][0]["reset"]
    stopped_at = first["live"][-1]["rows"][-1][0] if first["live"][-1]["rows"] else first["rows"]
    assert 60 <= stopped_at < steps and first["rows"] == stopped_at  # the plot holds every step up to Cancel
    checkpoints = sorted((comfy.job_dir(job) / "checkpoints").glob("step_*"))
    assert checkpoints[-1].name == f"step_{stopped_at:08d}"
    assert (comfy.loras / f"{job}_00001_step{stopped_at}.safetensors").is_file()  # the partial LoRA
    assert not list(comfy.loras.glob(f"{job}_00001.safetensors"))

    page.evaluate("""() => {
      window.__pt.live = []; window.__pt.done = [];
      const n = app.graph._nodes.find((n) => n.type === "PhaseTrainerTrain");
      n.widgets.find((w) => w.name === "resume").value = true;
    }""")
    page.evaluate("app.queuePrompt(0, 1)")
    page.wait_for_function("window.__pt.done.length >= 1", timeout=600_000)
    second = page.evaluate("({ live: window.__pt.live, done: window.__pt.done, rows: " + train_plot + ".length })")
    assert second["done"] == ["execution_success"]
    live = second["live"]
    assert len(live) >= 2 and live[0]["reset"] and live[-1]["done"]
    steps_sent = [r[0] for m in live for r in m["rows"]]
    assert steps_sent == list(range(1, steps + 1))  # the earlier steps come back first, then the new ones
    assert second["rows"] == steps
    events = [(e["step"], e["event"]) for m in live for e in m["events"]]
    assert (stopped_at + 1, "resume") in events
    transitions = [s for s, e in events if e == "transition"]
    phases = [p["name"] for p in live[-1]["phases"]]
    assert len(transitions) >= 1 and phases[:2] == ["foundation", "balance"], (transitions, phases)
    log = comfy.server.log()
    assert f"resumed from {checkpoints[-1]}" in log
    assert len(new_loras(comfy, job)) == 1

    # a reload brings the plot back from the workflow the frontend keeps. The frontend saves the workflow when
    # a user interaction shows it changed (its change tracker runs on mouse-up and key presses), so click an
    # empty spot of the canvas first, as anyone does after a run.
    spot = page.evaluate("""() => {
      const rect = app.canvas.canvas.getBoundingClientRect(), ds = app.canvas.ds;
      for (let y = rect.bottom - 120; y > rect.top + 100; y -= 40) {
        for (let x = rect.right - 120; x > rect.left + 100; x -= 40) {
          const gx = (x - rect.left) / ds.scale - ds.offset[0], gy = (y - rect.top) / ds.scale - ds.offset[1];
          const el = document.elementFromPoint(x, y);
          if (!app.graph.getNodeOnPos(gx, gy) && el === app.canvas.canvas) return [x, y];
        }
      }
      return null;
    }""")
    assert spot is not None
    page.mouse.click(*spot)
    page.wait_for_timeout(300)
    page.reload()
    page.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    page.wait_for_function(f"(() => {{ try {{ return {train_plot}.length > 0; }} catch (e) {{ return false; }} }})()",
                           timeout=60_000)
    assert page.evaluate(f"{train_plot}.length") >= 100  # stored decimated to at most 2000 rows
    assert page.errors == []


def test_train_with_validation_in_the_browser_plots_val_loss_and_the_stop_advice(comfy, page):
    """The image workflow with the Train node's validation option switched on in the real frontend (the
    DynamicCombo's widgets appear and convert to API inputs): the plot draws the validation points live, the
    stop advice fires on the plateau and ends the run (stop_on_plateau), the node shows the advice and the best
    LoRA under the plot, and <lora>_best.safetensors is in models/loras. Writes the README screenshot."""
    steps, job, every = 600, "browser_val", 20
    assert convert(page, IMAGE_WF)["missing"] == []
    page.evaluate("""([steps, job, model, every]) => {
      window.__pt = { live: [], done: [] };
      const { api } = window.comfyAPI.api;
      api.addEventListener("phase_trainer.metrics", (e) => window.__pt.live.push(e.detail));
      for (const t of ["execution_success", "execution_interrupted", "execution_error"]) {
        api.addEventListener(t, (e) => window.__pt.done.push([t, e.detail.prompt_id]));
      }
      const set = (node, name, value) => {
        const w = node.widgets.find((w) => w.name === name);
        w.value = value;
        w.callback?.(value);  // the validation combo adds its settings' widgets here
      };
      for (const n of app.graph._nodes) {
        if (n.type === "PhaseTrainerLoadModel") { set(n, "diffusers_folder", model); set(n, "dtype", "fp32"); }
        if (n.type === "PhaseTrainerImageFolderDataset") set(n, "resolution", "32");
        if (n.type === "PhaseTrainerAlphaPhase") {
          set(n, "min_steps", 80); set(n, "loss_improvement_rate_below", 0.005); set(n, "min_gradient_stability", 0.45);
        }
        if (n.type === "PhaseTrainerTrain") {
          set(n, "steps", steps); set(n, "job_name", job); set(n, "learning_rate", 0.003); set(n, "batch_size", 2);
          set(n, "save_every", 100); set(n, "resume", false);
          set(n, "validation", "on");
          // 5%: a new best must be 5% below the best so far; three evaluations without one in the last phase
          set(n, "validation.every", every); set(n, "validation.items", 4); set(n, "validation.patience", 3);
          set(n, "validation.min_delta", 0.05); set(n, "validation.stop_on_plateau", true);
        }
      }
    }""", [steps, job, FAST_SD15, every])
    api = page.evaluate("async () => (await app.graphToPrompt()).output")
    (train,) = by_type(api, "PhaseTrainerTrain")
    assert {k: v for k, v in train.items() if k.startswith("validation")} == {
        "validation": "on", "validation.every": every, "validation.items": 4, "validation.patience": 3,
        "validation.min_delta": 0.05, "validation.stop_on_plateau": True}

    page.evaluate("app.queuePrompt(0, 1)")
    page.wait_for_function("window.__pt.done.length >= 1", timeout=600_000)
    run = page.evaluate("({ live: window.__pt.live, done: window.__pt.done })")
    (status, prompt_id), = run["done"]
    assert status == "execution_success", comfy.server.log()[-3000:]
    rows = [r for m in run["live"] for r in m["rows"]]
    last = rows[-1][0]
    assert last < steps  # stop_on_plateau ended the run at the advice
    val_col = run["live"][0]["columns"].index("val_loss")
    val_steps = [r[0] for r in rows if r[val_col] is not None]
    assert val_steps == list(range(every, last + 1, every))
    advice = [e for m in run["live"] for e in m["events"] if e["event"] == "suggest_stop"]
    assert [e["step"] for e in advice] == [last]
    detail = advice[0]["detail"].get("suggest_stop", advice[0]["detail"])
    best_step = detail["best_step"]
    assert best_step in val_steps and best_step < last

    # the node: validation points and the stop marker drawn, the advice and the best LoRA under the plot
    node = "app.graph._nodes.find((n) => n.type === 'PhaseTrainerTrain').phaseTrainerPlot"
    shown = page.evaluate(f"""() => {{ const p = {node}; const l = p.plot.layout;
        return {{ val: l.drawn.val, stops: l.stops.map((s) => [s.step, s.bestStep]), caption: p.caption.innerText,
                 legend: l.legendLabels, png: p.canvas.toDataURL('image/png') }}; }}""")
    assert shown["val"] == len(val_steps) and shown["stops"] == [[last, best_step]]
    assert f"stop? {last} · best {best_step}" in shown["legend"]
    best_file = comfy.loras / f"{job}_00001_best.safetensors"
    assert shown["caption"].splitlines() == [
        f"suggest stop at step {last}: validation loss plateau for 3 evaluations; best step {best_step} "
        f"(val_loss {detail['best_val_loss']:.5g})", f"best LoRA (lowest validation loss): {best_file.name}"]
    import base64
    import io

    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(shown["png"].split(",", 1)[1]))) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=int)
    stop_rgb = np.array([0xFF, 0xB0, 0x00])  # web/plot.js THEME.stop
    assert (np.abs(pixels - stop_rgb).max(axis=-1) <= 6).sum() > 100  # the dashed line, the star, the label
    # the files and the node's ui output (what a reload restores)
    assert best_file.is_file() and (comfy.loras / f"{job}_00001.safetensors").is_file()
    entry = comfy.server.history(prompt_id)
    train_id = next(k for k, v in entry["prompt"][2].items() if v["class_type"] == "PhaseTrainerTrain")
    ui = entry["outputs"][train_id]["phase_trainer_metrics"][0]
    assert ui["summary"] == shown["caption"].splitlines() and len(ui["rows"]) == last

    # the README screenshot: the node as a user sees it after the run (rewritten in docs/ only when asked, so a
    # test run leaves the working tree clean)
    import tempfile

    shot = SCREENSHOT if os.environ.get("PT_WRITE_SCREENSHOT") else Path(tempfile.mkdtemp()) / SCREENSHOT.name
    shot.parent.mkdir(exist_ok=True)
    box = page.evaluate("""() => {
      const n = app.graph._nodes.find((n) => n.type === "PhaseTrainerTrain");
      const ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT || 30;
      const grow = 760 - n.size[0];
      for (const other of app.graph._nodes) if (other.pos[0] > n.pos[0]) other.pos[0] += grow + 40;
      n.size = [n.size[0] + grow, n.size[1] + 260];
      const rect = app.canvas.canvas.getBoundingClientRect();
      ds.scale = Math.min(1.3, 880 / (n.size[1] + title));
      ds.offset = [(120 - rect.left) / ds.scale - n.pos[0], (100 - rect.top) / ds.scale - n.pos[1] + title];
      app.canvas.setDirty(true, true); app.canvas.draw(true, true);
      return { x: 110, y: 90, width: n.size[0] * ds.scale + 20, height: (n.size[1] + title) * ds.scale + 20 };
    }""")
    page.wait_for_timeout(800)
    page.screenshot(path=str(shot), clip=box)
    assert shot.stat().st_size > 20_000
    assert page.errors == []


def test_image_workflow_lora_applies_with_zero_unloaded_keys(comfy, page):
    api = tiny_run(convert(page, IMAGE_WF)["output"], steps=4, job="image_wf")
    entry, messages = comfy.run(api)
    live = live_messages(messages)
    assert len(live) >= 2 and live[-1]["done"]
    assert [m["type"] for m in messages].count("progress") >= 4
    (lora,) = new_loras(comfy, "image_wf")
    train_id = next(k for k, v in api.items() if v["class_type"] == "PhaseTrainerTrain")
    ui = entry["outputs"][train_id]["phase_trainer_metrics"][0]
    assert len(ui["rows"]) == 4 and ui["job"] == "image_wf"
    (save_id,) = [k for k, v in api.items() if v["class_type"] == "SaveImage"]
    (image,) = entry["outputs"][save_id]["images"]
    from PIL import Image

    with Image.open(comfy.base / "output" / image["subfolder"] / image["filename"]) as img:
        assert img.size == (1000, 600)  # Plot Metrics' chart, through the stock Save Image node
    unet = comfy.base / "models" / "diffusers" / SD15_FOLDER / "unet" / "diffusion_pytorch_model.safetensors"
    result = comfy_env.probe(unet, lora, diffusers_unet=True)
    assert result["model_config"] == "SD15"
    assert_lora_applies(result, lora)


def test_video_workflow_trains_a_wan_lora_that_applies(comfy, page, tmp_path):
    from safetensors.torch import save_file

    from tests.e2e.tiny_models import wan_native_state_dict

    api = tiny_run(convert(page, VIDEO_WF)["output"], steps=4, job="wan_wf")
    entry, messages = comfy.run(api)
    assert len(live_messages(messages)) >= 2
    (lora,) = new_loras(comfy, "wan_wf")
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(comfy.base / "models" / "diffusers" / WAN_FOLDER,
                                                        subfolder="transformer")
    native = tmp_path / "wan_native.safetensors"
    save_file(wan_native_state_dict(transformer), str(native))
    result = comfy_env.probe(native, lora)
    assert result["model_config"] == "WAN21_T2V"
    assert_lora_applies(result, lora)
    assert all(m.startswith("diffusion_model.blocks.") for m in lora_modules(lora))


def test_sample_then_train_workflow_samples_trains_and_samples_with_the_lora(comfy, page):
    from PIL import Image

    api = tiny_run(convert(page, SAMPLE_WF)["output"], steps=6, job="sample_wf", lr=3e-2)
    entry, messages = comfy.run(api)
    assert len(live_messages(messages)) >= 2
    assert "lora key not loaded" not in comfy.server.log()  # Load LoRA Model took every key of LORA_MODEL
    (lora,) = new_loras(comfy, "sample_wf")
    outputs = entry["outputs"]

    def images(class_type):
        (node_id,) = [k for k, v in api.items() if v["class_type"] == class_type]
        files = outputs[node_id]["images"]
        folder = comfy.base / ("temp" if files[0]["type"] == "temp" else "output")
        return [np.asarray(Image.open(folder / f["subfolder"] / f["filename"]).convert("RGB"), np.int16)
                for f in files]

    before, after = images("PreviewImage"), images("SaveImage")
    assert len(before) == len(after) == 2
    # same seed, same latent, same conditioning except the trigger word and the LoRA: different samples
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, after))
    result = comfy_env.probe(comfy.base / "models" / "checkpoints" / CHECKPOINT, lora)
    assert result["model_config"] == "SD15"
    assert_lora_applies(result, lora)


def test_export_job_and_native_outputs_feed_stock_nodes(comfy, tmp_path):
    """Export Job writes a job file (with graph images exported as a folder) that `python -m trainer run`
    trains; LORA_MODEL -> stock Save LoRA Weights, LOSS_MAP -> Plot Loss Graph, PT_METRICS -> Plot Metrics."""
    import yaml

    from trainer.job import load_job

    common = {"job_name": "export_me", "steps": 3, "learning_rate": 1e-3, "optimizer": "adamw",
              "lr_scheduler": "constant", "warmup_steps": 0, "batch_size": 2, "gradient_accumulation": 1,
              "seed": 5, "save_every": 2, "resume": False}
    phase = {"alpha": 4.0, "group": "auto", "min_steps": 1, "loss_improvement_rate_below": 0.01,
             "min_gradient_stability": 0.4, "min_loss_r2": 0.0, "max_loss_cv": 0.5, "r2_gate": False}
    prompt = {
        "1": {"class_type": "PhaseTrainerLoadModel", "inputs": {"family": "sd15", "diffusers_folder": FAST_SD15,
                                                                "dtype": "fp32"}},
        "2": {"class_type": "PhaseTrainerImageFolderDataset", "inputs": {
            "folder": IMAGE_FOLDER, "resolution": "32", "trigger_word": "ohwx", "caption_ext": "txt",
            "default_caption": "", "caption_dropout_rate": 0.0, "num_repeats": 2}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 2, "color": 0xFF8000}},
        "4": {"class_type": "PhaseTrainerImagesToDataset", "inputs": {
            "images": ["3", 0], "captions": "orange\nalso orange", "as_video": False, "trigger_word": "",
            "resolution": "", "caption_dropout_rate": 0.0, "num_repeats": 1}},
        "5": {"class_type": "PhaseTrainerMergeDatasets", "inputs": {"dataset_1": ["2", 0], "dataset_2": ["4", 0]}},
        "6": {"class_type": "PhaseTrainerLoRANetwork", "inputs": {"linear": 4, "linear_alpha": 4, "conv": 4,
                                                                  "conv_alpha": 2}},
        "7": {"class_type": "PhaseTrainerAlphaPhase", "inputs": {"name": "low", **phase}},
        "8": {"class_type": "PhaseTrainerAlphaPhase", "inputs": {"name": "high", **phase, "alpha": 9.0,
                                                                 "previous": ["7", 0], "ramp_steps": 2}},
        "9": {"class_type": "PhaseTrainerExportJob", "inputs": {"model": ["1", 0], "dataset": ["5", 0],
                                                                "network": ["6", 0], "schedule": ["8", 0], **common}},
        "10": {"class_type": "PhaseTrainerTrain", "inputs": {"model": ["1", 0], "dataset": ["5", 0],
                                                             "network": ["6", 0], "schedule": ["8", 0],
                                                             **common, "job_name": "native_out"}},
        "11": {"class_type": "SaveLoRA", "inputs": {"lora": ["10", 0], "prefix": "loras/saved_native"}},
        "12": {"class_type": "LossGraphNode", "inputs": {"loss": ["10", 2], "filename_prefix": "loss"}},
        "13": {"class_type": "PhaseTrainerPlotMetrics", "inputs": {"metrics": ["10", 1], "width": 640,
                                                                   "height": 400}},
        "14": {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}},
    }
    entry, _ = comfy.run(prompt)
    outputs = entry["outputs"]

    job_file = Path(outputs["9"]["text"][0])
    assert job_file == comfy.job_dir("export_me") / "export_me_00001.yaml"
    data = yaml.safe_load(job_file.read_text())
    job = load_job(job_file)
    assert job.job == "export_me" and job.train.steps == 3 and job.model.path.endswith(FAST_SD15)
    assert [p.name for p in job.network.alpha_schedule.phases] == ["low", "high"]
    assert job.network.alpha_schedule.ramp_steps == 2 and data["network"]["conv_alpha"] == 2
    folder, exported = job.datasets
    assert folder.folder_path.endswith(IMAGE_FOLDER) and folder.num_repeats == 2 and folder.trigger_word == "ohwx"
    assert sorted(p.name for p in Path(exported.folder_path).iterdir()) == [
        "00000.png", "00000.txt", "00001.png", "00001.txt"]
    assert exported.resolution == [32]
    out = tmp_path / "cli_out"
    data["output_dir"] = str(out)
    cli_job = tmp_path / "cli.yaml"
    cli_job.write_text(yaml.safe_dump(data))
    done = subprocess.run([os.sys.executable, "-m", "trainer", "run", str(cli_job)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "export_me.safetensors").is_file()

    # LORA_MODEL through the stock Save LoRA Weights node: the same tensors as our file
    from safetensors.torch import load_file

    (ours,) = new_loras(comfy, "native_out")
    (saved,) = (comfy.base / "output" / "loras").glob("saved_native_*.safetensors")
    a, b = load_file(str(ours)), load_file(str(saved))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k].float().numpy(), b[k].float().numpy()) for k in a)
    assert outputs["12"]["images"]  # the stock loss graph drew our LOSS_MAP
    assert outputs["13"]["phase_trainer_metrics"][0]["job"] == "native_out"
    assert len(outputs["13"]["phase_trainer_metrics"][0]["rows"]) == 3
    (plot,) = outputs["14"]["images"]
    from PIL import Image

    with Image.open(comfy.base / "temp" / plot["subfolder"] / plot["filename"]) as img:
        assert img.size == (640, 400)


def _error_of(comfy: Comfy, prompt: dict) -> dict:
    ws = comfy.server.connect_ws(timeout=300)
    try:
        prompt_id = comfy.server.post_prompt(prompt)
        messages = comfy_env.read_ws_until_done(ws, prompt_id, 300)
    finally:
        ws.close()
    (error,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    return error


def test_errors_show_on_the_node_at_fault(comfy):
    bad = comfy.base / "input" / "bad_images"
    make_image_folder(bad, count=2)
    (bad / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    dataset = {"class_type": "PhaseTrainerImageFolderDataset", "inputs": {
        "folder": "bad_images", "resolution": "32", "trigger_word": "", "caption_ext": "txt", "default_caption": "",
        "caption_dropout_rate": 0.0, "num_repeats": 1}}
    model = {"class_type": "PhaseTrainerLoadModel", "inputs": {"family": "sd15", "diffusers_folder": FAST_SD15,
                                                               "dtype": "fp32"}}
    network = {"class_type": "PhaseTrainerLoRANetwork", "inputs": {"linear": 4, "linear_alpha": 4, "conv": 0,
                                                                   "conv_alpha": 0}}
    train = {"class_type": "PhaseTrainerTrain", "inputs": {
        "model": ["1", 0], "dataset": ["2", 0], "network": ["3", 0], "job_name": "errors", "steps": 2,
        "learning_rate": 1e-3, "optimizer": "adamw", "lr_scheduler": "constant", "warmup_steps": 0, "batch_size": 1,
        "gradient_accumulation": 1, "seed": 1, "save_every": 1, "resume": False}}

    # a corrupt file: reported by the dataset node, naming the file, before any model work
    error = _error_of(comfy, {"1": model, "2": dataset, "3": network, "4": train})
    assert error["node_id"] == "2" and error["node_type"] == "PhaseTrainerImageFolderDataset"
    assert "zz_broken.png" in error["exception_message"]

    # a setting the model family cannot use: reported by Train, naming the field and the node that sets it
    (bad / "zz_broken.png").unlink()
    dataset["inputs"]["resolution"] = "36"
    error = _error_of(comfy, {"1": model, "2": dataset, "3": network, "4": train})
    assert error["node_id"] == "4"
    assert "datasets[0].resolution" in error["exception_message"] and "dataset nodes" in error["exception_message"]

    # a job name that would write outside output/phase_trainer/
    dataset["inputs"]["resolution"] = "32"
    train["inputs"]["job_name"] = "../../escape"
    error = _error_of(comfy, {"1": model, "2": dataset, "3": network, "4": train})
    assert error["node_id"] == "4" and "job_name" in error["exception_message"]
    assert not (comfy.base / "escape").exists() and not list(comfy.loras.glob("*escape*"))

    # a folder that is not the family's model
    model["inputs"]["family"] = "wan21"
    train["inputs"]["job_name"] = "errors"
    error = _error_of(comfy, {"1": model, "2": dataset, "3": network, "4": train})
    assert error["node_id"] == "1" and FAST_SD15 in error["exception_message"]

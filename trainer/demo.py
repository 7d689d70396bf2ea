"""`python -m trainer demo`: the whole product on a tiny random SD 1.5-shaped model, in under a minute on CPU.

Nothing is downloaded: the model is built from a small config with random weights and the images are drawn
here. The schedule is the seed's foundation 8 -> balance 14 -> emphasis 20 on the conv layers, with phase
lengths scaled down to a 300-step run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def make_images(folder: Path, size: int = 64) -> int:
    """Eight captioned images: colored shapes on a gray background."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = 0
    for cname, color in COLORS.items():
        for shape in SHAPES:
            img = Image.new("RGB", (size, size), (128, 128, 128))
            d = ImageDraw.Draw(img)
            c, r = size // 2 + int(rng.integers(-6, 7)), size // 4
            box = (c - r, c - r, c + r, c + r)
            (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color)
            img.save(folder / f"{cname}_{shape}.png")
            (folder / f"{cname}_{shape}.txt").write_text(f"[trigger] a {cname} {shape}", encoding="utf-8")
            n += 1
    return n


def demo_job(out: Path, model_path: Path, data: Path, steps: int) -> dict:
    phase_len = max(100, steps // 3)
    # The video preset's plateau threshold; stability 0.45 because a 64k-parameter LoRA on 8 images hovers
    # around 0.5 sign agreement (noise) -- a real run keeps the preset's 0.50-0.55.
    loose = {"loss_improvement_rate_below": 0.005, "min_gradient_stability": 0.45}
    return {
        "job": "demo",
        "output_dir": str(out),
        "model": {"family": "sd15", "path": str(model_path), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "trigger_word": "ohwx", "resolution": [32],
                      "caption_dropout_rate": 0.05}],
        "network": {
            "linear": 4, "linear_alpha": 4, "conv": 4, "conv_alpha": 8,
            "alpha_schedule": {
                "enabled": True,
                "conv_alpha_phases": {
                    "foundation": {"alpha": 8, "min_steps": phase_len - 20, "exit_criteria": loose},
                    "balance": {"alpha": 14, "min_steps": phase_len - 20, "exit_criteria": loose},
                    "emphasis": {"alpha": 20, "min_steps": phase_len - 10},
                },
            },
        },
        "train": {"steps": steps, "batch_size": 2, "lr": 1e-3, "seed": 42},
        "save": {"every": max(50, steps // 2), "keep_last": 2, "resume": "none"},
    }


def run_demo(out: Path | None = None, steps: int = 300) -> dict:
    from .job import parse_job
    from .loop import train
    from .metrics import records_to_tensor
    from .plot import save_png
    from .tiny import build_tiny_sd15

    import torch

    # A tiny model's ops are too small to split across threads: one thread is several times faster on CPU.
    torch.set_num_threads(1)
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="phase_trainer_demo_"))
    t0 = time.perf_counter()
    model = build_tiny_sd15(out / "tiny_sd15")
    data = out / "images"
    make_images(data)
    job = parse_job(demo_job(out / "run", model, data, steps))
    result = train(job)
    png = save_png(out / "run" / "metrics_demo.png", records_to_tensor(result.records).numpy(),
                   phases=_phases(result), title="Phase Trainer demo: tiny SD 1.5, conv alpha 8 -> 14 -> 20")
    print()
    print(f"transitions: {len(result.transitions)}")
    for tr in result.transitions:
        print(f"  step {tr['step']}: {tr['from_phase']} -> {tr['to_phase']}")
    print(f"LoRA:        {result.lora_path}")
    print(f"metrics log: {result.metrics_path}")
    print(f"plot:        {png}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return {"result": result, "plot": png, "out": out}


def _phases(result) -> list:
    phases, prev = [], None
    for r in result.records:
        if r.get("phase") is not None and r["phase"] != prev:
            phases.append({"name": r["phase"], "start_step": r["step"] - 1 if phases else 0})
            prev = r["phase"]
    return phases

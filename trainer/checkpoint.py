"""Atomic checkpoint bundles and resume.

A checkpoint is a folder `checkpoints/step_00000500/` holding the LoRA weights (safetensors, our internal
module names), the optimizer and LR-scheduler state (our own files, loaded with weights_only=True), RNG states,
and `state.json` (step, data position, alpha-scheduler state, job identity). The bundle is written under a
temporary name and renamed into place once complete, so a kill at any moment leaves either the previous
checkpoints or a complete new one; leftovers of an interrupted write are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE = "state.json"
FORMAT = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def bundle_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}"


def save_checkpoint(ckpt_dir: Path, *, step: int, lora: dict, optimizer: dict, lr_scheduler: dict, rng: dict,
                    state: dict, keep_last: int) -> Path:
    """Write one bundle atomically and prune older ones beyond keep_last. `state` must be JSON-serialisable."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = bundle_path(ckpt_dir, step)
    tmp = ckpt_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(lr_scheduler, tmp / "lr_scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        # state.json last: its presence marks the bundle complete even before the rename
        (tmp / STATE).write_text(json.dumps({"format": FORMAT, "step": step, **state}, allow_nan=False, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step saved again (e.g. interrupt right after a periodic save)
            old = ckpt_dir / f".old_{final.name}_{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(ckpt_dir, keep_last)
    return final


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete bundles, oldest first. Temporary and half-written folders are skipped."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE).is_file() and (p / "lora.safetensors").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune(ckpt_dir: Path, keep_last: int) -> None:
    done = complete_checkpoints(ckpt_dir)
    for p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(ckpt_dir).glob(".tmp_step_*"):  # leftovers of a killed writer (not ours: our pid is done)
        if not p.name.endswith(f"_{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def find_resume(ckpt_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        done = complete_checkpoints(ckpt_dir)
        return done[-1] if done else None
    p = Path(resume)
    if not (p / STATE).is_file():
        raise CheckpointError(f"save.resume: {p} is not a complete checkpoint folder (no {STATE}); use 'latest', "
                              f"'none', or a folder like {Path(ckpt_dir) / 'step_00000500'}")
    return p


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({e}); delete the folder or resume another") from None


def check_compatible(state: dict, path: Path, *, job_name: str, signature: str) -> None:
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT}")
    if state.get("job") != job_name:
        raise CheckpointError(f"{path} belongs to job {state.get('job')!r}, not {job_name!r}: point save.resume at "
                              "this job's checkpoints, or set resume: none to start fresh")
    if state.get("signature") != signature:
        raise CheckpointError(f"{path} was trained with a different model family, network shape or phase list "
                              f"than this job; resume it with the settings it was made with, or set resume: none "
                              f"(or a new output_dir) to start fresh")


def load_bundle(path: Path) -> dict:
    path = Path(path)
    return {
        "state": read_state(path),
        "lora": load_file(str(path / "lora.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "lr_scheduler": torch.load(path / "lr_scheduler.pt", weights_only=True),
        "rng": torch.load(path / "rng.pt", weights_only=True),
    }

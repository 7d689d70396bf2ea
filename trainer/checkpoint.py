"""Atomic checkpoint bundles and resume.

A checkpoint is a folder `checkpoints/step_00000500/` holding the LoRA weights (safetensors, our internal
module names), the optimizer and LR-scheduler state (our own files, loaded with weights_only=True), RNG states,
and `state.json` (step, data position, alpha-scheduler state, job identity). The bundle is written under a
temporary name and renamed into place once complete, so a kill at any moment leaves either the previous
checkpoints or a complete new one; leftovers of an interrupted write are ignored and cleaned up. Old bundles
are renamed away before they are deleted, so a kill while pruning never leaves a half-deleted bundle that
looks complete.

The optimizer, scheduler and RNG files are loaded with torch.load(weights_only=True): a file that needs
arbitrary unpickling (something we did not write) is refused, never executed.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE = "state.json"
BUNDLE_FILES = ("lora.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.pt", STATE)
FORMAT = 1
# Leftovers of a writer or pruner that was killed: temporary bundles, bundles being replaced or deleted.
_LEFTOVER_PREFIXES = (".tmp_step_", ".old_step_", ".del_step_")


def pause_for_tests() -> None:
    """Test-only hook: with PT_TEST_SLOW_SAVE=<seconds> in the environment, sleep between the files of a save
    so that a test can kill the process in the middle of a write. Unset (always, outside tests): no effect."""
    delay = os.environ.get("PT_TEST_SLOW_SAVE")
    if delay:
        time.sleep(float(delay))


# What a failed write raises: the OS error itself (open, mkdir, rename), or the writer's own wrapper around it --
# safetensors' SafetensorError("... I/O error: No space left on device (os error 28)") and torch.save's
# RuntimeError ("... unexpected pos ...", which hides the errno).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def write_error_text(e: BaseException, folder: Path) -> str:
    """`reason: what to do` for a failed write into `folder`."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{os.strerror(code)}: free some disk space"
    if code == errno.EFBIG:
        return f"{os.strerror(code)}: the file system or a size limit refuses files this big; use another output_dir"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{os.strerror(code)}: check the folder's permissions or choose another output_dir"
    try:
        free = f"; {shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    reason = os.strerror(code) if code else _first_line(e)
    return f"{reason}{free}: check free disk space and the folder's permissions"


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
    final = bundle_path(ckpt_dir, step)
    tmp = ckpt_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(tmp / "lora.safetensors"))
        pause_for_tests()
        torch.save(optimizer, tmp / "optimizer.pt")
        pause_for_tests()
        torch.save(lr_scheduler, tmp / "lr_scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        pause_for_tests()
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
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final} ({write_error_text(e, ckpt_dir)}). Earlier checkpoints are "
                              "untouched: the run can be resumed from the latest (save.resume: latest)") from e
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
        if m and p.is_dir() and all((p / f).is_file() for f in BUNDLE_FILES):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune(ckpt_dir: Path, keep_last: int) -> None:
    ckpt_dir = Path(ckpt_dir)
    done = complete_checkpoints(ckpt_dir)
    for p in done[:-keep_last] if keep_last > 0 else []:
        # rename first: a kill during rmtree then leaves a dot-folder that nothing mistakes for a bundle
        gone = ckpt_dir / f".del_{p.name}_{os.getpid()}"
        try:
            os.replace(p, gone)
        except OSError:
            continue
        shutil.rmtree(gone, ignore_errors=True)
    for p in ckpt_dir.iterdir():  # leftovers of a killed writer (not ours: our own writes are finished)
        if p.name.startswith(_LEFTOVER_PREFIXES) and not p.name.endswith(f"_{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def check_owner(ckpt_dir: Path, job_name: str) -> None:
    """Refuse a checkpoint folder that holds another job's bundles: the two jobs' steps would overwrite and
    prune each other's checkpoints."""
    for p in complete_checkpoints(ckpt_dir):
        owner = read_state(p).get("job")
        if owner != job_name:
            raise CheckpointError(f"{ckpt_dir} holds checkpoints of job {owner!r} ({p.name}), not of {job_name!r}: "
                                  "two jobs in one output_dir would overwrite and delete each other's checkpoints. "
                                  "Give this job its own output_dir")


def set_aside(ckpt_dir: Path) -> Path | None:
    """Before a fresh (not resumed) run: rename a checkpoint folder holding complete bundles to
    `checkpoints.<n>` (first free n), so the new run neither mixes with nor prunes them. Returns the new name."""
    ckpt_dir = Path(ckpt_dir)
    if not complete_checkpoints(ckpt_dir):
        return None
    n = 1
    while ckpt_dir.with_name(f"{ckpt_dir.name}.{n}").exists():
        n += 1
    target = ckpt_dir.with_name(f"{ckpt_dir.name}.{n}")
    os.replace(ckpt_dir, target)
    return target


def find_resume(ckpt_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        done = complete_checkpoints(ckpt_dir)
        return done[-1] if done else None
    p = Path(resume)
    if not os.path.isfile(p / STATE):
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
    bundle = {"state": read_state(path)}
    file = path / "lora.safetensors"
    try:
        bundle["lora"] = load_file(str(file))
        for name in ("optimizer", "lr_scheduler", "rng"):
            file = path / f"{name}.pt"
            # weights_only: tensors and plain containers only; anything else is refused, never executed
            bundle[name] = torch.load(file, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file}: refused to load: it holds Python objects beyond tensors and plain data, "
                              "which only running arbitrary code could rebuild; this trainer never writes such files. "
                              "Delete this checkpoint folder or resume another") from None
    except (OSError, SafetensorError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable checkpoint file ({_first_line(e)}); delete this checkpoint "
                              "folder or resume another") from None
    return bundle


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__

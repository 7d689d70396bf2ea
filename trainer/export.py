"""Write the trained LoRA as a .safetensors file that ComfyUI's stock LoraLoader applies exactly.

Per module: `<prefix>.lora_down.weight`, `<prefix>.lora_up.weight` and `<prefix>.alpha` = the alpha in force at
the end of training, so ComfyUI's scale alpha / rank reproduces the training delta. The prefix comes from the
family (kohya `lora_unet_...` for UNets, `diffusion_model.<native path>` for Wan, ...).
"""

from __future__ import annotations

import json
import os
from glob import escape as glob_escape
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import WRITE_ERRORS, pause_for_tests, write_error_text
from .errors import TrainerError
from .lora import LoRANetwork

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def comfy_state_dict(network: LoRANetwork, family_cls, dtype: torch.dtype = torch.float32) -> dict:
    sd = {}
    for m in network.lora.values():
        prefix = family_cls.export_prefix(m.name)
        if f"{prefix}.alpha" in sd:
            raise ValueError(f"two modules map to the same export key {prefix!r}: {m.name}")
        sd[f"{prefix}.lora_down.weight"] = m.down.weight.detach().to("cpu", dtype).contiguous()
        sd[f"{prefix}.lora_up.weight"] = m.up.weight.detach().to("cpu", dtype).contiguous()
        sd[f"{prefix}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return sd


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of earlier writers of `path` that were killed before their rename (never our own)."""
    mine = f".{path.name}.tmp-{os.getpid()}"
    for p in path.parent.glob(f".{glob_escape(path.name)}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.name != mine and pid.isdigit() and not _pid_alive(int(pid)):
            p.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but is not ours (EPERM), or cannot tell: leave its file alone
        return True
    return True


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    """Write to a temporary name in the same folder, fsync, then rename: a reader never sees half a file, and a
    failed write (disk full, kill) leaves the previous file as it was. Raises TrainerError naming the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        save_file(tensors, str(tmp), metadata=metadata)
        pause_for_tests()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WRITE_ERRORS as e:
        before = "is unchanged" if path.exists() else "was not created"
        raise TrainerError(f"cannot write {path} ({write_error_text(e, path.parent)}); {path.name} {before}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def lora_metadata(family, network: LoRANetwork, *, step: int, phase: str | None, history: list,
                  dataset_summary: dict | None, job_name: str) -> dict:
    """safetensors metadata is str -> str; structured values are JSON."""
    counts = network.group_counts()
    ranks = {g: next((m.rank for m in network.modules_in(g)), 0) for g in counts}
    meta = {
        "phase_trainer.job": job_name,
        "phase_trainer.family": family.name,
        "phase_trainer.ranks": json.dumps(ranks),
        "phase_trainer.alphas": json.dumps(network.alphas()),
        "phase_trainer.modules": json.dumps(counts),
        "phase_trainer.step": str(step),
        "phase_trainer.phase": phase or "",
        "phase_trainer.phase_history": json.dumps(history, default=str),
        "phase_trainer.dataset": json.dumps(dataset_summary or {}, default=str),
        "phase_trainer.model": json.dumps(family.describe(), default=str),
        # kohya-style keys that tools such as ComfyUI-Manager's LoRA info and civitai read
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks["linear"] or ranks["conv"]),
        "ss_network_alpha": str(network.alphas()["linear"] or network.alphas()["conv"]),
    }
    return meta


def save_lora(path: Path, network: LoRANetwork, family, metadata: dict, dtype: str = "fp32") -> Path:
    return atomic_save_safetensors(comfy_state_dict(network, type(family), DTYPES[dtype]), path, metadata)


def delta_from_file(path: Path) -> dict[str, torch.Tensor]:
    """ΔW per export prefix, computed from a saved file exactly as ComfyUI does: alpha / rank * up @ down."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key[: -len(".lora_down.weight")]
        down, up = sd[key].double(), sd[f"{prefix}.lora_up.weight"].double()
        rank = down.shape[0]
        alpha = sd[f"{prefix}.alpha"].item() if f"{prefix}.alpha" in sd else rank
        out[prefix] = (up.flatten(1) @ down.flatten(1)) * (alpha / rank)
    return out

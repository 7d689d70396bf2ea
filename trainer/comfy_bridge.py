"""What the ComfyUI nodes need from the library, without ComfyUI: tested in CI, imported by nodes/.

The nodes are thin: they read ComfyUI's folders and widgets, call the functions here to turn those into a
job mapping (validated by `trainer.job.parse_job`) and in-memory datasets, and hand the result to
`trainer.loop.train`. Everything here is plain Python over plain values, so it can be tested without a
ComfyUI install:

- names and folders: `check_name`, `resolve_input_folder`, `input_subfolders`, `diffusers_folders`,
  `next_free_path` (a counter suffix, never overwriting), `folder_fingerprint`;
- datasets: `Dataset` (the PT_DATASET value), `folder_dataset`, `images_dataset`, `merge_datasets`;
- network and schedule: `network_config`, `alpha_phase`, `preset_schedule` (PT_NETWORK / PT_SCHEDULE values);
- the job: `validation_section` (the Train node's validation option), `build_job_mapping`, `node_error` (a
  JobError phrased for the node that owns the field), `train_from_nodes` (the Train node's run: validate,
  train, stream metrics, interrupt; its outputs: best LoRA, stop advice, one file per expert);
- metrics: `LiveMetrics` (throttled, batched live messages), `widget_payload` / `expert_phases` (phases per
  expert for two-expert runs), `metrics_output` (PT_METRICS), `loss_map`, `png_to_image`;
- exporting: `export_items` (in-memory images -> captioned folders + job entries), `job_file_text`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .errors import DatasetError, JobError, TrainerError
from .job import PRESET_EXITS, validate_name

# Where the Train node keeps a job's metrics log and checkpoints, under ComfyUI's output folder.
OUTPUT_SUBDIR = "phase_trainer"
LORA_SUFFIX = ".safetensors"
COUNTER_DIGITS = 5
# Options of the folder pickers that mean "use the typed path below" / "no folder yet".
TYPED_PATH = "[typed path]"
GROUP_CHOICES = ("auto", "conv", "linear", "both")
# How far below ComfyUI's input folder the dataset pickers look for subfolders.
INPUT_SCAN_DEPTH = 3


# ---------------------------------------------------------------------------------------------- names, folders


def check_name(name: Any, field_name: str) -> str:
    """A job or file name with no path separators and no '..' (JobError naming `field_name` otherwise)."""
    if isinstance(name, str):
        name = name.strip()
    return validate_name(name, field_name)


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def resolve_input_folder(choice: str, typed_path: str, input_dir: str | os.PathLike, field_name: str) -> Path:
    """The dataset folder a folder node points at.

    A non-empty `typed_path` wins and must be absolute (a relative one would depend on where ComfyUI was
    started). Otherwise `choice` is a subfolder of ComfyUI's input folder, written relative to it (so a shared
    workflow finds the same folder on another machine); it may not climb out of the input folder.
    """
    typed = (typed_path or "").strip()
    if typed:
        path = Path(typed).expanduser()
        if not path.is_absolute():
            raise JobError(field_name, f"{typed!r} is not an absolute path; type a full path such as "
                                       "/data/my_images, or leave it empty and pick a subfolder of ComfyUI's "
                                       "input folder above")
        return path
    root = Path(input_dir)
    if not choice or choice == TYPED_PATH:
        raise JobError(field_name, f"no folder: pick a subfolder of {root} or type an absolute path")
    rel = Path(choice)
    if rel.is_absolute() or ".." in rel.parts:
        raise JobError(field_name, f"{choice!r} must be a subfolder of ComfyUI's input folder, written relative "
                                   "to it, without '..'; type an absolute path in the path field instead")
    path = root / rel
    if not _is_inside(path, root):
        raise JobError(field_name, f"{choice!r} leads outside ComfyUI's input folder {root} (a link?); type its "
                                   "absolute path instead")
    return path


def input_subfolders(input_dir: str | os.PathLike, max_depth: int = INPUT_SCAN_DEPTH) -> list[str]:
    """Every non-hidden subfolder of `input_dir` up to `max_depth` levels, as sorted POSIX paths relative to it."""
    root = Path(input_dir)
    found: list[str] = []
    if not root.is_dir():
        return found
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        rel = Path(dirpath).relative_to(root)
        depth = len(rel.parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if depth >= max_depth:
            dirnames[:] = []
        if depth:
            found.append(rel.as_posix())
    return sorted(found)


def diffusers_folders(roots: Iterable[str | os.PathLike], max_depth: int = 4) -> list[str]:
    """Pipeline folders (holding model_index.json) below ComfyUI's `diffusers` model folders, relative to them,
    at most `max_depth` levels down (links are followed, so a link cycle must not walk forever)."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if len(Path(dirpath).relative_to(root).parts) >= max_depth:
                dirnames[:] = []
            if "model_index.json" in filenames:
                found.add(Path(dirpath).relative_to(root).as_posix())
                dirnames[:] = []  # a pipeline's components are not pipelines
    return sorted(found)


def resolve_model_path(choice: str, typed_path: str, roots: Iterable[str | os.PathLike]) -> str:
    """The diffusers folder (or hub id) the Load Training Model node names: a typed path / hub id wins."""
    typed = (typed_path or "").strip()
    if typed:
        return str(Path(typed).expanduser()) if typed.startswith(("~", "/", ".")) else typed
    if not choice or choice == TYPED_PATH:
        raise JobError("model.path", "no model: pick a folder from models/diffusers or type a path / hub id")
    rel = Path(choice)
    if rel.is_absolute() or ".." in rel.parts:
        raise JobError("model.path", f"{choice!r} must be a folder below models/diffusers, without '..'")
    for root in roots:
        candidate = Path(root) / rel
        if (candidate / "model_index.json").is_file():
            return str(candidate)
    raise JobError("model.path", f"{choice!r} is not a diffusers folder (with model_index.json) in any of "
                                 f"{[str(r) for r in roots]}; refresh the node or pick another")


# ComfyUI model folders the "Load Training Model (ComfyUI file)" node lists, and the PT_MODEL keys that are not
# job-file fields (a single file's loading options; the job file names the file as model.path).
MODEL_FILE_FOLDERS = ("diffusion_models", "checkpoints")
MODEL_SPEC_ONLY = ("single_file",)


def model_file_choices(listing: dict[str, Iterable[str]]) -> list[str]:
    """'<folder>/<file>' for every .safetensors file ComfyUI lists in each model folder (`listing`: folder name
    -> folder_paths.get_filename_list(folder)), sorted, so two folders never collide."""
    out = []
    for folder, names in listing.items():
        out.extend(f"{folder}/{n}" for n in names if str(n).lower().endswith(".safetensors"))
    return sorted(out)


def resolve_model_file(choice: str, full_path: Callable[[str, str], str | None]) -> Path:
    """The file a '<folder>/<file>' choice names; `full_path(folder, name)` is folder_paths.get_full_path."""
    folder, _, name = (choice or "").partition("/")
    if folder not in MODEL_FILE_FOLDERS or not name:
        raise JobError("model.path", f"{choice!r} is not a file from {' or '.join(MODEL_FILE_FOLDERS)}; pick one "
                                     "from the list (refresh the node after adding files)")
    found = full_path(folder, name)
    if not found or not Path(found).is_file():
        raise JobError("model.path", f"{name!r} is not in ComfyUI's models/{folder} folders any more; refresh "
                                     "the node or pick another file")
    return Path(found)


def single_file_model(path: str | os.PathLike, dtype: str, config: str = "",
                      tokenizer_from: str | os.PathLike | None = None,
                      low_noise_path: str | os.PathLike | None = None) -> dict:
    """The PT_MODEL value for a single model file: the variant is detected now from the file's header (a
    ModelError listing what was found if it matches no known variant); the Train node loads the weights.

    An SD 1.5 checkpoint has no tokenizer files: they come from the `config` folder when it is a diffusers SD
    folder with a tokenizer, else from `tokenizer_from` (the node passes ComfyUI's comfy/sd1_tokenizer); the
    spec names that folder as encoders_from, so an exported job file finds it too.

    Wan 2.2 A14B is two files: `path` the high-noise expert, `low_noise_path` the low-noise one (the pair makes the
    family wan22_14b / wan22_14b_i2v; both headers are checked now). The spec's low_noise_path is the job field."""
    from .errors import ModelError
    from .families.single_file import detect_variant, find_clip_tokenizer, has_clip_tokenizer

    config = (config or "").strip() or None
    variant = detect_variant(path, config=config)
    if variant.family.startswith("wan"):  # the expert pair, or a lone 14B file named like an expert: ModelError
        from .families.single_file.wan22 import expert_variant

        variant, low_noise_path = expert_variant(Path(path), variant, None, low_noise_path, config)
    elif low_noise_path is not None:
        raise ModelError(f"{path}: is {variant.description}; the low-noise file is only for a Wan 2.2 A14B expert pair")
    spec = {"family": variant.family, "path": str(path), "dtype": dtype,
            "single_file": {"variant": variant.name, "description": variant.description, "config": config}}
    if low_noise_path is not None:
        spec["low_noise_path"] = str(low_noise_path)
    if variant.family in ("sd15", "sdxl"):  # the checkpoint holds no tokenizer files
        named = config if config is not None and Path(config).expanduser().is_dir() and has_clip_tokenizer(config) \
            else None
        spec["encoders_from"] = str(find_clip_tokenizer(named, tokenizer_from, path))  # ModelError if neither
    return spec


def load_model_for_nodes(model: dict, dtype, encoders=None, device="cpu"):
    """A loaded family for the Train node when the library's own loading does not do: a single file, or
    ComfyUI's encoders (`encoders`, a trainer.comfy_encoders.ExternalEncoders). None: let train() load it."""
    from .errors import ModelError
    from .families import get_family

    spec = model.get("single_file")
    if spec is None and encoders is None:
        return None
    if spec is not None:
        from .families.single_file import load_single_file

        return load_single_file(model["path"], dtype, device, config=spec.get("config"), encoders=encoders,
                                family=model["family"], encoders_from=model.get("encoders_from"),
                                low_noise_path=model.get("low_noise_path"))
    family = get_family(model["family"]).load(model["path"], dtype=dtype, device=device)
    family.loaded.extra["external_encoders"] = encoders
    return family


# One line per family for the Load Training Model node's tooltip (a test keeps it in step with FAMILIES).
FAMILY_NOTES = {
    "sd15": "Stable Diffusion 1.5 (images)",
    "sdxl": "Stable Diffusion XL (images)",
    "flux": "FLUX.1 dev / schnell (images)",
    "wan21": "Wan 2.1 text-to-video, 1.3B / 14B",
    "wan21_i2v": "Wan 2.1 image-to-video 14B",
    "wan22_5b": "Wan 2.2 TI2V-5B, text- and image-to-video",
    "wan22_14b": "Wan 2.2 A14B text-to-video: two experts, one LoRA each (high / low noise)",
    "wan22_14b_i2v": "Wan 2.2 A14B image-to-video: two experts, one LoRA each (high / low noise)",
}


def family_tooltip(names: Iterable[str]) -> str:
    """'name: what it trains' for each family, one per line."""
    return "\n".join(f"{n}: {FAMILY_NOTES.get(n, n)}" for n in sorted(names))


_COUNTER_RE = re.compile(r"^(?P<name>.+)_(?P<n>\d{%d,})$" % COUNTER_DIGITS)


def next_free_path(folder: str | os.PathLike, name: str, suffix: str = LORA_SUFFIX) -> Path:
    """`folder/<name>_<NNNNN><suffix>` with NNNNN one above the highest counter already used for `name`.

    Never an existing file: a counter past a gap is not reused, so the newest file always sorts last."""
    name = check_name(name, "lora_name")
    folder = Path(folder)
    highest = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if not p.name.endswith(suffix):
                continue
            m = _COUNTER_RE.match(p.name[: -len(suffix)])
            if m and m.group("name") == name:
                highest = max(highest, int(m.group("n")))
            elif p.name[: -len(suffix)].startswith(f"{name}_"):
                # a partial LoRA of an interrupted run: <name>_<NNNNN>_step<k>
                rest = p.name[len(name) + 1: -len(suffix)]
                head = rest.split("_", 1)[0]
                if head.isdigit() and len(head) >= COUNTER_DIGITS:
                    highest = max(highest, int(head))
    n = highest + 1
    while True:
        candidate = folder / f"{name}_{n:0{COUNTER_DIGITS}d}{suffix}"
        if not candidate.exists():
            return candidate
        n += 1


def folder_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a folder's file names, sizes and modification times: changes when its content does."""
    path = Path(path)
    h = hashlib.sha256(str(path).encode())
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        return f"unreadable:{exc}"
    for e in entries:
        try:
            st = e.stat()
        except OSError:
            continue
        h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- text inputs


def split_list(text: str | None) -> list[str]:
    """'a, b\\nc' -> ['a', 'b', 'c'] (commas or new lines; blanks dropped)."""
    if not text:
        return []
    return [p.strip() for p in re.split(r"[,\n]", text) if p.strip()]


def parse_resolutions(text: str | int | None, field_name: str, allow_empty: bool = False) -> list[int] | None:
    """'512' or '512, 768' -> [512, 768]; empty -> None when `allow_empty` (meaning: the media's own size)."""
    if isinstance(text, int) and not isinstance(text, bool):
        values = [str(text)]
    else:
        values = split_list(str(text or ""))
    if not values:
        if allow_empty:
            return None
        raise JobError(field_name, "give one or more pixel sizes, e.g. 512 or 512, 768")
    out = []
    for v in values:
        if not v.isdigit() or int(v) <= 0:
            raise JobError(field_name, f"{v!r} is not a pixel size; give whole numbers such as 512 or 512, 768")
        out.append(int(v))
    return out


def split_captions(text: str, count: int, as_video: bool) -> list[str] | str:
    """Captions for an IMAGE batch of `count`: one line per image, or one caption for all.

    A single line (or a clip) is one caption for everything. Several lines must be exactly one per image."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if as_video or len(lines) <= 1:
        return " ".join(lines) if as_video else (lines[0] if lines else "")
    if len(lines) != count:
        raise DatasetError("Images to Dataset", f"got {len(lines)} caption lines for {count} images: write one "
                                                "line per image, or a single line for all of them")
    return lines


# ---------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class Dataset:
    """The PT_DATASET value: dataset-folder settings (job-file entries) and in-memory items, in order."""

    configs: tuple = ()        # dicts with trainer.job.DatasetConfig keys
    items: tuple = ()          # trainer.data.sources.MediaItem (from IMAGE batches)
    summaries: tuple = ()      # one line per part, for logs and the node's text

    @property
    def empty(self) -> bool:
        return not self.configs and not self.items

    def describe(self) -> str:
        return "; ".join(self.summaries) or "empty"


class _AnyFamily:
    """Stands in for the model family when a dataset node scans its folder before the model is known.

    It accepts any frame count and the smallest size step of the families, so the scan reports missing,
    empty, corrupt and unreadable files on the dataset node itself; the family's own rules (size step,
    frame counts) are checked again against the real family when the Train node validates the job."""

    name = ""
    resolution_factor = 8

    def __init__(self, video: bool):
        self.video = video

    @staticmethod
    def valid_num_frames(n: int) -> bool:
        return True

    @staticmethod
    def num_frames_rule() -> str:
        return "any"


def dataset_config(folder: Path, *, caption_ext: str = "txt", trigger_word: str = "", default_caption: str = "",
                   caption_dropout_rate: float = 0.0, resolution: str | int = "512", num_repeats: int = 1,
                   num_frames: int = 1, frame_sampling: str = "auto", cache_latents_to_disk: bool = False,
                   on_bad_file: str = "error") -> dict:
    """A job-file dataset entry from a folder node's widgets."""
    ext = (caption_ext or "txt").strip().lstrip(".")
    return {
        "folder_path": str(folder),
        "caption_ext": ext or "txt",
        "trigger_word": (trigger_word or "").strip() or None,
        "caption_dropout_rate": float(caption_dropout_rate),
        "resolution": parse_resolutions(resolution, "resolution"),
        "num_frames": int(num_frames),
        "num_repeats": int(num_repeats),
        "default_caption": default_caption or "",
        "cache_latents_to_disk": bool(cache_latents_to_disk),
        "on_bad_file": on_bad_file,
        "frame_sampling": frame_sampling,
    }


def folder_dataset(cfg: dict, *, video: bool, log: Callable[[str], None] = print) -> Dataset:
    """Scan one dataset folder now (bad files are reported here, naming them) and wrap its config."""
    from .data.sources import scan_folder

    # Scanned as if videos were fine, so that a clip in an image folder gets the message below.
    items = scan_folder(cfg, _AnyFamily(video=True), log=log)
    kinds = {k: sum(1 for i in items if i.kind == k) for k in ("image", "video")}
    if not video and kinds["video"]:
        names = ", ".join(Path(str(i.path)).name for i in items if i.kind == "video")[:200]
        raise DatasetError(cfg["folder_path"], f"holds videos ({names}); use the Video Folder Dataset node for "
                                               "clips, or move them out")
    what = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in kinds.items() if n)
    summary = f"{cfg['folder_path']}: {what}"
    return Dataset(configs=(cfg,), summaries=(summary,))


def images_dataset(images, captions: str, *, as_video: bool, trigger_word: str = "", resolution: str = "",
                   caption_dropout_rate: float = 0.0, num_repeats: int = 1) -> Dataset:
    """An IMAGE batch ([B, H, W, 3] in 0..1) as training items: separate images, or one clip of B frames."""
    from .data.sources import items_from_tensors

    count = int(images.shape[0]) if hasattr(images, "shape") and len(images.shape) == 4 else 0
    items = items_from_tensors(
        images, split_captions(captions, count, as_video), as_video, (trigger_word or "").strip() or None,
        resolution=parse_resolutions(resolution, "resolution", allow_empty=True),
        caption_dropout_rate=caption_dropout_rate, num_repeats=num_repeats, source="Images to Dataset",
    )
    h, w = int(images.shape[1]), int(images.shape[2])
    summary = (f"1 clip of {count} frames at {w}x{h}" if as_video else
               f"{count} image{'s' if count != 1 else ''} at {w}x{h}")
    return Dataset(items=tuple(items), summaries=(summary,))


def merge_datasets(*datasets: Dataset | None) -> Dataset:
    parts = [d for d in datasets if d is not None]
    return Dataset(configs=tuple(c for d in parts for c in d.configs),
                   items=tuple(i for d in parts for i in d.items),
                   summaries=tuple(s for d in parts for s in d.summaries))


def trainable_items(dataset: Dataset) -> list:
    """The in-memory items with their pixels copied into ordinary tensors.

    ComfyUI runs nodes under torch.inference_mode, so an IMAGE batch arrives as an inference tensor, which
    autograd may not save; copies made outside inference mode are ordinary. The cached node output is left
    untouched (items are replaced, not mutated)."""
    return [replace(i, pixels=i.pixels.clone()) if i.pixels is not None else i for i in dataset.items]


# ---------------------------------------------------------------------------------------------- network, schedule


def network_config(*, linear: int, linear_alpha: float, conv: int = 0, conv_alpha: float = 0.0,
                   only_if_contains: str = "", ignore_if_contains: str = "", dropout: float = 0.0) -> dict:
    """The PT_NETWORK value: the job file's `network` section (without its alpha schedule)."""
    if int(linear) == 0 and int(conv) == 0:
        raise JobError("network.linear", "linear and conv ranks are both 0: nothing would be trained; set linear > 0")
    return {
        "linear": int(linear), "linear_alpha": float(linear_alpha), "conv": int(conv),
        "conv_alpha": float(conv_alpha), "only_if_contains": split_list(only_if_contains),
        "ignore_if_contains": split_list(ignore_if_contains), "dropout": float(dropout),
    }


def exit_criteria(*, loss_improvement_rate_below: float, min_gradient_stability: float, min_loss_r2: float,
                  max_loss_cv: float, r2_gate: bool) -> dict:
    return {"loss_improvement_rate_below": float(loss_improvement_rate_below),
            "min_gradient_stability": float(min_gradient_stability), "min_loss_r2": float(min_loss_r2),
            "max_loss_cv": float(max_loss_cv), "r2_gate": bool(r2_gate)}


def alpha_phase(previous: dict | None, *, name: str, alpha: float, group: str, min_steps: int, exit: dict,
                ramp_steps: int = 0, window: int = 200) -> dict:
    """The PT_SCHEDULE value after appending one phase to `previous` (None: this is the first phase).

    Schedule-wide settings (ramp_steps, window) come from the last phase node of the chain, the one the Train
    node sees. Every phase of a chain drives the same module group."""
    name = (name or "").strip()
    check_name(name, "Alpha Phase name")
    if group not in GROUP_CHOICES:
        raise JobError("Alpha Phase group", f"must be one of {', '.join(GROUP_CHOICES)}; got {group!r}")
    phases = list(previous["phases"]) if previous else []
    if any(p["name"] == name for p in phases):
        raise JobError("Alpha Phase name", f"a phase named {name!r} is already earlier in this chain; give each "
                                           "phase its own name")
    if phases and phases[-1]["group"] != group:
        raise JobError("Alpha Phase group", f"is {group!r} but the previous phase drives {phases[-1]['group']!r}: "
                                            "all phases of one schedule drive the same module group")
    if not float(alpha) > 0:
        raise JobError("Alpha Phase alpha", f"must be > 0; got {alpha}")
    phases.append({"name": name, "alpha": float(alpha), "group": group, "min_steps": int(min_steps),
                   "exit_criteria": dict(exit)})
    return {"phases": phases, "ramp_steps": int(ramp_steps), "window": int(window), "preset": None}


def preset_schedule(preset: str, *, group: str = "auto", alphas=(8.0, 14.0, 20.0), min_steps=(2000, 3000, 2000),
                    ramp_steps: int = 0, window: int = 200) -> dict:
    """The seed's foundation -> balance -> emphasis schedule with the preset's exit criteria (PT_SCHEDULE)."""
    from .schedule.presets import PHASE_NAMES, preset_phases

    if group not in GROUP_CHOICES:
        raise JobError("alpha_schedule.group", f"must be one of {', '.join(GROUP_CHOICES)}; got {group!r}")
    # preset_phases validates the preset name, the alphas and the step counts, naming the field at fault.
    phases = preset_phases(preset, "conv" if group == "auto" else group, alphas, min_steps)
    crit = asdict(PRESET_EXITS[preset])
    out = [{"name": n, "alpha": float(a), "group": group, "min_steps": p.min_steps, "exit_criteria": dict(crit)}
           for n, a, p in zip(PHASE_NAMES, alphas, phases)]
    return {"phases": out, "ramp_steps": int(ramp_steps), "window": int(window), "preset": preset}


def resolve_group(group: str, family_cls, conv_rank: int) -> str:
    """'auto' -> 'conv' when the family trains conv layers at this conv rank (the seed's UNet schedule),
    else 'linear' (transformers such as Wan)."""
    if group != "auto":
        return group
    return "conv" if family_cls.has_conv_targets(conv_rank) else "linear"


def schedule_mapping(schedule: dict, family_cls, conv_rank: int) -> dict:
    """The job file's `network.alpha_schedule` section for a PT_SCHEDULE value."""
    if not schedule or not schedule.get("phases"):
        raise JobError("network.alpha_schedule", "the schedule has no phases")
    group = resolve_group(schedule["phases"][0]["group"], family_cls, conv_rank)
    groups = ("conv", "linear") if group == "both" else (group,)
    out: dict = {"enabled": True, "ramp_steps": int(schedule.get("ramp_steps", 0)),
                 "window": int(schedule.get("window", 200))}
    for g in groups:
        out[f"{g}_alpha_phases"] = {
            p["name"]: {"alpha": p["alpha"], "min_steps": p["min_steps"], "exit_criteria": dict(p["exit_criteria"])}
            for p in schedule["phases"]}
    return out


# ---------------------------------------------------------------------------------------------- the job

VALIDATION_KEYS = ("every", "items", "patience", "min_delta", "stop_on_plateau")


def validation_section(choice: dict | str | None) -> dict | None:
    """The job file's `validation` section from the Train node's validation option (a DynamicCombo value:
    {"validation": "off"} or {"validation": "on", "every", "items", "patience", "min_delta", "stop_on_plateau"});
    None when off or absent. The other settings keep the job file's defaults (trainer.job.ValidationConfig)."""
    if choice is None or choice == "off":
        return None
    if not isinstance(choice, dict):
        raise JobError("validation", f"expected the validation option's values, got {choice!r}")
    state = choice.get("validation", "on")
    if state == "off":
        return None
    if state != "on":
        raise JobError("validation", f"must be 'off' or 'on', got {state!r}")
    return {k: choice[k] for k in VALIDATION_KEYS if choice.get(k) is not None}


def build_job_mapping(*, job_name: str, model: dict, dataset: Dataset, network: dict, schedule: dict | None,
                      train: dict, output_dir: str | os.PathLike, resume: bool, save_every: int,
                      keep_last: int = 3, validation: dict | None = None) -> dict:
    """A job mapping for `trainer.job.parse_job(..., require_datasets=False)` from the nodes' values.

    In-memory items are not part of the mapping; the caller passes them to train() as extra items.
    `validation`: the job's validation section (validation_section) or None. With it, a preset schedule's
    phases end on a validation-loss plateau, as a job file's `preset:` does (trainer.job)."""
    from .families import get_family

    name = check_name(job_name, "job_name")
    if dataset is None or dataset.empty:
        raise JobError("datasets", "nothing to train on: connect a dataset node")
    family_cls = get_family(model["family"])
    net = dict(network)
    if schedule is not None:
        net["alpha_schedule"] = schedule_mapping(schedule, family_cls, int(network.get("conv", 0)))
        if validation is not None and schedule.get("preset"):
            for group_phases in (v for k, v in net["alpha_schedule"].items() if k.endswith("_alpha_phases")):
                for phase in group_phases.values():
                    phase["exit_criteria"]["source"] = "validation"
    return {
        "job": name,
        "output_dir": str(output_dir),
        "model": {**{k: v for k, v in model.items() if k not in MODEL_SPEC_ONLY},
                  **({"config": model["single_file"]["config"]}
                     if (model.get("single_file") or {}).get("config") else {})},
        "datasets": [dict(c) for c in dataset.configs],
        "network": net,
        "train": dict(train),
        "save": {"every": int(save_every), "keep_last": int(keep_last), "resume": "latest" if resume else "none"},
        **({"validation": dict(validation)} if validation is not None else {}),
    }


# The node that owns each job-file section, for error messages on the Train node.
_FIELD_OWNERS = (
    ("network.alpha_schedule", "the Alpha Phase / Alpha Schedule Preset nodes"),
    ("network", "the LoRA Network node"),
    ("model", "the Load Training Model node"),
    ("datasets", "the dataset nodes"),
    ("train", "this node"),
    ("save", "this node"),
    ("validation", "this node's validation option"),
    ("job", "this node"),
)


def field_owner(field_name: str) -> str | None:
    """The node that sets a job-file field ('network.linear' -> 'the LoRA Network node')."""
    for prefix, owner in _FIELD_OWNERS:
        if field_name == prefix or field_name.startswith((prefix + ".", prefix + "[")):
            return owner
    return None


def node_error(exc: JobError) -> JobError:
    """The same JobError, its message also saying which node's setting is at fault."""
    owner = field_owner(exc.field)
    return JobError(exc.field, f"{exc.message} (set in {owner})" if owner else exc.message)


# ---------------------------------------------------------------------------------------------- metrics


class LiveMetrics:
    """Batches per-step metrics records into a few live messages a second for the node's plot.

    Each message: {"node", "reset", "job", "columns", "rows" (new rows only), "phases" (all phases seen so
    far), "events" (new ones), "done"}. The first message resets the plot; on a resumed run it also carries
    the earlier records (`history`), so the plot shows the whole run. `send(message)` delivers it (ComfyUI's
    PromptServer.send_sync in the node)."""

    def __init__(self, node_id: str, phases, send: Callable[[dict], None], *, job: str | None = None,
                 min_interval_s: float = 0.25, clock: Callable[[], float] = time.monotonic,
                 history: Callable[[int], list] | None = None):
        self.node_id = str(node_id)
        self.phase_defs = list(phases or ())
        self.send = send
        self.job = job
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.history = history
        self.pending: list[dict] = []
        self.phases: list[dict] = []
        self._expert_seen: dict = {}  # expert -> its last phase_idx (two-expert runs)
        self.sent_messages = 0
        self.sent_rows = 0
        self._last_sent: float | None = None
        self._started = False

    def add(self, record: dict) -> None:
        if not self._started and self.history is not None and record.get("step", 1) > 1:
            # a resumed run: the log already holds the steps before this one
            earlier = [r for r in self.history(record["step"]) if r.get("step", 0) < record["step"]]
            self.pending.extend(earlier)
        self._started = True
        self.pending.append(record)
        now = self.clock()
        if self._last_sent is None or now - self._last_sent >= self.min_interval_s:
            self.flush()

    def flush(self, done: bool = False) -> dict | None:
        """Send what is pending (and `done`, once at the end, even with nothing pending)."""
        if not self.pending and not done:
            return None
        from .metrics import COLUMNS, metrics_payload, records_to_tensor

        chunk = metrics_payload(self.pending, self._flat_defs()) if self.pending else {
            "rows": [], "phases": [], "events": []}
        per_expert = expert_phases(records_to_tensor(self.pending), self.phase_defs, self._expert_seen) \
            if self.pending else []
        if per_expert or self._expert_seen:
            self.phases.extend(per_expert)
        else:
            for ph in chunk["phases"]:
                if not self.phases or self.phases[-1]["phase_idx"] != ph["phase_idx"]:
                    self.phases.append(ph)
        message = {"node": self.node_id, "reset": self.sent_messages == 0, "job": self.job,
                   "columns": list(COLUMNS), "rows": chunk["rows"], "phases": list(self.phases),
                   "events": chunk["events"], "done": bool(done)}
        self.pending = []
        self._last_sent = self.clock()
        self.sent_messages += 1
        self.sent_rows += len(message["rows"])
        self.send(message)
        return message

    def _flat_defs(self) -> list:
        return [] if isinstance(self.phase_defs, dict) else self.phase_defs


def _phase_name_and_alpha(defs, idx: int):
    d = defs[idx] if 0 <= idx < len(defs) else None
    if d is None:
        return f"phase {idx}", None
    if isinstance(d, str):
        return d, None
    return d.name, {g: float(a) for g, a in d.alphas.items()}


def expert_phases(tensor, phase_defs, seen: dict | None = None) -> list[dict]:
    """The phases of a two-expert run (Wan 2.2 A14B), one list per expert in step order: [{"name",
    "phase_idx", "start_step", "alpha", "expert"}], what the widget draws in one lane per expert. [] when no
    row names an expert.

    The experts take turns and each follows its own copy of the schedule, so a change of phase_idx in row
    order means nothing; only a change within one expert's rows starts a phase. `phase_defs`: the schedule's
    phases (Phase objects or names) shared by both experts, or {expert: phases}. `seen` (expert -> last
    phase_idx) carries the state from one chunk of a live run to the next; it is updated."""
    from .metrics import COLUMNS, EXPERT_CODES

    seen = {} if seen is None else seen
    col = {c: i for i, c in enumerate(COLUMNS)}
    names = {code: name for name, code in EXPERT_CODES.items()}
    out = []
    for row in tensor.tolist():
        e, idx, step = row[col["expert_idx"]], row[col["phase_idx"]], row[col["step"]]
        if not (math.isfinite(e) and math.isfinite(idx)):
            continue
        expert, idx = names.get(int(e), f"expert {int(e)}"), int(idx)
        if seen.get(expert) == idx:
            continue
        seen[expert] = idx
        defs = phase_defs.get(expert, ()) if isinstance(phase_defs, dict) else (phase_defs or ())
        name, alpha = _phase_name_and_alpha(list(defs), idx)
        if alpha is None:  # names only: the alphas logged at the phase's first row
            alpha = {g: (float(row[col[f"{g}_alpha"]]) if math.isfinite(row[col[f"{g}_alpha"]]) else None)
                     for g in ("linear", "conv")}
        out.append({"name": name, "phase_idx": idx, "start_step": int(step), "alpha": alpha, "expert": expert})
    return out


def widget_payload(records_or_tensor, phase_defs, job: str | None = None, events: list | None = None) -> dict:
    """trainer.metrics.metrics_payload for the widget, with the phases per expert for a two-expert run.
    `events`: the run's events with their details, to use instead of those the tensor's event codes give."""
    from .metrics import metrics_payload, records_to_tensor

    flat = [] if isinstance(phase_defs, dict) else list(phase_defs or ())
    payload = metrics_payload(records_or_tensor, flat)
    tensor = records_or_tensor if hasattr(records_or_tensor, "tolist") else records_to_tensor(records_or_tensor)
    per_expert = expert_phases(tensor, phase_defs)
    if per_expert:
        payload["phases"] = per_expert
    if events is not None:
        payload["events"] = list(events)
    payload["job"] = job
    return payload


def own_details(events: list) -> list:
    """Events with each one's own detail: several events at one step share one detail keyed by event name
    ({"suggest_stop": {...}, "checkpoint": {...}}); this unpacks it (what trainer.plot reads)."""
    out = []
    for e in events or ():
        d = e.get("detail")
        if isinstance(d, dict) and isinstance(d.get(e.get("event")), dict):
            e = {**e, "detail": d[e["event"]]}
        out.append(e)
    return out


def render_phases(phases: list) -> list:
    """The phases trainer.plot.render_png can draw (one row of bands): a two-expert run's first expert's."""
    first = phases[0].get("expert") if phases else None
    return [p for p in phases if p.get("expert") == first]


def phase_definitions(job) -> list | dict:
    """The phases the widget labels: the schedule's, or {expert: phases} for a two-expert family."""
    net = job.network
    if net.alpha_schedule_per_expert:
        from .metrics import EXPERT_CODES

        return {e: list(cfg.phases) for e in EXPERT_CODES if (cfg := net.schedule_for(e)) is not None}
    return list(net.alpha_schedule.phases) if net.alpha_schedule else []


def _names(defs) -> list | dict:
    if isinstance(defs, dict):
        return {e: _names(v) for e, v in defs.items()}
    return [p if isinstance(p, str) else p.name for p in (defs or ())]


def metrics_output(records: list, phases, job: str | None = None) -> dict:
    """The PT_METRICS value: the metrics tensor, its column names, the phases (names, for labels; {expert:
    names} for a two-expert run), the phases as the widget draws them, the events with their details (the
    stop advice's best step) and the job name."""
    from .metrics import COLUMNS, records_to_tensor

    tensor = records_to_tensor(records)
    names = _names(phases)
    payload = widget_payload(records, phases, job)
    return {"tensor": tensor, "columns": list(COLUMNS), "phase_names": names, "phases": payload["phases"],
            "events": payload["events"], "job": job}


def payload_from_metrics(metrics: dict) -> dict:
    """The widget payload for a PT_METRICS value (what the Plot Metrics node shows and stores)."""
    from .metrics import COLUMNS

    tensor = metrics["tensor"]
    if list(metrics.get("columns", COLUMNS)) != list(COLUMNS):
        raise TrainerError(f"PT_METRICS columns {metrics.get('columns')} are not this version's {list(COLUMNS)}")
    return widget_payload(tensor, metrics.get("phase_names") or [], metrics.get("job"), metrics.get("events"))


def loss_map(records: list) -> dict:
    """ComfyUI's LOSS_MAP ({"loss": [float, ...]}, what the stock Plot Loss Graph node reads): the finite
    losses in step order."""
    return {"loss": [float(r["loss"]) for r in records
                     if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]}


def png_to_image(png: bytes):
    """PNG bytes -> a ComfyUI IMAGE: float32 torch tensor [1, H, W, 3] in 0..1."""
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


# ---------------------------------------------------------------------------------------------- a node's run


@dataclass
class NodeRun:
    """What the Train node returns: the native LORA_MODEL dict, PT_METRICS, LOSS_MAP, the file, the payload.

    Two-expert families (Wan 2.2 A14B): `lora_state` and `lora_path` are the high-noise expert's (the
    low-noise one's when only that expert trains), `lora_paths` names both files and `lora_low_noise` is the
    low-noise expert's LORA_MODEL ({} for one-denoiser families). `summary`: lines for the node (the stop
    advice, the best LoRA, the files)."""

    job: Any
    lora_state: dict
    metrics: dict
    loss_map: dict
    lora_path: Path
    payload: dict
    step: int
    live_messages: int = 0
    best_lora_path: Path | None = None
    stop_advice: dict | None = None
    lora_paths: dict = field(default_factory=dict)
    lora_low_noise: dict = field(default_factory=dict)
    summary: list = field(default_factory=list)


def run_summary(result) -> list[str]:
    """What the node shows under its plot after a run: the stop advice, the best LoRA, each expert's file."""
    from .schedule.stop_advice import format_advice

    lines = []
    if result.stop_advice:
        lines.append(format_advice(result.stop_advice))
    if result.lora_paths:
        lines.append("LoRA per expert: " + ", ".join(f"{e} {Path(p).name}" for e, p in result.lora_paths.items()))
        # each expert keeps its own best file beside its LoRA (the run's counter is new, so these are this run's)
        best = {e: best_path_for(p) for e, p in result.lora_paths.items()}
        best = {e: p for e, p in best.items() if p.is_file()}
        if best:
            lines.append("best LoRA per expert (lowest validation loss): "
                         + ", ".join(f"{e} {p.name}" for e, p in best.items()))
    elif result.best_lora_path is not None:
        lines.append(f"best LoRA (lowest validation loss): {Path(result.best_lora_path).name}")
    return lines


def best_path_for(lora_path: str | os.PathLike) -> Path:
    """Where the loop keeps the best-by-validation weights of `lora_path`: <stem>_best.safetensors beside it."""
    path = Path(lora_path)
    return path.with_name(f"{path.stem}_best{path.suffix or LORA_SUFFIX}")


def low_noise_lora(result) -> dict:
    """The low-noise expert's LORA_MODEL (ComfyUI keys, as its file holds them); {} when there is none."""
    path = (result.lora_paths or {}).get("low_noise")
    if path is None:
        return {}
    if Path(path) == Path(result.lora_path):  # only the low-noise expert trained: it is the main LoRA
        return result.lora_state
    from safetensors.torch import load_file

    return load_file(str(path))


def parse_node_job(mapping: dict):
    """parse_job for node-built mappings; a JobError comes back naming the node that owns the field."""
    from .job import parse_job

    try:
        return parse_job(mapping, require_datasets=False)
    except JobError as exc:
        raise node_error(exc) from None


def train_from_nodes(mapping: dict, dataset: Dataset, *, lora_path: str | os.PathLike, node_id: str,
                     send: Callable[[dict], None], progress: Callable[[int, int], None],
                     interrupted: Callable[[], bool], log: Callable[[str], None] = print, accelerator=None,
                     min_interval_s: float = 0.25, model: dict | None = None, encoders=None) -> NodeRun:
    """Validate the nodes' job, train it, and stream its metrics: what the Train node does, minus ComfyUI.

    `send(message)` gets the throttled live messages (LiveMetrics); `progress(step, total)` is called every
    step; `interrupted()` is polled every step, and when it turns true the loop saves a checkpoint and the
    partial LoRA and `trainer.errors.InterruptedTraining` propagates (after a final live message with
    done=True). Without resume the loop moves an earlier run's checkpoints of this job aside.
    `model` (the PT_MODEL value) and `encoders` (ComfyUI's CLIP/VAE as ExternalEncoders): a single model file or
    outside encoders are loaded here (load_model_for_nodes) and the family handed to train()."""
    from .errors import InterruptedTraining
    from .loop import Callbacks, train
    from .metrics import read_records

    job = parse_node_job(mapping)
    phases = phase_definitions(job)
    metrics_path = job.metrics_path
    live = LiveMetrics(node_id, phases, send, job=job.job, min_interval_s=min_interval_s,
                       history=lambda step: read_records(metrics_path) if metrics_path.exists() else [])
    total = job.train.steps

    class _NodeCallbacks(Callbacks):
        def log(self, message: str) -> None:
            log(message)

        def on_step(self, record: dict) -> None:
            live.add(record)
            progress(int(record["step"]), total)

        def should_stop(self) -> bool:
            return bool(interrupted())

    try:
        # The in-memory items go in with the folders: scan_datasets passes MediaItems through and checks them
        # against the family (a clip's frame count, a video on an image family) before any model loads.
        run_job = replace(job, datasets=list(job.datasets) + trainable_items(dataset))
        family = None
        if model is not None:
            from .loop import TORCH_DTYPES

            family = load_model_for_nodes(model, TORCH_DTYPES[job.model.dtype], encoders)
            if family is not None:
                log(f"loaded {family.name} from {job.model.path}"
                    + (" with the graph's CLIP/VAE" if encoders is not None else ""))
        result = train(run_job, _NodeCallbacks(), family=family, lora_path=Path(lora_path), accelerator=accelerator)
    except InterruptedTraining:
        live.flush(done=True)
        raise
    except BaseException:
        live.flush(done=True)  # the plot keeps what it got
        raise
    live.flush(done=True)
    metrics = metrics_output(result.records, phases, job.job)
    payload = widget_payload(result.records, phases, job.job)
    summary = run_summary(result)
    if summary:
        payload["summary"] = summary
    for line in summary:
        log(line)
    return NodeRun(job=job, lora_state=result.lora_state, metrics=metrics, loss_map=loss_map(result.records),
                   lora_path=Path(result.lora_path), payload=payload, step=result.step,
                   live_messages=live.sent_messages, best_lora_path=result.best_lora_path,
                   stop_advice=result.stop_advice, lora_paths=dict(result.lora_paths or {}),
                   lora_low_noise=low_noise_lora(result), summary=summary)


# ---------------------------------------------------------------------------------------------- export


def _item_settings(item) -> tuple:
    return (item.kind, tuple(item.resolutions), int(item.num_frames if item.kind == "video" else 1),
            int(item.num_repeats), float(item.caption_dropout_rate), item.width, item.height)


def export_items(items, folder: str | os.PathLike, size_step: int = 8) -> list[dict]:
    """Write in-memory items as captioned dataset folders under `folder` and return their job-file entries.

    Items with the same settings share a folder (`images_1`, `images_2`, ...): PNG + .txt per image, a clip
    as a lossless FFV1 .mkv. Captions are written as trained (trigger word already applied). Each folder is
    filled under a temporary name and renamed into place, so a failure leaves no half-written dataset.
    `size_step`: the model's pixel step, for items that train at their own size."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(_item_settings(item), []).append(item)
    entries = []
    for n, (settings, group) in enumerate(groups.items(), start=1):
        kind, resolutions, num_frames, repeats, dropout, width, height = settings
        target = write_items_as_folder(group, Path(folder) / f"{'clips' if kind == 'video' else 'images'}_{n}")
        # None (train at the items' own size): the long side, on the model's size step
        own = max(size_step, max(width, height) // size_step * size_step)
        sizes = [r for r in resolutions if r is not None] or [own]
        entries.append({"folder_path": str(target), "caption_ext": "txt", "trigger_word": None,
                        "caption_dropout_rate": dropout, "resolution": sizes, "num_frames": num_frames,
                        "num_repeats": repeats})
    return entries


def write_items_as_folder(items, folder: str | os.PathLike) -> Path:
    """Write items into a new folder (see export_items); DatasetError if it exists."""
    import shutil

    import torch
    from PIL import Image

    folder = Path(folder)
    if folder.exists():
        raise DatasetError(folder, "already exists; export to a new folder")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for n, item in enumerate(items):
            stem = f"{n:05d}"
            frames = (item.pixels.detach().cpu().float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            if item.kind == "video":
                _write_lossless_video(frames, tmp / f"{stem}.mkv")
            else:
                Image.fromarray(frames[0]).save(tmp / f"{stem}.png")
            (tmp / f"{stem}.txt").write_text(item.caption, encoding="utf-8")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_lossless_video(frames: np.ndarray, path: Path, fps: int = 16) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "bgr0"
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def job_file_text(mapping: dict) -> str:
    import yaml

    head = ("# Phase Trainer job, exported from a ComfyUI graph. Run it with:\n"
            "#   python -m trainer run <this file>\n")
    return head + yaml.safe_dump(mapping, sort_keys=False, allow_unicode=True)

"""The job file: dataclasses, defaults, and validation that names the field at fault.

A job is validated completely before any model is loaded. Key names follow ai-toolkit where it has them.
YAML and JSON are both accepted (JSON is YAML). Every error is a JobError whose `field` is the dotted path of
the offending key and whose message says what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import reprlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import JobError
from .schedule.phases_config import SOURCES, TRANSITIONS, ExitCriteria, Phase, ScheduleConfig

DTYPES = ("fp32", "fp16", "bf16", "fp8")  # fp8: the denoiser's block Linears in float8, the rest bf16 (fp8_base.py)
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
PRESET_EXITS = {
    # The seed's thresholds: (loss_improvement_rate_below, min_gradient_stability, min_loss_r2).
    "video": ExitCriteria(0.005, 0.50, 0.01),
    "image": ExitCriteria(0.001, 0.55, 0.1),
}
PRESET_PHASES = (("foundation", 8.0, 2000), ("balance", 14.0, 3000), ("emphasis", 20.0, 2000))
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 120, 60, 8, 8, 3


@dataclass
class ModelConfig:
    family: str
    path: str
    dtype: str = "bf16"
    # a single model file (ComfyUI's models/diffusion_models): its variant's config (optional, detected from the
    # weights' shapes), and where the text encoder and VAE come from (a diffusers folder, a ComfyUI VAE file)
    config: str | None = None
    encoders_from: str | None = None
    vae_file: str | None = None
    # Wan from single files with no diffusers folder: ComfyUI's umt5 text encoder (models/text_encoders) and, for
    # wan21_i2v, its CLIP vision tower (models/clip_vision: clip_vision_h.safetensors)
    text_encoder_file: str | None = None
    image_encoder_file: str | None = None
    # two-expert families (Wan 2.2 A14B) from single files: `path` is the high-noise expert file, this the
    # low-noise one (both are loaded; shapes alone cannot tell a T2V expert from Wan 2.1 14B, so the family says it)
    low_noise_path: str | None = None
    # two-expert families (Wan 2.2 A14B): which experts get a LoRA
    train_high_noise: bool = True
    train_low_noise: bool = True


@dataclass
class DatasetConfig:
    folder_path: str
    caption_ext: str = "txt"
    trigger_word: str | None = None
    caption_dropout_rate: float = 0.0
    resolution: list = field(default_factory=lambda: [512])
    num_frames: int = 1
    num_repeats: int = 1
    default_caption: str = ""
    cache_latents_to_disk: bool = False
    on_bad_file: str = "error"
    frame_sampling: str = "auto"
    do_i2v: bool = False  # condition on each clip's first frame (image-to-video families only)


@dataclass
class NetworkConfig:
    type: str = "lora"
    linear: int = 16
    linear_alpha: float = 16.0
    conv: int = 0
    conv_alpha: float = 0.0
    only_if_contains: list = field(default_factory=list)
    ignore_if_contains: list = field(default_factory=list)
    dropout: float = 0.0
    alpha_schedule: ScheduleConfig | None = None
    # two-expert families: a schedule per expert (the seed's per_expert form); an expert not listed here
    # follows alpha_schedule, with its own state
    alpha_schedule_per_expert: dict = field(default_factory=dict)

    def schedule_for(self, expert: str | None) -> ScheduleConfig | None:
        return self.alpha_schedule_per_expert.get(expert, self.alpha_schedule)

    def base_alphas(self) -> dict:
        return {"linear": float(self.linear_alpha), "conv": float(self.conv_alpha)}


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr: float = 1e-4
    optimizer: str = "adamw"
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    max_bad_steps: int = 5
    # two-expert families: train one expert for this many steps, then the other (only the active expert needs
    # to be on the GPU, so a switch moves weights: not every step)
    switch_boundary_every: int = 100


@dataclass
class SaveConfig:
    every: int = 500
    keep_last: int = 3
    resume: str | None = "latest"


@dataclass
class ValidationConfig:
    """The job's `validation` section (absent = no validation). See trainer/validation.py and
    trainer/schedule/stop_advice.py for what each number means."""

    every: int = 100            # evaluate after every N optimizer steps
    items: int = 4              # probe items (held-out if folder_path, else spread over the training set)
    timesteps: int = 8          # fixed timesteps: quantile midpoints of the family's timestep distribution
    seed: int = 1234            # the fixed noise
    folder_path: str | None = None  # held-out folder, read with the first dataset's settings
    patience: int = 5           # evaluations without a new best (in the final phase) before "suggest stop"
    min_delta: float = 0.0      # relative: a new best must be below best * (1 - min_delta)
    stop_on_plateau: bool = False  # end the run (checkpoint + export) when the stop advice fires
    keep_best: bool = True      # write <job>_best.safetensors at each new best validation loss


@dataclass
class Job:
    job: str
    output_dir: str
    model: ModelConfig
    datasets: list
    network: NetworkConfig
    train: TrainConfig
    save: SaveConfig
    source: dict = field(default_factory=dict, repr=False)  # the raw mapping, for metadata and hashing
    validation: ValidationConfig | None = None

    @property
    def lora_path(self) -> Path:
        return Path(self.output_dir) / f"{self.job}.safetensors"

    @property
    def metrics_path(self) -> Path:
        return Path(self.output_dir) / f"metrics_{self.job}.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def network_signature(self) -> str:
        """What a checkpoint must match to be resumed: family, network shape, schedule phases."""
        n = self.network
        sched = None
        if n.alpha_schedule is not None:
            sched = [(p.name, sorted(p.alphas.items())) for p in n.alpha_schedule.phases]
        per_expert = {e: [(p.name, sorted(p.alphas.items())) for p in c.phases]
                      for e, c in sorted(n.alpha_schedule_per_expert.items())}
        experts = [e for e, on in (("high_noise", self.model.train_high_noise),
                                   ("low_noise", self.model.train_low_noise)) if on]
        blob = json.dumps([self.model.family, n.type, n.linear, n.conv, n.only_if_contains,
                           n.ignore_if_contains, sched] + ([per_expert, experts] if per_expert or len(experts) < 2
                                                           else []), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- reading helpers


def _show(v: Any) -> str:
    """A bounded repr for error messages: a job file may hold huge or deeply shared values."""
    try:
        return _REPR.repr(v)
    except ValueError:  # an int too long to print (Python's 4300-digit limit)
        return "a value too long to show"


def _keys(data: Any, path: str, allowed: tuple, required: tuple = ()) -> dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JobError(path, f"must be a mapping with keys {', '.join(allowed)}; got {type(data).__name__}")
    for k in data:
        if k not in allowed:
            near = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            shown = k if str(k).strip() else _show(k)  # an empty or blank key still gets a visible field name
            raise JobError(_join(path, shown), f"unknown key {_show(k)}{hint}; allowed keys: {', '.join(allowed)}")
    for k in required:
        if data.get(k) is None:
            raise JobError(_join(path, k), "is required")
    return data


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _int(data: dict, key: str, path: str, default: int, lo: int | None = None) -> int:
    v = data.get(key, default)
    f = _join(path, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise JobError(f, f"must be a whole number; got {_show(v)}")
    v = int(v)
    if lo is not None and v < lo:
        raise JobError(f, f"must be >= {lo}; got {_show(v)}")
    return v


def _float(data: dict, key: str, path: str, default: float, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    v = data.get(key, default)
    f = _join(path, key)
    if isinstance(v, str):
        try:  # YAML 1.1 reads "1e-4" as a string; accept it as the number users meant
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, int) and not isinstance(v, bool):
        try:
            v = float(v)
        except OverflowError:
            raise JobError(f, f"must be a finite number; got {_show(v)}, which is too large") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise JobError(f, f"must be a finite number; got {_show(v)}")
    v = float(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise JobError(f, f"must be {'>' if lo_open else '>='} {lo:g}; got {v:g}")
    if hi is not None and v > hi:
        raise JobError(f, f"must be <= {hi:g}; got {v:g}")
    return v


def _bool(data: dict, key: str, path: str, default: bool) -> bool:
    v = data.get(key, default)
    if not isinstance(v, bool):
        raise JobError(_join(path, key), f"must be true or false; got {_show(v)}")
    return v


def _choice(data: dict, key: str, path: str, default: str, choices: tuple) -> str:
    v = data.get(key, default)
    if not isinstance(v, str) or v.lower() not in choices:
        raise JobError(_join(path, key), f"must be one of {', '.join(choices)}; got {_show(v)}")
    return v.lower()


def _str(data: dict, key: str, path: str, default: str | None = None, required: bool = False) -> str | None:
    v = data.get(key, default)
    if v is None and not required:
        return None
    if not isinstance(v, str) or (required and not v.strip()):
        raise JobError(_join(path, key), f"must be a non-empty text; got {_show(v)}")
    return v


def _str_list(data: dict, key: str, path: str) -> list:
    v = data.get(key, [])
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise JobError(_join(path, key), f"must be a list of non-empty texts; got {_show(v)}")
    return list(v)


# ---------------------------------------------------------------- sections


def _check_expert_files(m: ModelConfig) -> None:
    """Wan 2.2 A14B from single files needs both experts; a diffusers folder holds both itself."""
    two_experts = m.family in ("wan22_14b", "wan22_14b_i2v")
    if m.low_noise_path is not None and not two_experts:
        raise JobError("model.low_noise_path", f"only for Wan 2.2 A14B single files (model.family wan22_14b or "
                                               f"wan22_14b_i2v); {m.family} has one denoiser")
    if two_experts and m.path.lower().endswith(".safetensors") and m.low_noise_path is None:
        raise JobError("model.low_noise_path", f"{m.family} from single files is two expert files: model.path is "
                                               "the high-noise expert, give the low-noise expert file here")
    if m.low_noise_path is not None and not m.path.lower().endswith(".safetensors"):
        raise JobError("model.low_noise_path", "is for a model.path that is a .safetensors expert file; a diffusers "
                                               "folder holds both experts (transformer, transformer_2)")


WAN_FAMILIES = ("wan21", "wan21_i2v", "wan22_5b", "wan22_14b", "wan22_14b_i2v")


def _check_encoder_files(m: ModelConfig) -> None:
    """The encoder files only where they are used: a Wan single file (a diffusers folder has its own encoders);
    the CLIP vision file only for Wan 2.1 I2V (the only Wan with an image encoder)."""
    for key, families, what, why in (
            ("text_encoder_file", WAN_FAMILIES, "ComfyUI's umt5 text encoder file", "does not use umt5"),
            ("image_encoder_file", ("wan21_i2v",), "ComfyUI's CLIP vision file (clip_vision_h)", "has no image encoder")):
        value = getattr(m, key)
        if value is None:
            continue
        if m.family not in families:
            raise JobError(f"model.{key}", f"{what} is only for {' / '.join(families)}; {m.family} {why}")
        if not value.lower().endswith(".safetensors"):
            raise JobError(f"model.{key}", f"must be a .safetensors file ({what}); got {_show(value)}")
        if not m.path.lower().endswith(".safetensors"):
            raise JobError(f"model.{key}", "is for a model.path that is a single .safetensors file; a diffusers folder "
                                           "uses its own encoders")


def _model(data: Any) -> ModelConfig:
    from .families import FAMILIES

    d = _keys(data, "model", ("family", "path", "dtype", "train_high_noise", "train_low_noise", "config",
                              "encoders_from", "vae_file", "low_noise_path", "text_encoder_file",
                              "image_encoder_file"), required=("family", "path"))
    fam = d["family"]
    if not isinstance(fam, str) or fam not in FAMILIES:
        raise JobError("model.family", f"unknown family {_show(fam)}; use one of {', '.join(sorted(FAMILIES))}")
    m = ModelConfig(family=fam, path=_str(d, "path", "model", required=True),
                    dtype=_choice(d, "dtype", "model", "bf16", DTYPES),
                    train_high_noise=_bool(d, "train_high_noise", "model", True),
                    train_low_noise=_bool(d, "train_low_noise", "model", True),
                    config=_str(d, "config", "model"), encoders_from=_str(d, "encoders_from", "model"),
                    vae_file=_str(d, "vae_file", "model"), low_noise_path=_str(d, "low_noise_path", "model"),
                    text_encoder_file=_str(d, "text_encoder_file", "model"),
                    image_encoder_file=_str(d, "image_encoder_file", "model"))
    _check_expert_files(m)
    _check_encoder_files(m)
    given = [k for k in ("train_high_noise", "train_low_noise") if k in d]
    if given:
        from .families import get_family

        if not getattr(get_family(fam), "experts_names", None):
            raise JobError(f"model.{given[0]}", f"only for two-expert families (wan22_14b, wan22_14b_i2v); "
                                                f"{fam} has one denoiser")
        if not (m.train_high_noise or m.train_low_noise):
            raise JobError("model.train_low_noise", "train_high_noise and train_low_noise are both false: nothing "
                                                    "would be trained")
    return m


def _dataset(data: Any, path: str, family_cls) -> DatasetConfig:
    allowed = tuple(DatasetConfig.__dataclass_fields__)
    d = _keys(data, path, allowed, required=("folder_path",))
    res = d.get("resolution", [512])
    if isinstance(res, int) and not isinstance(res, bool):
        res = [res]
    if not isinstance(res, list) or not res or not all(isinstance(r, int) and not isinstance(r, bool) for r in res):
        raise JobError(_join(path, "resolution"), f"must be a whole number or a list of them; got {_show(res)}")
    factor = family_cls.resolution_factor
    for r in res:
        if r < factor or r % factor:
            nearest = max(factor, (r + factor // 2) // factor * factor)  # integer math: r may be huge
            raise JobError(_join(path, "resolution"),
                           f"{_show(r)} is not a positive multiple of {factor}, which {family_cls.name} needs "
                           f"(VAE and patch size); try {_show(nearest)}")
    frames = _int(d, "num_frames", path, 1, lo=1)
    if not family_cls.valid_num_frames(frames):
        raise JobError(_join(path, "num_frames"), f"{_show(frames)} is not allowed for {family_cls.name}: "
                                                  f"use {family_cls.num_frames_rule()}")
    ext = _str(d, "caption_ext", path, "txt", required=True).lstrip(".")
    if "/" in ext or "\\" in ext:
        raise JobError(_join(path, "caption_ext"), f"must be a file extension like 'txt'; got {_show(ext)}")
    do_i2v = _bool(d, "do_i2v", path, False)
    if do_i2v and not getattr(family_cls, "supports_i2v", False):
        raise JobError(_join(path, "do_i2v"), f"{family_cls.name} has no first-frame (image) conditioning; remove "
                                              "do_i2v or use an image-to-video family")
    return DatasetConfig(
        folder_path=_str(d, "folder_path", path, required=True),
        caption_ext=ext,
        trigger_word=_str(d, "trigger_word", path),
        caption_dropout_rate=_float(d, "caption_dropout_rate", path, 0.0, lo=0.0, hi=1.0),
        resolution=list(res),
        num_frames=frames,
        num_repeats=_int(d, "num_repeats", path, 1, lo=1),
        default_caption=_str(d, "default_caption", path, "") or "",
        cache_latents_to_disk=_bool(d, "cache_latents_to_disk", path, False),
        on_bad_file=_choice(d, "on_bad_file", path, "error", ("error", "skip")),
        frame_sampling=_choice(d, "frame_sampling", path, "auto", ("auto", "decode", "seek")),
        do_i2v=do_i2v,
    )


def _exit(data: Any, path: str, base: ExitCriteria) -> ExitCriteria:
    d = _keys(data, path, tuple(ExitCriteria.__dataclass_fields__))
    return ExitCriteria(
        loss_improvement_rate_below=_float(d, "loss_improvement_rate_below", path, base.loss_improvement_rate_below, lo=0.0),
        min_gradient_stability=_float(d, "min_gradient_stability", path, base.min_gradient_stability, lo=0.0, hi=1.0),
        min_loss_r2=_float(d, "min_loss_r2", path, base.min_loss_r2, lo=0.0, hi=1.0),
        max_loss_cv=_float(d, "max_loss_cv", path, base.max_loss_cv, lo=0.0, lo_open=True),
        r2_gate=_bool(d, "r2_gate", path, base.r2_gate),
        source=_choice(d, "source", path, base.source, SOURCES),
        val_window=_int(d, "val_window", path, base.val_window, lo=3),
        val_rate_below=_float(d, "val_rate_below", path, base.val_rate_below, lo=0.0),
    )


def _phases(data: Any, path: str, group: str, base_exit: ExitCriteria) -> list:
    if not isinstance(data, dict) or not data:
        raise JobError(path, "must be a mapping of phase name -> {alpha, min_steps, exit_criteria}, in order")
    out = []
    for name, spec in data.items():
        p = _join(path, name)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise JobError(p, "a phase name must be letters, digits, '_', '-' or '.'")
        d = _keys(spec, p, ("alpha", "min_steps", "exit_criteria"))
        if d.get("alpha") is None:
            raise JobError(_join(p, "alpha"), "is required: the alpha this phase trains with (> 0)")
        alpha = _float(d, "alpha", p, 0.0, lo=0.0, lo_open=True)
        exit_ = _exit(d.get("exit_criteria"), _join(p, "exit_criteria"), base_exit)
        out.append(Phase(name=name, alphas={group: alpha}, min_steps=_int(d, "min_steps", p, 500, lo=0), exit=exit_))
    return out


def _schedule(data: Any, path: str, net: NetworkConfig, family_cls, has_validation: bool = False) -> tuple:
    """Returns (ScheduleConfig or None, linear_alpha override or None)."""
    d = _keys(data, path, ("enabled", "linear_alpha", "conv_alpha_phases", "linear_alpha_phases", "ramp_steps",
                           "preset", "window", "per_expert", "mode", "transition"))
    if not _bool(d, "enabled", path, True):
        return None, None
    preset = d.get("preset")
    if preset is not None and preset not in PRESET_EXITS:
        raise JobError(_join(path, "preset"), f"must be one of {', '.join(PRESET_EXITS)}; got {_show(preset)}")
    base_exit = PRESET_EXITS.get(preset, ExitCriteria())
    if preset is not None and has_validation:
        # With a validation section the preset's phases end on a validation-loss plateau: the training loss
        # mostly measures which timestep was drawn. A phase's exit_criteria.source: train overrides this.
        base_exit = replace(base_exit, source="validation")
    linear_override = None
    if d.get("linear_alpha") is not None:
        linear_override = _float(d, "linear_alpha", path, 16.0, lo=0.0, lo_open=True)

    lists = {}
    for group, key in (("conv", "conv_alpha_phases"), ("linear", "linear_alpha_phases")):
        if d.get(key) is not None:
            lists[group] = _phases(d[key], _join(path, key), group, base_exit)
    if not lists:
        if preset is None:
            raise JobError(path, "enabled but has no phases: give conv_alpha_phases or linear_alpha_phases "
                                 "(or preset: video|image for the seed's foundation/balance/emphasis phases)")
        group = "conv" if family_cls.has_conv_targets(net.conv) else "linear"
        lists[group] = [Phase(n, {group: a}, m, base_exit) for n, a, m in PRESET_PHASES]

    if "conv" in lists and not family_cls.has_conv_targets(net.conv):
        why = ("network.conv is 0, so no conv layer gets a LoRA" if net.conv == 0 else
               f"{family_cls.name} has no conv layers in its LoRA targets")
        raise JobError(_join(path, "conv_alpha_phases"),
                       f"would change nothing: {why}. Schedule the linear layers with linear_alpha_phases "
                       f"(transformers such as Wan and Flux are almost all linear layers)")
    if "linear" in lists and net.linear == 0:
        raise JobError(_join(path, "linear_alpha_phases"), "would change nothing: network.linear is 0")

    if len(lists) == 2:
        conv, lin = lists["conv"], lists["linear"]
        if [p.name for p in conv] != [p.name for p in lin]:
            raise JobError(_join(path, "linear_alpha_phases"),
                           "when both conv and linear phases are given they run as one schedule: use the same "
                           f"phase names in the same order as conv_alpha_phases ({', '.join(p.name for p in conv)})")
        for c, l in zip(conv, lin):
            if c.min_steps != l.min_steps or c.exit != l.exit:
                raise JobError(_join(path, f"linear_alpha_phases.{l.name}"),
                               "min_steps and exit_criteria must match the conv phase of the same name (one "
                               "state machine decides both); give them in one of the two lists only")
        phases = [Phase(c.name, {"conv": c.alphas["conv"], "linear": l.alphas["linear"]}, c.min_steps, c.exit)
                  for c, l in zip(conv, lin)]
    else:
        phases = next(iter(lists.values()))

    names = [p.name for p in phases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise JobError(path, f"duplicate phase names: {', '.join(sorted(dup))}")
    window = _int(d, "window", path, 200, lo=20)
    # A phase needs min_losses losses in its window before it may end; a window smaller than that default
    # lowers the requirement to the window (else no phase could ever end, and the scheduler refuses it).
    cfg = ScheduleConfig(phases=tuple(phases), ramp_steps=_int(d, "ramp_steps", path, 0, lo=0), window=window,
                         min_losses=min(ScheduleConfig.min_losses, window))
    transition = d.get("transition")
    if transition is not None:
        transition = _choice(d, "transition", path, "jump", TRANSITIONS)
        if transition == "ramp" and cfg.ramp_steps == 0:
            raise JobError(_join(path, "ramp_steps"), "transition: ramp needs ramp_steps > 0 (the steps the alpha "
                                                      "takes to move from one phase's value to the next)")
        if transition != "ramp" and cfg.ramp_steps > 0:
            raise JobError(_join(path, "ramp_steps"), f"only applies to transition: ramp, not {transition}; "
                                                      "remove ramp_steps or use transition: ramp")
        cfg = replace(cfg, transition=transition)
    for p in cfg.phases[:-1]:
        if p.exit.source == "validation" and not has_validation:
            group = "conv" if "conv" in p.alphas else "linear"
            raise JobError(_join(path, f"{group}_alpha_phases.{p.name}.exit_criteria.source"),
                           "is validation, but the job has no validation section; add one (validation: "
                           "{every: 100}) or use source: train")
    return cfg, linear_override


def _network(data: Any, family_cls, has_validation: bool = False) -> NetworkConfig:
    path = "network"
    d = _keys(data, path, tuple(f for f in NetworkConfig.__dataclass_fields__))
    if d.get("type", "lora") != "lora":
        raise JobError("network.type", f"only 'lora' is supported; got {_show(d.get('type'))}")
    linear = _int(d, "linear", path, 16, lo=0)
    conv = _int(d, "conv", path, 0, lo=0)
    if linear == 0 and conv == 0:
        raise JobError("network.linear", "linear and conv ranks are both 0: nothing would be trained; set linear > 0")
    net = NetworkConfig(
        linear=linear,
        linear_alpha=_float(d, "linear_alpha", path, float(linear), lo=0.0, lo_open=linear > 0),
        conv=conv,
        conv_alpha=_float(d, "conv_alpha", path, float(conv), lo=0.0, lo_open=conv > 0),
        only_if_contains=_str_list(d, "only_if_contains", path),
        ignore_if_contains=_str_list(d, "ignore_if_contains", path),
        dropout=_float(d, "dropout", path, 0.0, lo=0.0, hi=0.9),
    )
    if d.get("alpha_schedule") is not None:
        raw = d["alpha_schedule"]
        per_expert = raw.get("per_expert") if isinstance(raw, dict) else None
        top = raw
        if per_expert is not None:
            net.alpha_schedule_per_expert = _per_expert(per_expert, raw, net, family_cls, has_validation)
            top = {k: v for k, v in raw.items() if k != "per_expert"}
            if not any(top.get(k) is not None for k in ("conv_alpha_phases", "linear_alpha_phases", "preset")):
                top = {**top, "enabled": False}  # only per-expert schedules
        sched, linear_override = _schedule(top, "network.alpha_schedule", net, family_cls, has_validation)
        net.alpha_schedule = sched
        if linear_override is not None:
            # The seed's alpha_schedule.linear_alpha is the fixed alpha of linear layers while conv is scheduled.
            net.linear_alpha = linear_override
    return net


def _per_expert(data: Any, parent: dict, net: NetworkConfig, family_cls, has_validation: bool) -> dict:
    """The seed's form: per_expert: {high_noise: {phases: {...}}, low_noise: {...}}. Each expert's phases
    schedule the same group as the top-level list (linear on Wan, which has no conv layers in its blocks);
    `linear_alpha_phases` / `conv_alpha_phases` may also be given per expert. Shared keys (ramp_steps,
    transition, window, preset) come from the parent."""
    path = "network.alpha_schedule.per_expert"
    experts = tuple(getattr(family_cls, "experts_names", None) or ())
    if not experts:
        raise JobError(path, f"only for two-expert families (wan22_14b, wan22_14b_i2v); {family_cls.name} has "
                             "one denoiser: use conv_alpha_phases or linear_alpha_phases")
    d = _keys(data, path, experts)
    if "conv_alpha_phases" in parent:
        group_key = "conv_alpha_phases"
    elif "linear_alpha_phases" in parent or not family_cls.has_conv_targets(net.conv):
        group_key = "linear_alpha_phases"
    else:
        group_key = "conv_alpha_phases"
    shared = {k: v for k, v in parent.items()
              if k in ("ramp_steps", "transition", "window", "preset", "linear_alpha", "mode")}
    out = {}
    for expert, spec in d.items():
        p = _join(path, expert)
        e = _keys(spec, p, ("phases", "linear_alpha_phases", "conv_alpha_phases"))
        sub = dict(shared)
        if e.get("phases") is not None:
            sub[group_key] = e["phases"]
        for k in ("linear_alpha_phases", "conv_alpha_phases"):
            if e.get(k) is not None:
                sub[k] = e[k]
        try:
            sched, _ = _schedule(sub, p, net, family_cls, has_validation)
        except JobError as err:  # name the expert's own key, not the synthetic group key
            raise JobError(err.field.replace(f"{p}.{group_key}", f"{p}.phases"), err.message) from None
        if sched is not None:
            out[expert] = sched
    return out


def _train(data: Any) -> TrainConfig:
    p = "train"
    d = _keys(data, p, tuple(TrainConfig.__dataclass_fields__))
    t = TrainConfig(
        steps=_int(d, "steps", p, 1000, lo=1),
        batch_size=_int(d, "batch_size", p, 1, lo=1),
        gradient_accumulation=_int(d, "gradient_accumulation", p, 1, lo=1),
        lr=_float(d, "lr", p, 1e-4, lo=0.0, lo_open=True),
        optimizer=_choice(d, "optimizer", p, "adamw", OPTIMIZERS),
        lr_scheduler=_choice(d, "lr_scheduler", p, "constant", LR_SCHEDULERS),
        warmup_steps=_int(d, "warmup_steps", p, 0, lo=0),
        max_grad_norm=_float(d, "max_grad_norm", p, 1.0, lo=0.0),
        seed=_int(d, "seed", p, 42, lo=0),
        gradient_checkpointing=_bool(d, "gradient_checkpointing", p, False),
        mixed_precision=_choice(d, "mixed_precision", p, "auto", MIXED_PRECISION),
        max_bad_steps=_int(d, "max_bad_steps", p, 5, lo=1),
        switch_boundary_every=_int(d, "switch_boundary_every", p, 100, lo=1),
    )
    if t.warmup_steps >= t.steps and t.warmup_steps:
        raise JobError("train.warmup_steps", f"must be below train.steps ({t.steps}); got {t.warmup_steps}")
    return t


def _save(data: Any, steps: int) -> SaveConfig:
    p = "save"
    d = _keys(data, p, ("every", "keep_last", "resume"))
    resume = d.get("resume", "latest")
    if resume is False or resume in ("none", "", "no"):
        resume = None
    if resume is not None and not isinstance(resume, str):
        raise JobError("save.resume", f"must be 'latest', 'none' or a checkpoint folder path; got {_show(resume)}")
    return SaveConfig(every=_int(d, "every", p, min(500, steps), lo=1), keep_last=_int(d, "keep_last", p, 3, lo=1),
                      resume=resume)


def _validation(data: Any) -> ValidationConfig | None:
    p = "validation"
    if data is None:
        return None
    d = _keys(data, p, ("enabled", *ValidationConfig.__dataclass_fields__))
    if not _bool(d, "enabled", p, True):
        return None
    return ValidationConfig(
        every=_int(d, "every", p, 100, lo=1),
        items=_int(d, "items", p, 4, lo=1),
        timesteps=_int(d, "timesteps", p, 8, lo=1),
        seed=_int(d, "seed", p, 1234, lo=0),
        folder_path=_str(d, "folder_path", p),
        patience=_int(d, "patience", p, 5, lo=1),
        min_delta=_float(d, "min_delta", p, 0.0, lo=0.0, hi=0.5),
        stop_on_plateau=_bool(d, "stop_on_plateau", p, False),
        keep_best=_bool(d, "keep_best", p, True),
    )


def validate_name(name: Any, field_name: str = "job") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise JobError(field_name, f"{_show(name)} is not a usable name: use letters, digits, '_', '-', '.' (no path "
                                   "separators, no '..', at most 128 characters)")
    return name


def parse_job(data: Any, base_dir: str | Path | None = None, *, require_datasets: bool = True) -> Job:
    """Validate a job mapping completely and return a Job. Relative paths are resolved against base_dir.

    require_datasets=False lets a caller that brings in-memory items (the ComfyUI nodes) give no folders."""
    from .families import get_family

    d = _keys(data, "", ("job", "output_dir", "model", "datasets", "network", "train", "save", "validation"),
              required=("job", "model", "datasets") if require_datasets else ("job", "model"))
    name = validate_name(d["job"])
    model = _model(d["model"])
    family_cls = get_family(model.family)
    raw_ds = d.get("datasets", [])
    if not isinstance(raw_ds, list) or (require_datasets and not raw_ds):
        raise JobError("datasets", "must be a non-empty list of datasets ({folder_path: ..., ...})")
    datasets = [_dataset(x, f"datasets[{i}]", family_cls) for i, x in enumerate(raw_ds)]
    validation = _validation(d.get("validation"))
    network = _network(d.get("network", {}), family_cls, has_validation=validation is not None)
    train = _train(d.get("train", {}))
    _check_expert_switching(train, model, family_cls, given=isinstance(d.get("train"), dict)
                            and "switch_boundary_every" in d["train"])
    save = _save(d.get("save", {}), train.steps)
    out = d.get("output_dir", f"./output/{name}")
    if not isinstance(out, str) or not out:
        raise JobError("output_dir", f"must be a folder path; got {_show(out)}")

    base = Path(base_dir) if base_dir is not None else None

    def resolve(p: str, field_name: str) -> str:
        _check_path_text(p, field_name)
        try:
            q = Path(p).expanduser()
        except RuntimeError:  # "~user/..." for an unknown user, or no home folder
            raise JobError(field_name, f"cannot expand '~' in {_show(p)} (unknown user or no home folder); "
                                       "write the full path") from None
        return str(q if q.is_absolute() or base is None else (base / q))

    for i, ds in enumerate(datasets):
        ds.folder_path = resolve(ds.folder_path, f"datasets[{i}].folder_path")
    _check_path_text(model.path, "model.path")
    if _looks_like_path(model.path):
        model.path = resolve(model.path, "model.path")
    for key in ("config", "encoders_from", "vae_file", "low_noise_path", "text_encoder_file", "image_encoder_file"):
        if getattr(model, key):
            setattr(model, key, resolve(getattr(model, key), f"model.{key}"))
    if save.resume not in (None, "latest"):
        save.resume = resolve(save.resume, "save.resume")
    if validation is not None and validation.folder_path:
        validation.folder_path = resolve(validation.folder_path, "validation.folder_path")
    return Job(job=name, output_dir=resolve(out, "output_dir"), model=model, datasets=datasets, network=network,
               train=train, save=save, source=data, validation=validation)


def _check_expert_switching(train: TrainConfig, model: ModelConfig, family_cls, given: bool) -> None:
    """Two trained experts alternate every switch_boundary_every steps: a run no longer than that would end
    before the second expert's first step and export an untrained LoRA for it. The default then shrinks to
    steps / experts; a value the user gave is an error."""
    experts = [e for e in getattr(family_cls, "experts_names", ()) if getattr(model, f"train_{e}", True)]
    if len(experts) < 2 or train.steps > train.switch_boundary_every:
        return
    if given:
        raise JobError("train.switch_boundary_every",
                       f"{train.switch_boundary_every} is not below train.steps ({train.steps}): the "
                       f"{experts[1].replace('_', '-')} expert would never train. Use at most "
                       f"{max(1, train.steps // len(experts))}, or train one expert (model.train_{experts[1]}: false)")
    train.switch_boundary_every = max(1, train.steps // len(experts))


def _check_path_text(p: str, field_name: str) -> None:
    if "\x00" in p:
        raise JobError(field_name, f"{_show(p)} contains a NUL character, which no file system accepts")


def _looks_like_path(p: str) -> bool:
    """A hub id is 'owner/name'; anything else (./x, /x, x/y/z, an existing folder) is a local path."""
    # os.path.exists, not Path.exists: it answers False for names the OS rejects (too long) instead of raising
    return (p.startswith((".", "/", "~")) or p.count("/") != 1 or os.path.exists(p)
            or re.match(r"^[A-Za-z]:[\\/]", p) is not None)


def load_job(path: str | Path) -> Job:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError("", f"job file {path} does not exist") from None
    except UnicodeDecodeError:
        raise JobError("", f"job file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise JobError("", f"cannot read job file {path} ({e.strerror or e})") from None
    return parse_job(read_job_text(text, str(path)), base_dir=path.parent)


def read_job_text(text: str, source: str = "the job file"):
    """The mapping in a YAML/JSON job text. A key given twice in one mapping is an error (PyYAML would
    silently keep the last one, e.g. the second of two phases with the same name)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "", source, set())
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise JobError("", f"{source} is not valid YAML/JSON: {e}") from None
    except RecursionError:
        raise JobError("", f"{source} is nested too deeply to read") from None
    except ValueError as e:  # an integer with more digits than Python converts, a date like 2024-13-45
        reason = str(e).split(";")[0]  # drop Python's advice on raising its own digit limit
        raise JobError("", f"{source} holds a value that cannot be read ({reason}); fix that value") from None
    finally:
        loader.dispose()


def _check_duplicate_keys(node, path: str, source: str, seen_nodes: set) -> None:
    if id(node) in seen_nodes:  # an alias: checked where its anchor is (and anchors may be recursive)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                field_name = _join(path, key.value)
                line = key.start_mark.line + 1
                if key.value in lines:
                    raise JobError(field_name, f"is given twice in {source} (lines {lines[key.value]} and {line}); "
                                               "YAML would silently keep only the last one. Remove one, or rename "
                                               "it (phase names must differ)")
                lines[key.value] = line
                _check_duplicate_keys(value, field_name, source, seen_nodes)
            else:
                _check_duplicate_keys(value, path, source, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{path}[{i}]", source, seen_nodes)


def job_to_dict(job: Job) -> dict:
    """A plain mapping that parse_job accepts again (used by the Export Job node and checkpoints)."""
    net = job.network
    network = {k: v for k, v in asdict(net).items() if k not in ("alpha_schedule", "alpha_schedule_per_expert")}

    def schedule_dict(s) -> dict:
        sched: dict = {"enabled": True, "ramp_steps": s.ramp_steps, "window": s.window}
        if s.transition is not None:
            sched["transition"] = s.transition
        for group in s.groups:
            sched[f"{group}_alpha_phases"] = {
                p.name: {"alpha": p.alphas[group], "min_steps": p.min_steps, "exit_criteria": asdict(p.exit)}
                for p in s.phases}
        return sched

    if net.alpha_schedule is not None:
        network["alpha_schedule"] = schedule_dict(net.alpha_schedule)
    if net.alpha_schedule_per_expert:
        per = {e: {k: v for k, v in schedule_dict(c).items() if k.endswith("_alpha_phases")}
               for e, c in net.alpha_schedule_per_expert.items()}
        network.setdefault("alpha_schedule", {"enabled": True})["per_expert"] = per
    model = {k: v for k, v in asdict(job.model).items()
             if v is not None or k not in ("config", "encoders_from", "vae_file", "low_noise_path", "text_encoder_file",
                                           "image_encoder_file")}
    if job.model.train_high_noise and job.model.train_low_noise:
        model.pop("train_high_noise")
        model.pop("train_low_noise")
    return {"job": job.job, "output_dir": job.output_dir, "model": model,
            "datasets": [asdict(d) for d in job.datasets], "network": network,
            "train": asdict(job.train), "save": asdict(job.save),
            **({"validation": asdict(job.validation)} if job.validation is not None else {})}

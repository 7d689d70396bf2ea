"""Wan 2.2 A14B, text-to-video and image-to-video: two expert transformers split by noise level.

`transformer` is the high-noise expert, `transformer_2` the low-noise one. diffusers' WanPipeline /
WanImageToVideoPipeline run `transformer` while the scheduler timestep t >= boundary_ratio * num_train_timesteps
and `transformer_2` below it (boundary_ratio from model_index.json: 0.875 T2V, 0.9 I2V). Training timesteps are
sigma * 1000 (the Wan 2.1 objective, inherited), so the same rule splits them: an expert only ever sees the
timesteps the pipeline would give it.

Per expert (`expert` = "high_noise" | "low_noise"; None = the active one, see `activate`):
- `sample_timesteps(n, generator, expert)`: u restricted to the expert's range. u is mapped to sigma by the
  family's shift exactly as for Wan 2.1, so the distribution within the range is the shifted one, conditioned
  on the range (the same as drawing from the full distribution and rejecting the other expert's draws).
- `predict(noisy, cond, expert)`, `target_modules(..., expert)`; export names are Wan's native ones for both
  (ComfyUI loads each expert as its own model): one file per expert, `expert_lora_path`.
- `activate(expert, device)`: that expert on `device`, the other on the CPU; `denoiser` is the active one, so
  a single-expert loop trains the active expert unchanged.
Each expert's weights keep the dtype they were loaded with; the VAE and text encoder are shared.
I2V adds the first-frame conditioning of Wan 2.1 I2V (mask + first-frame latents as extra channels); these
transformers have no image_dim, so there is no CLIP image encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .base import NoisyBatch, TargetModule
from .wan21 import TIMESTEP_SCALE, Wan21, wan_target_modules
from .wan21_i2v import FirstFrameConditioning, read_wan_folder, run_wan_transformer

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"
EXPERTS = (HIGH_NOISE, LOW_NOISE)
# The component each expert is in a diffusers folder.
EXPERT_COMPONENTS = {HIGH_NOISE: "transformer", LOW_NOISE: "transformer_2"}


def expert_lora_path(lora_path: str | Path, expert: str) -> Path:
    """`<dir>/<job>.safetensors` -> `<dir>/<job>_<expert>.safetensors` (one LoRA file per expert)."""
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {', '.join(EXPERTS)}, not {expert!r}")
    path = Path(lora_path)
    return path.with_name(f"{path.stem}_{expert}{path.suffix or '.safetensors'}")


class Wan22A14B(Wan21):
    name = "wan22_14b"
    experts_names = EXPERTS
    # The inference default this family's folders ship; the loaded family reads model_index.json.
    default_boundary_ratio = 0.875

    # ---- loading ----
    @classmethod
    def check_folder(cls, path: str) -> dict[str, Any]:
        from diffusers import WanTransformer3DModel

        from .pipeline_folder import read_component_config

        configs = read_wan_folder(path, cls.name, extra_components=list(EXPERT_COMPONENTS.values()))
        index = configs["index"]
        problems = []
        ratio = index.get("boundary_ratio")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio < 1.0:
            problems.append(f"model_index.json boundary_ratio is {ratio!r}, not a number between 0 and 1 "
                            "(the timestep fraction where the pipeline switches experts)")
        high = configs["transformer"]
        low = read_component_config(path, "transformer_2", WanTransformer3DModel)
        shape_keys = ("in_channels", "out_channels", "patch_size", "text_dim", "image_dim")
        differ = [k for k in shape_keys if high.get(k) != low.get(k)]
        if differ:
            problems.append(f"transformer and transformer_2 differ in {', '.join(differ)}")
        problems += cls._check_conditioning(high, configs["vae"])
        if problems:
            raise ModelError(f"{path}: not a {cls._display_name()} pipeline: " + "; ".join(problems))
        configs["scheduler"] = dict(configs["scheduler"], boundary_ratio=float(ratio))
        return configs["scheduler"]

    @classmethod
    def _display_name(cls) -> str:
        return "Wan 2.2 A14B " + ("I2V" if cls.supports_first_frame() else "T2V")

    @classmethod
    def supports_first_frame(cls) -> bool:
        return issubclass(cls, FirstFrameConditioning)

    @classmethod
    def _check_conditioning(cls, transformer: dict, vae: dict) -> list[str]:
        if transformer.get("in_channels") != vae.get("z_dim", 16):
            return [f"transformer in_channels {transformer.get('in_channels')} != vae z_dim {vae.get('z_dim', 16)}"]
        return []

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, device: torch.device | str = "cpu", **kwargs) -> "Wan22A14B":
        """Both experts in `dtype`; the high-noise one on `device` (active), the low-noise one on the CPU.
        From ComfyUI files: `from_single_file(high_noise_file, ..., low_noise_path=low_noise_file)`."""
        from diffusers import WanTransformer3DModel

        family = super().load(path, dtype, device, **kwargs)
        try:
            low = WanTransformer3DModel.from_pretrained(path, subfolder="transformer_2", torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load transformer_2 (the low-noise expert): {e}") from e
        family.set_experts(low, cls.check_folder(path)["boundary_ratio"])
        return family

    def set_experts(self, low_noise: nn.Module, boundary_ratio: float) -> None:
        """The loaded denoiser becomes the high-noise expert (active) and `low_noise` the low-noise one, frozen
        where it is (the CPU). Both loaders end here: the folder's transformer_2 and a low-noise expert file
        (single_file/wan22.py)."""
        low_noise.requires_grad_(False)
        low_noise.eval()
        self.loaded.extra.update({
            "experts": {HIGH_NOISE: self.loaded.denoiser, LOW_NOISE: low_noise},
            "boundary_ratio": float(boundary_ratio),
            "active_expert": HIGH_NOISE,
        })

    # ---- experts ----
    @property
    def experts(self) -> dict[str, nn.Module]:
        return dict(self.loaded.extra["experts"])

    @property
    def active_expert(self) -> str:
        return self.loaded.extra["active_expert"]

    @property
    def boundary_ratio(self) -> float:
        return self.loaded.extra["boundary_ratio"]

    @property
    def boundary_timestep(self) -> float:
        """The pipeline's `boundary_ratio * scheduler.config.num_train_timesteps`."""
        return self.boundary_ratio * TIMESTEP_SCALE

    def _expert(self, expert: str | None) -> str:
        if expert is None:
            return self.active_expert
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {', '.join(EXPERTS)}, not {expert!r}")
        return expert

    def expert_module(self, expert: str | None = None) -> nn.Module:
        return self.loaded.extra["experts"][self._expert(expert)]

    def set_expert_module(self, expert: str, module: nn.Module) -> None:
        """Register a wrapped expert (e.g. what accelerator.prepare returned) in its place."""
        expert = self._expert(expert)
        self.loaded.extra["experts"][expert] = module
        if expert == self.active_expert:
            self.loaded.denoiser = module

    def activate(self, expert: str, device: torch.device | str | None = None) -> nn.Module:
        """Make `expert` the one `denoiser`, `predict` and `target_modules` use; with `device`, move it there
        and the other expert to the CPU first (only the trained expert needs accelerator memory)."""
        expert = self._expert(expert)
        if device is not None:
            other = self.loaded.extra["experts"][LOW_NOISE if expert == HIGH_NOISE else HIGH_NOISE]
            other.to("cpu")
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            self.loaded.extra["experts"][expert].to(device)
        self.loaded.extra["active_expert"] = expert
        self.loaded.denoiser = self.loaded.extra["experts"][expert]
        return self.loaded.denoiser

    def experts_of_timesteps(self, timesteps: torch.Tensor) -> list[str]:
        """The expert the pipeline would run at each timestep (t >= boundary: high noise)."""
        return [HIGH_NOISE if t >= self.boundary_timestep else LOW_NOISE for t in timesteps.tolist()]

    def u_range(self, expert: str | None = None) -> tuple[float, float]:
        """[lo, hi) of u whose sigma falls in the expert's range: sigma >= boundary_ratio for high noise."""
        shift, b = self.flow_shift, self.boundary_ratio
        u_boundary = b / (shift - (shift - 1.0) * b)  # the inverse of sigma = shift*u / (1 + (shift-1)*u)
        return (u_boundary, 1.0) if self._expert(expert) == HIGH_NOISE else (0.0, u_boundary)

    # ---- objective ----
    def sample_timesteps(self, n: int, generator: torch.Generator | None, expert: str | None = None) -> torch.Tensor:
        expert = self._expert(expert)
        lo, hi = self.u_range(expert)
        u = lo + (hi - lo) * torch.rand(n, generator=generator)
        # float32 rounding can land a draw next to the boundary on the other expert's side: step it across.
        toward = torch.full_like(u, 1.0 if expert == HIGH_NOISE else 0.0)
        for _ in range(16):
            timesteps = self.sigmas_from_u(u) * TIMESTEP_SCALE
            wrong = (timesteps < self.boundary_timestep) if expert == HIGH_NOISE else \
                (timesteps >= self.boundary_timestep)
            if not wrong.any():
                return u
            u = torch.where(wrong, torch.nextafter(u, toward), u)
        raise RuntimeError(f"could not place {int(wrong.sum())} timestep(s) in the {expert} range")

    def transformer_input(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return noisy.model_input

    def predict(self, noisy: NoisyBatch, cond: dict[str, torch.Tensor], expert: str | None = None) -> torch.Tensor:
        return run_wan_transformer(self.expert_module(expert), self.transformer_input(noisy, cond),
                                   noisy.timesteps, cond, self.loaded.extra["dtype"])

    # ---- LoRA targets ----
    def target_modules(self, linear_rank: int, conv_rank: int, expert: str | None = None) -> list[TargetModule]:
        return wan_target_modules(self.expert_module(expert), linear_rank, conv_rank)

    def describe(self, expert: str | None = None) -> dict[str, Any]:
        return {**super().describe(), "boundary_ratio": self.boundary_ratio, "expert": self._expert(expert)}


class Wan22A14BI2V(FirstFrameConditioning, Wan22A14B):
    name = "wan22_14b_i2v"
    default_boundary_ratio = 0.9

    @classmethod
    def _check_conditioning(cls, transformer: dict, vae: dict) -> list[str]:
        expected = 2 * vae.get("z_dim", 16) + vae.get("scale_factor_temporal", 4)
        problems = []
        if transformer.get("in_channels") != expected:
            problems.append(f"transformer in_channels {transformer.get('in_channels')} != {expected} "
                            "(noisy latents + mask + first-frame latents)")
        if transformer.get("image_dim") is not None:
            problems.append("the transformers have CLIP image conditioning, which Wan 2.2 A14B I2V has not")
        return problems

"""Session-wide tiny model folders (import these fixtures from conftest.py).

Each folder is built once per test session. The builds are also memoized here, so a test module that imports
the fixtures itself (as well as conftest) still shares the one folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer import tiny as _tiny

_BUILT: dict[tuple[str, str], Path] = {}


def _build_once(kind: str, tmp_path_factory, builder, **kwargs) -> Path:
    key = (kind, str(tmp_path_factory.getbasetemp()))
    if key not in _BUILT:
        _BUILT[key] = builder(tmp_path_factory.mktemp(kind) / "model", **kwargs)
    return _BUILT[key]


def _model_fixture(kind: str, builder, doc: str, **kwargs):
    """A session fixture named `<kind>_path` that returns the folder `builder(path, **kwargs)` wrote."""

    def fixture(tmp_path_factory) -> Path:
        return _build_once(kind, tmp_path_factory, builder, **kwargs)

    fixture.__doc__ = doc
    return pytest.fixture(scope="session", name=f"{kind}_path")(fixture)


tiny_sd15_path = _model_fixture(
    "tiny_sd15", _tiny.build_tiny_sd15, "A random SD 1.5-shaped StableDiffusionPipeline folder (epsilon prediction).")
tiny_sd15_vpred_path = _model_fixture(
    "tiny_sd15_vpred", _tiny.build_tiny_sd15, "The same, with a v_prediction scheduler config.",
    prediction_type="v_prediction")
tiny_wan21_path = _model_fixture(
    "tiny_wan21", _tiny.build_tiny_wan21, "A random Wan 2.1 T2V-shaped WanPipeline folder.")
tiny_sdxl_path = _model_fixture(
    "tiny_sdxl", _tiny.build_tiny_sdxl,
    "A random SDXL-shaped StableDiffusionXLPipeline folder (epsilon prediction).")
tiny_flux_path = _model_fixture(
    "tiny_flux", _tiny.build_tiny_flux,
    "A random FLUX.1-dev-shaped FluxPipeline folder (guidance embedding, dynamic shift).")
tiny_flux_schnell_path = _model_fixture(
    "tiny_flux_schnell", _tiny.build_tiny_flux,
    "A random FLUX.1-schnell-shaped FluxPipeline folder (no guidance embedding, static shift 1.0).", variant="schnell")
tiny_wan21_i2v_path = _model_fixture(
    "tiny_wan21_i2v", _tiny.build_tiny_wan21_i2v,
    "A random Wan 2.1 I2V-shaped WanImageToVideoPipeline folder (CLIP image encoder, in_channels 36).")
tiny_wan22_5b_path = _model_fixture(
    "tiny_wan22_5b", _tiny.build_tiny_wan22_5b,
    "A random Wan 2.2 TI2V-5B-shaped WanPipeline folder (2.2 VAE, expand_timesteps).")
tiny_wan22_14b_path = _model_fixture(
    "tiny_wan22_14b", _tiny.build_tiny_wan22_14b,
    "A random Wan 2.2 A14B T2V-shaped two-expert WanPipeline folder (boundary_ratio 0.875).")
tiny_wan22_14b_i2v_path = _model_fixture(
    "tiny_wan22_14b_i2v", _tiny.build_tiny_wan22_14b,
    "A random Wan 2.2 A14B I2V-shaped two-expert WanImageToVideoPipeline folder (boundary_ratio 0.9).", i2v=True)

"""Session-wide tiny model folders (import these fixtures from conftest.py).

Each folder is built once per test session. The builds are also memoized here, so a test module that imports
the fixtures itself (as well as conftest) still shares the one folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.tiny import build_tiny_sd15, build_tiny_wan21

_BUILT: dict[tuple[str, str], Path] = {}


def _build_once(kind: str, tmp_path_factory, builder, **kwargs) -> Path:
    key = (kind, str(tmp_path_factory.getbasetemp()))
    if key not in _BUILT:
        _BUILT[key] = builder(tmp_path_factory.mktemp(kind) / "model", **kwargs)
    return _BUILT[key]


@pytest.fixture(scope="session")
def tiny_sd15_path(tmp_path_factory) -> Path:
    """A random SD 1.5-shaped StableDiffusionPipeline folder (epsilon prediction)."""
    return _build_once("tiny_sd15", tmp_path_factory, build_tiny_sd15)


@pytest.fixture(scope="session")
def tiny_sd15_vpred_path(tmp_path_factory) -> Path:
    """The same, with a v_prediction scheduler config."""
    return _build_once("tiny_sd15_vpred", tmp_path_factory, build_tiny_sd15, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_wan21_path(tmp_path_factory) -> Path:
    """A random Wan 2.1 T2V-shaped WanPipeline folder."""
    return _build_once("tiny_wan21", tmp_path_factory, build_tiny_wan21)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    """A random SDXL-shaped StableDiffusionXLPipeline folder (epsilon prediction)."""
    from trainer.tiny import build_tiny_sdxl

    return _build_once("tiny_sdxl", tmp_path_factory, build_tiny_sdxl)


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory) -> Path:
    """A random FLUX.1-dev-shaped FluxPipeline folder (guidance embedding, dynamic shift)."""
    from trainer.tiny import build_tiny_flux

    return _build_once("tiny_flux", tmp_path_factory, build_tiny_flux)


@pytest.fixture(scope="session")
def tiny_flux_schnell_path(tmp_path_factory) -> Path:
    """A random FLUX.1-schnell-shaped FluxPipeline folder (no guidance embedding, static shift 1.0)."""
    from trainer.tiny import build_tiny_flux

    return _build_once("tiny_flux_schnell", tmp_path_factory, build_tiny_flux, variant="schnell")


@pytest.fixture(scope="session")
def tiny_wan21_i2v_path(tmp_path_factory) -> Path:
    """A random Wan 2.1 I2V-shaped WanImageToVideoPipeline folder (CLIP image encoder, in_channels 36)."""
    from trainer.tiny import build_tiny_wan21_i2v

    return _build_once("tiny_wan21_i2v", tmp_path_factory, build_tiny_wan21_i2v)


@pytest.fixture(scope="session")
def tiny_wan22_5b_path(tmp_path_factory) -> Path:
    """A random Wan 2.2 TI2V-5B-shaped WanPipeline folder (2.2 VAE, expand_timesteps)."""
    from trainer.tiny import build_tiny_wan22_5b

    return _build_once("tiny_wan22_5b", tmp_path_factory, build_tiny_wan22_5b)


@pytest.fixture(scope="session")
def tiny_wan22_14b_path(tmp_path_factory) -> Path:
    """A random Wan 2.2 A14B T2V-shaped two-expert WanPipeline folder (boundary_ratio 0.875)."""
    from trainer.tiny import build_tiny_wan22_14b

    return _build_once("tiny_wan22_14b", tmp_path_factory, build_tiny_wan22_14b)


@pytest.fixture(scope="session")
def tiny_wan22_14b_i2v_path(tmp_path_factory) -> Path:
    """A random Wan 2.2 A14B I2V-shaped two-expert WanImageToVideoPipeline folder (boundary_ratio 0.9)."""
    from trainer.tiny import build_tiny_wan22_14b

    return _build_once("tiny_wan22_14b_i2v", tmp_path_factory, build_tiny_wan22_14b, i2v=True)

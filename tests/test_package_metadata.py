"""pyproject.toml (Comfy Registry metadata) stays in step with the code and requirements.txt."""

import tomllib
from pathlib import Path

import trainer

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_version_is_the_library_version():
    assert _pyproject()["project"]["version"] == trainer.__version__


def test_registry_fields_are_there():
    doc = _pyproject()
    assert doc["project"]["name"] and doc["project"]["description"] and doc["project"]["license"]
    assert doc["tool"]["comfy"]["PublisherId"] and doc["tool"]["comfy"]["DisplayName"]


def test_dependencies_equal_requirements_txt():
    # ComfyUI Manager installs requirements.txt, the registry reads pyproject: the two lists must not drift
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    required = sorted(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    assert sorted(_pyproject()["project"]["dependencies"]) == required

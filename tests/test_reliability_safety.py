"""Safety: no user file is ever unpickled (a pickle with a malicious __reduce__ is refused, never run), the code
has no unsafe loader call, and local model folders load without a single network request."""

from __future__ import annotations

import ast
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import fixtures_models
from fixtures_models import *  # noqa: F401,F403 (the tiny model folder fixtures)
from tests.reliability_helpers import REPO, Quiet, network_guard, no_network  # noqa: F401
from trainer import checkpoint as ckpt
from trainer.demo import make_images
from trainer.errors import CheckpointError, ModelError
from trainer.families import FAMILIES, get_family
from trainer.job import parse_job
from trainer.loop import train


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"state": {0: _Payload(marker)}, "param_groups": []}, f)


def job_for(model, data, out, **save):
    return parse_job({
        "job": "safe", "output_dir": str(out),
        "model": {"family": "sd15", "path": str(model), "dtype": "fp32"},
        "datasets": [{"folder_path": str(data), "resolution": [32]}],
        "network": {"linear": 4, "linear_alpha": 4},
        "train": {"steps": 4, "batch_size": 1, "lr": 1e-3},
        "save": {"every": 2, "keep_last": 3, **save},
    })


def test_a_malicious_optimizer_pickle_in_a_checkpoint_is_refused_not_run(tiny_sd15_path, tmp_path, monkeypatch):
    data, marker = tmp_path / "images", tmp_path / "PWNED"
    make_images(data, size=32)
    job = job_for(tiny_sd15_path, data, tmp_path / "out")
    train(job, Quiet())  # a real run leaves real checkpoints
    latest = ckpt.find_resume(job.checkpoint_dir, "latest")
    write_malicious_pickle(latest / "optimizer.pt", marker)

    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused to load") as err:
        ckpt.load_bundle(latest)
    assert "arbitrary code" in str(err.value) and "weights_only=False" not in str(err.value)
    # through `run` it is refused before the model is even loaded
    monkeypatch.setattr(get_family("sd15"), "load", classmethod(lambda *a, **k: pytest.fail("model loaded")))
    with pytest.raises(CheckpointError, match="refused to load"):
        train(job, Quiet())
    assert not marker.exists(), "the pickle's payload ran"


def test_a_malicious_pickle_as_model_weights_is_refused_not_run(tiny_sd15_path, tmp_path):
    model, marker = tmp_path / "model", tmp_path / "PWNED"
    shutil.copytree(tiny_sd15_path, model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_malicious_pickle(model / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(ModelError, match="cannot load the SD 1.5 components"):
        get_family("sd15").load(str(model), dtype=torch.float32)
    assert not marker.exists(), "the pickle's payload ran"


# ---- the code itself: every loader call is a safe one ----

def _call_name(node: ast.Call) -> str:
    parts, f = [], node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    elif parts:  # a method of a call's result, e.g. X(...).eval(): not the builtin eval
        parts.append("<expr>")
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def unsafe_calls(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name, where = _call_name(node), f"{path.relative_to(root.parent)}:{node.lineno}"
            last = name.rsplit(".", 1)[-1]
            if name in ("torch.load",) and _kw(node, "weights_only") is not True:
                found.append(f"{where} {name} without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "dill.load", "marshal.loads",
                          "yaml.load", "yaml.unsafe_load", "yaml.full_load", "eval", "exec", "jsonpickle.decode"):
                found.append(f"{where} {name}")
            elif name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (None, False):
                found.append(f"{where} {name} with allow_pickle")
            elif last == "from_pretrained" and _kw(node, "trust_remote_code") not in (None, False):
                found.append(f"{where} from_pretrained(trust_remote_code=...)")
    return found


def test_no_unsafe_loader_call_in_the_code():
    assert unsafe_calls(REPO / "trainer") == []
    if (REPO / "nodes").is_dir():
        assert unsafe_calls(REPO / "nodes") == []


def test_the_scan_would_see_an_unsafe_call(tmp_path):
    """The source scan is not vacuous: it flags each pattern it looks for."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "m.py").write_text("import torch, pickle, yaml, numpy as np\n"
                              "torch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\n"
                              "yaml.load('a')\nnp.load('x', allow_pickle=True)\n"
                              "M.from_pretrained('p', trust_remote_code=True)\ntorch.load('x', weights_only=True)\n"
                              "M(1).eval()\n")
    found = unsafe_calls(bad)
    assert [f.split(" ", 1)[0] for f in found] == [f"bad/m.py:{n}" for n in (2, 3, 4, 5, 6, 7)], found


# ---- no network for local folders ----

@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_local_model_folders_load_without_network(family_name, request):
    fixture = f"tiny_{family_name}_path"
    if fixture not in fixtures_models.__dict__:
        pytest.skip(f"no {fixture} fixture in tests/fixtures_models.py")
    folder = request.getfixturevalue(fixture)
    with network_guard() as attempts:
        family = get_family(family_name).load(str(folder), dtype=torch.float32)
    assert family.denoiser is not None
    assert attempts == [], f"loading a local {family_name} folder tried the network: {attempts}"


def test_a_whole_run_on_a_local_folder_makes_no_network_request(tiny_sd15_path, tmp_path, no_network):
    data = tmp_path / "images"
    make_images(data, size=32)
    result = train(job_for(tiny_sd15_path, data, tmp_path / "out"), Quiet())
    assert result.step == 4 and result.lora_path.is_file()


def test_the_network_guard_sees_a_hub_request():
    """The guard is not vacuous: a request through the Hugging Face hub client's HTTP stack is seen."""
    from huggingface_hub.utils import get_session

    with network_guard() as attempts:
        with pytest.raises(Exception):
            get_session().get("https://huggingface.co/api/models/some-org/some-model", timeout=5)
    assert attempts

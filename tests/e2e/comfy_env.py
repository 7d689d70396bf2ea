"""Drive a real, separately installed ComfyUI from tests: its Python, a server subprocess, the LoRA key probe.

ComfyUI is never part of this repo or of CI. A developer points COMFYUI_ROOT at a ComfyUI checkout (the folder
with main.py); its interpreter is COMFYUI_PYTHON, else $COMFYUI_ROOT/../comfyvenv/bin/python when that exists.
Tests call `require_comfyui()` and skip when either is missing.

Server protocol used here (ComfyUI's own HTTP API): POST /prompt {"prompt": API_JSON, "client_id": ID} ->
{"prompt_id"}; GET /history/<prompt_id> -> {prompt_id: {"outputs", "status"}} once it has run;
ws://HOST/ws?clientId=ID carries JSON {"type", "data"} messages (execution_start, executing, progress,
executed, execution_success, execution_error, ...) and binary preview frames.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

PROBE_SCRIPT = Path(__file__).with_name("probe_lora_keys.py")
READY_TIMEOUT_S = 180.0


class ComfyUIError(RuntimeError):
    """ComfyUI failed to start, rejected a prompt, or a prompt failed; the message carries its log/answer."""


def comfyui_root() -> Path | None:
    root = os.environ.get("COMFYUI_ROOT")
    if not root:
        return None
    root = Path(root).expanduser().resolve()
    return root if (root / "main.py").is_file() else None


def comfyui_python(root: Path | None = None) -> Path | None:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    root = root or comfyui_root()
    if root is None:
        return None
    candidate = root.parent / "comfyvenv" / "bin" / "python"
    return candidate if candidate.is_file() else None


def require_comfyui() -> tuple[Path, Path]:
    """(root, python) or pytest.skip with the reason; for tests only."""
    import pytest

    root = comfyui_root()
    if root is None:
        pytest.skip("set COMFYUI_ROOT to a ComfyUI checkout (folder with main.py) to run ComfyUI end-to-end checks")
    python = comfyui_python(root)
    if python is None:
        pytest.skip("no ComfyUI interpreter: set COMFYUI_PYTHON (or create $COMFYUI_ROOT/../comfyvenv)")
    return root, python


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path, custom_nodes: dict[str, Path] | None = None) -> Path:
    """The --base-directory layout ComfyUI expects (it crashes without custom_nodes/), settings that skip the
    first-run dialog, and custom node packs linked in by name."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "temp", "user/default",
                "models/diffusion_models", "models/checkpoints", "models/loras"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    for name, target in (custom_nodes or {}).items():
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(Path(target).resolve(), target_is_directory=True)
    return base


@dataclass
class ComfyServer:
    root: Path
    base_dir: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self) -> dict:
        r = self.get("/object_info")
        r.raise_for_status()
        return r.json()

    def connect_ws(self, timeout: float = 60.0):
        """A websocket on this server's client id; connect before posting so no message is missed."""
        import websocket  # websocket-client

        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                           timeout=timeout)

    def post_prompt(self, prompt: dict) -> str:
        r = requests.post(self.url + "/prompt", json={"prompt": prompt, "client_id": self.client_id}, timeout=30)
        if r.status_code != 200:
            raise ComfyUIError(f"POST /prompt answered {r.status_code}: {r.text}")
        return r.json()["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        r = self.get(f"/history/{prompt_id}")
        r.raise_for_status()
        return r.json().get(prompt_id)

    def wait_history(self, prompt_id: str, timeout: float = 300.0, poll_s: float = 0.2) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.process.poll() is not None:
                raise ComfyUIError(f"ComfyUI exited ({self.process.returncode}) while running {prompt_id}:\n"
                                   + self.log()[-4000:])
            time.sleep(poll_s)
        raise ComfyUIError(f"prompt {prompt_id} did not finish within {timeout} s:\n" + self.log()[-4000:])

    def run_prompt(self, prompt: dict, timeout: float = 300.0) -> tuple[dict, list[dict]]:
        """Queue `prompt`, collect its ws messages until it ends, return (history entry, messages).
        Raises ComfyUIError with ComfyUI's own error text when the prompt fails."""
        ws = self.connect_ws(timeout=timeout)
        try:
            prompt_id = self.post_prompt(prompt)
            messages = read_ws_until_done(ws, prompt_id, timeout)
        finally:
            ws.close()
        entry = self.wait_history(prompt_id, timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m for m in messages if m.get("type") == "execution_error"]
            raise ComfyUIError(f"prompt {prompt_id} failed: {json.dumps(errors or status)[:4000]}")
        return entry, messages

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def read_ws_until_done(ws, prompt_id: str, timeout: float) -> list[dict]:
    """JSON messages from `ws` until this prompt succeeds, fails or is interrupted (binary frames dropped)."""
    deadline = time.monotonic() + timeout
    messages = []
    while time.monotonic() < deadline:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        raw = ws.recv()
        if not isinstance(raw, str):
            continue
        msg = json.loads(raw)
        messages.append(msg)
        data = msg.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            return messages
    raise ComfyUIError(f"no end message for prompt {prompt_id} within {timeout} s; got {messages[-5:]}")


def start_server(base_dir: Path, *, root: Path | None = None, python: Path | None = None,
                 port: int | None = None, extra_args: tuple[str, ...] = (),
                 timeout: float = READY_TIMEOUT_S, env: dict[str, str] | None = None) -> ComfyServer:
    """Start ComfyUI on 127.0.0.1 (CPU, no API nodes, in-memory DB) and wait until /object_info answers.

    `env`: variables added for the server's process only (e.g. OMP_NUM_THREADS=1, the test-only packs' tiny
    configs); the test process's own environment is left alone."""
    root = root or comfyui_root()
    python = python or comfyui_python(root)
    if root is None or python is None:
        raise ComfyUIError("COMFYUI_ROOT / COMFYUI_PYTHON are not set to a ComfyUI checkout and its interpreter")
    base_dir = prepare_base_dir(base_dir)
    port = port or free_port()
    log_path = Path(base_dir) / f"comfyui-{port}.log"
    cmd = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
           "--base-directory", str(base_dir), *extra_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    server = ComfyServer(root=Path(root), base_dir=Path(base_dir), port=port, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ComfyUIError(f"ComfyUI exited with {process.returncode} before answering:\n" + server.log()[-4000:])
        try:
            if server.get("/object_info", timeout=5).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.25)
    server.stop()
    raise ComfyUIError(f"ComfyUI did not answer /object_info within {timeout} s:\n" + server.log()[-4000:])


def probe_many(model_file: str | os.PathLike, lora_files: list, *, strength: float = 1.0,
               dump_dir: str | os.PathLike | None = None, diffusers_unet: bool = False,
               save_converted: str | os.PathLike | None = None, timeout: float = 600.0) -> list[dict]:
    """Run probe_lora_keys.py under ComfyUI's Python: for each LoRA file (applied alone to the model, which
    is loaded once) which keys ComfyUI applies and with what effect; see that script's docstring for the
    fields. With dump_dir each result's "deltas_file" holds patched - base per patched weight.
    Raises ComfyUIError when the probe fails."""
    root = comfyui_root()
    python = comfyui_python(root)
    if root is None or python is None:
        raise ComfyUIError("COMFYUI_ROOT / COMFYUI_PYTHON are not set to a ComfyUI checkout and its interpreter")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [str(python), str(PROBE_SCRIPT), str(Path(model_file).resolve()),
               *(str(Path(f).resolve()) for f in lora_files),
               "--strength", repr(float(strength)), "--out", str(out)]
        if dump_dir:
            cmd += ["--dump-dir", str(Path(dump_dir).resolve())]
        if diffusers_unet:
            cmd.append("--diffusers-unet")
        if save_converted:
            cmd += ["--save-converted", str(Path(save_converted).resolve())]
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not out.exists():
            raise ComfyUIError(f"probe failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-4000:]}")
        results = json.loads(out.read_text())
    for r in results:
        r["log"] = done.stderr
    return results


def probe(model_file: str | os.PathLike, lora_file: str | os.PathLike, **kw) -> dict:
    """probe_many for one LoRA file: e.g. check a file our trainer exported loads with no ignored key:
    `r = probe(model, lora); assert r["not_loaded"] == [] and r["patches_applied"] == n_modules`."""
    return probe_many(model_file, [lora_file], **kw)[0]


if __name__ == "__main__":
    # Manual use: python tests/e2e/comfy_env.py MODEL LORA  (prints the probe result)
    print(json.dumps({k: v for k, v in probe(sys.argv[1], sys.argv[2]).items() if k != "log"}, indent=1))

"""Shared pieces of the reliability tests (tests/test_reliability_*.py, tests/test_bad_input.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.loop import Callbacks

REPO = Path(__file__).resolve().parents[1]
VOLATILE = ("timestamp", "event", "event_detail")


def strip_volatile(record: dict) -> dict:
    """A metrics record without the keys that may differ between a straight and a resumed run."""
    return {k: v for k, v in record.items() if k not in VOLATILE}


class StopAfter(Callbacks):
    """Asks the loop to stop once `step` is done (what the ComfyUI cancel button does). The loop asks
    should_stop after a step's update and before that step's record goes out (the record names the stop)."""

    def __init__(self, step: int):
        self.step, self.last = step, 0

    def log(self, message: str) -> None:
        pass

    def on_step(self, record: dict) -> None:
        self.last = record["step"]

    def should_stop(self) -> bool:
        return self.last >= self.step - 1


class Quiet(Callbacks):
    def log(self, message: str) -> None:
        pass


@contextlib.contextmanager
def network_guard():
    """Yields a list of every attempt to open a connection or resolve a name; each attempt fails."""
    attempts = []

    def refuse_connect(self, address, *args):
        attempts.append(address)
        raise OSError("network access attempted in a test that must stay offline")

    def refuse_resolve(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("network access attempted in a test that must stay offline")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse_connect)
        mp.setattr(socket.socket, "connect_ex", refuse_connect)
        mp.setattr(socket, "getaddrinfo", refuse_resolve)
        yield attempts


@pytest.fixture
def no_network():
    """Fails the test if anything tried the network (checked afterwards, so that a library that swallows the
    error cannot hide the attempt)."""
    with network_guard() as attempts:
        yield attempts
    assert attempts == [], f"network requests were attempted: {attempts}"


def tree_digest(root: Path) -> dict:
    """path -> sha256 of every file under `root` (folders as None): to prove nothing on disk changed."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


def cli_env(**extra) -> dict:
    """Environment for `python -m trainer` subprocesses: the repo importable, one thread (2-core CI)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_cli(args: list, cwd: Path, log_path: Path, **env) -> subprocess.Popen:
    """`python -m trainer <args>` in its own session, output to `log_path`."""
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "trainer", *map(str, args)], cwd=cwd, env=cli_env(**env),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

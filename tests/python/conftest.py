"""Fixtures of the Python suite: a real sidecard (one per session, like tests/system) and the
rank processes of the multi-rank scenarios (see ranks.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

import ranks


def _cores() -> int:
    return max(1, min(2, len(os.sched_getaffinity(0))))


class Daemon:
    """sidecard with its socket in a temp dir; stopped with SIGTERM at the end."""

    def __init__(self, arena_size: str):
        binary = os.environ.get("SIDECARD", "")
        if not binary or not os.access(binary, os.X_OK):
            pytest.fail("$SIDECARD must name the sidecard binary (meson sets it)")
        self.dir = tempfile.mkdtemp(prefix="sidecar-python-")
        self.socket = os.path.join(self.dir, "sidecar.sock")
        self.log_path = os.path.join(self.dir, "sidecard.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [binary, "--socket", self.socket, "--tcp", "off", "--arena-size", arena_size, "--node-id",
             "python-node", "--cores", str(_cores()), "--spin-us", "0", "--send-timeout-ms", "60000"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.socket):
            if self.process.poll() is not None:
                pytest.fail(f"sidecard exited at start ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"sidecard did not create its socket within 15 s:\n{self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-6000:].decode(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def daemon():
    d = Daemon("128MiB")
    yield d
    code = d.stop()
    shutil.rmtree(d.dir, ignore_errors=True)
    assert code == 0, f"sidecard did not stop cleanly ({code})"


@pytest.fixture(scope="session")
def rank_pool(daemon):
    pool = ranks.RankPool(daemon.socket, 4)
    yield pool
    pool.close()


@pytest.fixture
def new_id():
    """A fresh data id per call: tests share one daemon."""
    return lambda prefix="id": f"{prefix}-{uuid.uuid4().hex}"

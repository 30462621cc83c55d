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


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NETNS = os.path.join(REPO, "tools", "netns")


class Daemon:
    """sidecard with its socket in a temp dir; stopped with SIGTERM at the end. `extra` flags and
    `prefix` (a command to run it under, e.g. `tools/netns exec 1`) serve the inter setup."""

    def __init__(self, arena_size: str, extra=(), prefix=(), node_id="python-node", extra_env=None):
        binary = os.environ.get("SIDECARD", "")
        if not binary or not os.access(binary, os.X_OK):
            pytest.fail("$SIDECARD must name the sidecard binary (meson sets it)")
        self.dir = tempfile.mkdtemp(prefix="sidecar-python-")
        self.socket = os.path.join(self.dir, "sidecar.sock")
        self.log_path = os.path.join(self.dir, "sidecard.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        env.update(extra_env or {})
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*prefix, binary, "--socket", self.socket, "--arena-size", arena_size, "--node-id",
             node_id, "--cores", str(_cores()), "--spin-us", "0", "--send-timeout-ms", "60000",
             *(extra or ("--tcp", "off"))],
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


def _free_port() -> int:
    import socket  # noqa: PLC0415
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The inter setup: ranks {0,1} on node A and {2,3} on node B, each node its own sidecard
    joined by a rank map. As root, each daemon runs in its own network namespace (tools/netns,
    UCX over TCP between them); otherwise both on 127.0.0.1."""

    def __init__(self, arena_size: str):
        self.prefix = f"spy{os.getpid()}"
        self.netns = False
        if os.geteuid() == 0 and shutil.which("ip"):
            self.netns = subprocess.run([NETNS, "up", "2", self.prefix], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, timeout=120).returncode == 0
        if self.netns:
            addresses = ["10.77.0.1:7650", "10.77.0.2:7650"]
        else:
            addresses = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
        peers = f"0-1={addresses[0]},2-3={addresses[1]}"
        self.daemons = []
        for i, address in enumerate(addresses):
            prefix = (NETNS, "exec", str(i)) if self.netns else ()
            self.daemons.append(Daemon(arena_size, extra=("--tcp", address, "--peers", peers),
                                       prefix=prefix, node_id=f"python-node{i}",
                                       extra_env={"UCX_TLS": "tcp",
                                                  "SIDECAR_NETNS_PREFIX": self.prefix}))

    def sockets(self):
        a, b = self.daemons
        return [a.socket, a.socket, b.socket, b.socket]

    def stop(self):
        codes = [d.stop() for d in self.daemons]
        for d in self.daemons:
            shutil.rmtree(d.dir, ignore_errors=True)
        if self.netns:
            subprocess.run([NETNS, "down", self.prefix], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120)
        return codes


@pytest.fixture(scope="session", params=["intra", "inter"])
def rank_pool(request, daemon):
    """Every matrix test runs in both setups of the scenarios: one node, and two nodes."""
    if request.param == "intra":
        pool = ranks.RankPool(daemon.socket, 4)
        yield pool
        pool.close()
        return
    cluster = Cluster("128MiB")
    pool = ranks.RankPool(cluster.sockets(), 4)
    yield pool
    pool.close()
    codes = cluster.stop()
    assert codes == [0, 0], f"a sidecard of the inter setup did not stop cleanly ({codes})"


@pytest.fixture
def new_id():
    """A fresh data id per call: tests share one daemon."""
    return lambda prefix="id": f"{prefix}-{uuid.uuid4().hex}"

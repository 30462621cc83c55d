"""The drop-in check: dropin_program.py, written against Cornserve's API with only its imports
changed, passes against the real daemon (two producer processes of one group, one consumer) and
in mock mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from sidecar import dtypes

pytestmark = pytest.mark.skipif(dtypes.torch is None, reason="the Cornserve-style program uses torch")

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dropin_program.py")


def _start(role, rank, nonce, env):
    return subprocess.Popen([sys.executable, PROGRAM, role, str(rank), nonce], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs):
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        outputs.append((p.args[2:4], p.returncode, out))
    for args, code, out in outputs:
        assert code == 0, f"{args} exited {code}:\n{out}"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "CORNSERVE_"))}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_dropin_against_the_daemon(daemon):
    nonce = uuid.uuid4().hex
    env = _env(SIDECAR_SOCKET=daemon.socket)
    procs = [_start("consumer", 2, nonce, env)] + [_start("producer", r, nonce, env) for r in (0, 1)]
    _finish(procs)


def test_dropin_in_mock_mode(tmp_path):
    sys.path.insert(0, os.path.dirname(PROGRAM))
    import dropin_program  # noqa: PLC0415

    nonce = uuid.uuid4().hex
    mapping = {}
    for id, chunks in dropin_program.ids(nonce).items():
        for i in range(chunks):
            ext = ".json" if "obj" in id or (id.endswith("stream") and i == 0) else ".pt"
            if id.endswith("obj-1"):
                ext = ".bin"  # bytes: JSON cannot hold them
            mapping[f"{id}-{i}"] = str(tmp_path / f"{id}-{i}{ext}")
    env = _env(CORNSERVE_MOCK_SIDECAR="1", CORNSERVE_MOCK_SIDECAR_MAPPING=json.dumps(mapping),
               SIDECAR_SOCKET=str(tmp_path / "no-daemon.sock"))
    _finish([_start("producer", 0, nonce, env)])
    _finish([_start("consumer", 2, nonce, env)])

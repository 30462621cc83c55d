"""Mock mode, as the reference's: no daemon; send writes the mapped file, recv reads it back."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from sidecar import Sidecar, SidecarConfig
from sidecar import dtypes

torch = dtypes.torch


@pytest.fixture(params=["cornserve", "ours"])
def mock_env(request, monkeypatch, tmp_path):
    flag, mapping = (("CORNSERVE_MOCK_SIDECAR", "CORNSERVE_MOCK_SIDECAR_MAPPING") if request.param == "cornserve"
                     else ("SIDECAR_MOCK", "SIDECAR_MOCK_MAPPING"))
    ext = ".pt" if torch is not None else ".npy"
    files = {
        "t-0": tmp_path / f"t0{ext}", "c-0": tmp_path / f"c0{ext}", "c-1": tmp_path / f"c1{ext}",
        "d-0": tmp_path / "d0.json", "b-0": tmp_path / "b0.bin", "bj-0": tmp_path / "bj.json", "i-0": tmp_path / "i0.json", "absent-0": tmp_path / "absent.json",
    }
    monkeypatch.setenv(flag, "True" if request.param == "cornserve" else "1")
    monkeypatch.setenv(mapping, json.dumps({k: str(v) for k, v in files.items()}))
    # Mock mode connects to nothing: a socket that does not exist proves it.
    monkeypatch.setenv("SIDECAR_SOCKET", str(tmp_path / "no-daemon.sock"))
    return files


def _random(shape):
    a = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    return torch.from_numpy(a) if torch is not None else a


def _equal(got, want):
    if torch is not None:
        return got.dtype == want.dtype and torch.equal(got, want)
    return got.dtype == want.dtype and np.array_equal(got, want)


def test_mock_round_trips(mock_env):
    sc = Sidecar(SidecarConfig(sidecar_rank=0, send_tensor_dtype="float32", send_tensor_shape=(-1, 5, 8)))
    t = _random((3, 5, 8))
    assert sc.send(t, "t", [[1]]).result() is None
    assert mock_env["t-0"].exists()
    assert _equal(sc.recv_sync("t"), t)
    chunks = [_random((3, 5, 4)), _random((3, 5, 4)) * 2]
    for i, c in enumerate(chunks):
        sc.send(c, "c", [[1]], chunk_id=i, num_chunks=2)
    assert all(_equal(sc.recv_sync("c", i), c) for i, c in enumerate(chunks))
    sc.send({"first_token": 11908, "x": [1, 2]}, "d", [[1]])
    assert json.loads(mock_env["d-0"].read_text()) == {"first_token": 11908, "x": [1, 2]}
    assert sc.recv_sync("d") == {"first_token": 11908, "x": [1, 2]}
    sc.send(b"\x00raw", "b", [[1]])
    assert sc.recv_sync("b") == b"\x00raw"
    with pytest.raises(ValueError, match=".bin"):
        sc.send(b"x", "bj", [[1]])
    sc.send(42, "i", [[1]])
    assert sc.recv_sync("i") == 42
    # A missing file reads as end of stream; a key missing from the map is an error.
    assert sc.recv_sync("absent") is None
    with pytest.raises(ValueError, match="not in the mapping"):
        sc.recv_sync("t", 1)
    with pytest.raises(ValueError, match="not in the mapping"):
        sc.send(1, "unmapped", [[1]])
    # The rest does nothing.
    sc.close_stream("c", 2, [[1]])
    sc.mark_done_sync("t")
    sc.shutdown_sync()

    async def main():
        assert await sc.recv("i") == 42
        await sc.mark_done("i")
        await sc.shutdown()

    asyncio.run(main())


def test_mock_invalid_mapping_is_empty(monkeypatch, tmp_path):
    monkeypatch.setenv("CORNSERVE_MOCK_SIDECAR", "1")
    monkeypatch.setenv("CORNSERVE_MOCK_SIDECAR_MAPPING", "{not json")
    sc = Sidecar(SidecarConfig(sidecar_rank=0, send_tensor_dtype="float32", send_tensor_shape=(-1, 4)))
    with pytest.raises(ValueError, match="not in the mapping"):
        sc.recv_sync("x")


def test_mock_off_values_need_a_daemon(monkeypatch, tmp_path):
    monkeypatch.setenv("CORNSERVE_MOCK_SIDECAR", "0")
    monkeypatch.setenv("SIDECAR_SOCKET", str(tmp_path / "no-daemon.sock"))
    with pytest.raises(ConnectionError):
        Sidecar(SidecarConfig(sidecar_rank=0, send_tensor_dtype="float32", send_tensor_shape=(-1, 4)))

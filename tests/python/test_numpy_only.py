"""numpy without torch: a process with SIDECAR_NO_TORCH=1 (as if torch were not installed)
receives numpy arrays, bfloat16 as its uint16 raw bits, and sends numpy arrays to a torch rank."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from sidecar import Sidecar, SidecarConfig
from sidecar import dtypes

torch = dtypes.torch
pytestmark = pytest.mark.skipif(torch is None, reason="torch is absent: the whole suite already runs numpy-only")

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import sidecar
    from sidecar import Sidecar, SidecarConfig
    assert sidecar.dtypes.torch is None and "torch" not in sys.modules, "torch was imported"
    socket, rank, peer, nonce = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sc = Sidecar(SidecarConfig(sidecar_rank=rank, send_tensor_dtype=np.float32, send_tensor_shape=(-1, 8),
                               socket_path=socket))
    bits = sc.recv_sync(nonce + "-bf16", timeout=60)
    assert isinstance(bits, np.ndarray) and bits.dtype == np.uint16 and bits.shape == (4, 8), (bits.dtype, bits.shape)
    f64 = sc.recv_sync(nonce + "-f64", timeout=60)
    assert f64.dtype == np.float64 and np.array_equal(f64, np.arange(32.0).reshape(4, 8) / 4)
    sc.send(bits.view(np.int16), nonce + "-back", [[peer]]).result(timeout=60)
    sc.send(np.arange(24, dtype=np.int16).reshape(2, 3, 4)[:, ::2], nonce + "-strided", [[peer]]).result(timeout=60)
    sc.mark_done_sync(nonce + "-bf16")
    sc.mark_done_sync(nonce + "-f64")
    sc.shutdown_sync()
    print("child ok")
""")


def test_numpy_only_process_interoperates_with_torch(daemon):
    nonce = uuid.uuid4().hex
    me, child_rank = 900, 901
    with Sidecar(SidecarConfig(sidecar_rank=me, send_tensor_dtype=torch.bfloat16, send_tensor_shape=(-1, 8),
                               socket_path=daemon.socket)) as sc:
        env = dict(os.environ, SIDECAR_NO_TORCH="1")
        child = subprocess.Popen([sys.executable, "-c", CHILD, daemon.socket, str(child_rank), str(me), nonce],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        bf16 = (torch.arange(32, dtype=torch.float32).reshape(4, 8) / 3).to(torch.bfloat16)
        sc.send(bf16, nonce + "-bf16", [[child_rank]])
        sc.send(torch.arange(32, dtype=torch.float64).reshape(4, 8) / 4, nonce + "-f64", [[child_rank]])
        try:
            back = sc.recv_sync(nonce + "-back", timeout=30)
        except Exception:
            child.kill()
            raise AssertionError("the numpy-only process failed:\n" + child.communicate()[0]) from None
        # Sent back as int16 (libsidecar has no uint16): the same bits.
        assert back.dtype == torch.int16 and torch.equal(back, bf16.view(torch.int16))
        strided = sc.recv_sync(nonce + "-strided", timeout=60)
        assert strided.dtype == torch.int16 and torch.equal(strided, torch.arange(24, dtype=torch.int16).reshape(2, 3, 4)[:, ::2])
        sc.mark_done_sync(nonce + "-back")
        sc.mark_done_sync(nonce + "-strided")
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0, out

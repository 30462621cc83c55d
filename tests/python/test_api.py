"""The Python API against a real sidecard, in one process (two Sidecars of different ranks on
their own owner threads): exact round trips, zero-copy views, bad arguments, errors that reach
the caller, mark_done rules, asyncio with many concurrent recvs, shutdown."""

from __future__ import annotations

import asyncio
import math
import threading

import numpy as np
import pytest

import sidecar
from sidecar import Sidecar, SidecarConfig, SidecarError, SidecarTimeoutError, SidecarValueError
from sidecar import dtypes

torch = dtypes.torch
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (numpy-only run)")

_next_rank = [100]


def _ranks(n: int):
    """Fresh ranks per test: a rank stays registered until its Sidecar shuts down."""
    first = _next_rank[0]
    _next_rank[0] += n
    return list(range(first, first + n))


def _config(rank, socket, **kw):
    kw.setdefault("send_tensor_dtype", "uint8")
    kw.setdefault("send_tensor_shape", (-1, 64))
    return SidecarConfig(sidecar_rank=rank, socket_path=socket, **kw)


@pytest.fixture
def pair(daemon):
    """(producer, consumer) of fresh ranks, shut down after the test."""
    a, b = _ranks(2)
    producer = Sidecar(_config(a, daemon.socket))
    consumer = Sidecar(_config(b, daemon.socket))
    yield producer, consumer
    producer.shutdown_sync()
    consumer.shutdown_sync()


# -- SidecarConfig ---------------------------------------------------------------------------------

def test_config_defaults_and_sorting():
    c = SidecarConfig(sidecar_rank=3, send_tensor_dtype="bfloat16", send_tensor_shape=(-1, 4096))
    assert c.group == [3] and c.max_workers == 8 and c.concurrent_copy is False
    assert SidecarConfig(sidecar_rank=3, group=[5, 3, 4], send_tensor_dtype="float32",
                         send_tensor_shape=(-1, 8)).group == [3, 4, 5]
    # Each side falls back to the other's hint; the unit is prod(shape[1:]).
    r = SidecarConfig(sidecar_rank=0, recv_tensor_dtype=np.float16, recv_tensor_shape=(-1, 10, 10))
    assert r.send_hint() == r.recv_hint() == (dtypes.CODES["float16"], [10, 10])


_HINT = dict(send_tensor_shape=(-1, 4), send_tensor_dtype="float32")


@pytest.mark.parametrize("kwargs,message", [
    (dict(sidecar_rank=1, group=[0, 2], **_HINT), "not in its group"),
    (dict(sidecar_rank=0), "send_tensor_shape or recv_tensor_shape"),
    (dict(sidecar_rank=0, send_tensor_shape=(-1, 4)), "without send_tensor_dtype"),
    (dict(sidecar_rank=0, send_tensor_dtype="float32"), "send_tensor_shape or recv_tensor_shape"),
    (dict(sidecar_rank=0, recv_tensor_dtype="int8", **_HINT), "without recv_tensor_shape"),
    (dict(sidecar_rank=0, max_workers=0, **_HINT), "max_workers"),
    (dict(sidecar_rank=-1, **_HINT), ">= 0"),
    (dict(sidecar_rank=0, send_tensor_shape=(-1, 4), send_tensor_dtype="complex64"), "supported dtype"),
    (dict(sidecar_rank=0, send_tensor_shape=(-1, 0), send_tensor_dtype="float32"), "> 0"),
    (dict(sidecar_rank=0, group=[0, 0], **_HINT), "twice"),
])
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SidecarConfig(**kwargs)


@needs_torch
def test_config_takes_torch_dtypes():
    c = SidecarConfig(sidecar_rank=0, send_tensor_dtype=torch.bfloat16, send_tensor_shape=(-1, 4096))
    assert c.send_hint() == (dtypes.CODES["bfloat16"], [4096])


def test_connect_errors(daemon, tmp_path):
    with pytest.raises(sidecar.SidecarConnectionError):
        Sidecar(_config(_ranks(1)[0], str(tmp_path / "no-daemon.sock")))
    rank = _ranks(1)[0]
    with Sidecar(_config(rank, daemon.socket)):
        with pytest.raises(SidecarValueError) as e:
            Sidecar(_config(rank, daemon.socket))
        assert e.value.code == "already-registered"


# -- objects ---------------------------------------------------------------------------------------

VALUES = ["string", "", "ünïcödé ✓", b"bytes", b"", b"\x00\xff" * 100, 0, 5, -7, 2**100, -(2**70), 10.6, 5 / 3,
          -0.0, math.inf, 1e-300, True, False, {"first_token": 11908, "nested": {"l": [1, 2.5, None, "x"]}}, {},
          [1, "two", 3.0, [True]]]


def test_objects_round_trip_exactly(pair, new_id):
    producer, consumer = pair
    ids = [new_id("obj") for _ in VALUES]
    futures = [producer.send(v, i, [[consumer.sidecar_rank]]) for v, i in zip(VALUES, ids)]
    for v, i in zip(VALUES, ids):
        got = consumer.recv_sync(i)
        assert type(got) is type(v) and got == v, (got, v)
        if isinstance(v, float):
            assert math.copysign(1, got) == math.copysign(1, v)
        consumer.mark_done_sync(i)
    for f in futures:
        assert f.result(timeout=30) is None


@pytest.mark.parametrize("bad,message", [
    (None, "unsupported data type NoneType"),
    ({1, 2}, "unsupported data type set"),
    (object(), "unsupported data type object"),
    ((1, 2), "unsupported data type tuple"),
    ({1: "int key"}, "dict keys must be str"),
    ({"a": {1, 2}}, "cannot be sent inside"),
])
def test_send_rejects_unsupported_data(pair, new_id, bad, message):
    producer, consumer = pair
    with pytest.raises(ValueError, match=message):
        producer.send(bad, new_id(), [[consumer.sidecar_rank]])


def test_send_rejects_bad_arguments_at_once(pair, new_id):
    producer, consumer = pair
    me, other = producer.sidecar_rank, consumer.sidecar_rank
    id = new_id()
    cases = [
        (dict(id=id, dst_sidecar_ranks=[[me]]), "cannot send to itself"),
        (dict(id=id, dst_sidecar_ranks=[[-1]]), ">= 0"),
        (dict(id=id, dst_sidecar_ranks=[]), "non-empty list of groups"),
        (dict(id=id, dst_sidecar_ranks=[other]), "list of ranks"),
        (dict(id=id, dst_sidecar_ranks=[[]]), "list of ranks"),
        (dict(id=id, dst_sidecar_ranks=[[other, other]]), "twice"),
        (dict(id="", dst_sidecar_ranks=[[other]]), "non-empty str"),
        (dict(id=42, dst_sidecar_ranks=[[other]]), "non-empty str"),
        (dict(id=id, dst_sidecar_ranks=[[other]], chunk_id=2, num_chunks=2), "not below num_chunks"),
        (dict(id=id, dst_sidecar_ranks=[[other]], chunk_id=-1), "chunk_id"),
        (dict(id=id, dst_sidecar_ranks=[[other]], num_chunks=0), "num_chunks"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            producer.send("x", **kwargs)
    with pytest.raises(ValueError, match="num_chunks"):
        producer.close_stream(id, 0, [[other]])
    with pytest.raises(ValueError, match="timeout"):
        consumer.recv_sync(id, timeout=0)
    # Nothing was sent: the id is still fresh.
    producer.send("after", id, [[other]]).result(timeout=30)
    assert consumer.recv_sync(id) == "after"
    consumer.mark_done_sync(id)


def test_failed_send_raises_on_its_future(pair, new_id):
    producer, consumer = pair
    id = new_id()
    producer.send("a", id, [[consumer.sidecar_rank]], chunk_id=0, num_chunks=2).result(timeout=30)
    refused = producer.send("b", id, [[consumer.sidecar_rank]], chunk_id=1, num_chunks=3)
    with pytest.raises(SidecarValueError) as e:
        refused.result(timeout=30)
    assert e.value.code == "num-chunks-mismatch"
    # Observed on its future: not raised again by the next call.
    assert consumer.recv_sync(id, 0) == "a"


def test_unobserved_failed_send_raises_on_the_next_call_on_its_id(pair, new_id):
    producer, consumer = pair
    id = new_id()
    producer.send("a", id, [[consumer.sidecar_rank]]).result(timeout=30)
    dropped = producer.send("again", id, [[consumer.sidecar_rank]])  # already sent and held
    while not dropped.done():
        threading.Event().wait(0.01)
    with pytest.raises(SidecarValueError) as e:
        producer.close_stream(id, 1, [[consumer.sidecar_rank]])
    assert e.value.code == "already-sent"
    consumer.mark_done_sync(id)


# -- tensors ---------------------------------------------------------------------------------------

DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]


def _tensor(shape, dtype):
    values = (np.arange(int(np.prod(shape)), dtype=np.int64) % 50 - 20).reshape(shape)
    if torch is not None:
        t = torch.from_numpy(values)
        return (t > 0) if dtype == "bool" else (t.to(torch.float32) / 4).to(getattr(torch, dtype)) \
            if getattr(torch, dtype).is_floating_point else t.to(getattr(torch, dtype))
    if dtype == "bool":
        return np.asarray(values > 0)
    return np.asarray((values / 4).astype(dtype) if np.dtype(dtype).kind == "f" else values.astype(dtype))


def _assert_same(got, want):
    if torch is not None:
        if isinstance(want, np.ndarray):
            want = torch.from_numpy(want)
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
        assert torch.equal(got, want)
    else:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if torch is not None or d != "bfloat16"])
def test_tensor_dtypes_and_shapes_survive(pair, new_id, dtype):
    producer, consumer = pair
    for shape in [(3, 5), (2, 3, 4), (7,), ()]:
        id = new_id(dtype)
        t = _tensor(shape, dtype)
        producer.send(t, id, [[consumer.sidecar_rank]]).result(timeout=30)
        _assert_same(consumer.recv_sync(id), t)
        consumer.mark_done_sync(id)


def test_empty_tensor(pair, new_id):
    producer, consumer = pair
    id = new_id()
    t = _tensor((0, 64), "float32")
    producer.send(t, id, [[consumer.sidecar_rank]]).result(timeout=30)
    _assert_same(consumer.recv_sync(id), t)
    consumer.mark_done_sync(id)


def test_strided_sources(pair, new_id):
    producer, consumer = pair
    base = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    sources = [base.T, base[::2, 1::3], base[::-1], np.asfortranarray(base), np.broadcast_to(base[0], (4, 8))]
    if torch is not None:
        tb = torch.from_numpy(base.copy())
        sources += [tb.t(), tb[1::2, ::2], tb.unsqueeze(0).expand(3, 6, 8)]
    for s in sources:
        id = new_id("strided")
        producer.send(s, id, [[consumer.sidecar_rank]]).result(timeout=30)
        expect = np.ascontiguousarray(s) if isinstance(s, np.ndarray) else s.contiguous()
        _assert_same(consumer.recv_sync(id), expect)
        consumer.mark_done_sync(id)


def test_numpy_source_is_received_as_the_package_tensor_type(pair, new_id):
    producer, consumer = pair
    id = new_id()
    producer.send(np.arange(12, dtype=np.int32).reshape(3, 4), id, [[consumer.sidecar_rank]])
    got = consumer.recv_sync(id)
    assert isinstance(got, torch.Tensor if torch is not None else np.ndarray)
    consumer.mark_done_sync(id)


def _address(t):
    return t.data_ptr() if torch is not None else t.__array_interface__["data"][0]


def test_received_tensors_are_views_of_the_arena(pair, new_id):
    producer, consumer = pair
    id = new_id()
    t = _tensor((16, 64), "float32")
    producer.send(t, id, [[consumer.sidecar_rank]]).result(timeout=30)
    first, second = consumer.recv_sync(id), consumer.recv_sync(id)
    # Zero copy: both recvs view the same arena bytes, not copies.
    assert _address(first) == _address(second)
    first[0, 0] = 1234.0
    assert float(second[0, 0]) == 1234.0
    consumer.mark_done_sync(id)


def test_sender_may_change_its_tensor_once_send_returns(pair, new_id):
    producer, consumer = pair
    id = new_id()
    t = _tensor((8, 64), "float32")
    want = t.copy() if isinstance(t, np.ndarray) else t.clone()
    producer.send(t, id, [[consumer.sidecar_rank]])
    t[:] = 0
    _assert_same(consumer.recv_sync(id), want)
    consumer.mark_done_sync(id)


@pytest.mark.skipif(torch is None or not torch.cuda.is_available(), reason="needs torch with a CUDA GPU")
def test_cuda_tensor_source(pair, new_id):
    producer, consumer = pair
    id = new_id()
    t = _tensor((32, 64), "bfloat16").cuda()
    producer.send(t, id, [[consumer.sidecar_rank]]).result(timeout=30)
    got = consumer.recv_sync(id)
    assert got.device.type == "cpu"
    _assert_same(got, t.cpu())
    consumer.mark_done_sync(id)
    assert producer._gpu_copy, "the daemon's GPU copy was not used (fell back to a host copy)"


_needs_cuda = pytest.mark.skipif(torch is None or not torch.cuda.is_available(), reason="needs torch with a CUDA GPU")


@_needs_cuda
def test_cuda_tensor_large_and_strided(pair, new_id):
    producer, consumer = pair
    id = new_id()
    base = torch.arange(1024 * 4096, dtype=torch.float32, device="cuda").reshape(1024, 4096)
    t = base.t()  # not contiguous: made contiguous on the GPU before the daemon copies it
    producer.send(t, id, [[consumer.sidecar_rank]]).result(timeout=30)
    got = consumer.recv_sync(id)
    assert got.device.type == "cpu" and tuple(got.shape) == (4096, 1024)
    assert torch.equal(got, t.cpu())
    consumer.mark_done_sync(id)
    assert producer._gpu_copy


@_needs_cuda
def test_cuda_send_is_ordered_after_queued_kernels(pair, new_id):
    """The daemon's copy waits for the work queued on the tensor's stream before send(): a kernel
    still running when send() is called decides what is received."""
    producer, consumer = pair
    id = new_id()
    t = torch.zeros(8 * 1024 * 1024, dtype=torch.int32, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the current stream
    t.fill_(7)  # queued behind the sleep: still pending when send() is called
    producer.send(t, id, [[consumer.sidecar_rank]]).result(timeout=30)
    t.fill_(9)  # send() returned: the daemon has the bytes, changing the tensor changes nothing
    got = consumer.recv_sync(id)
    assert int(got.min()) == 7 and int(got.max()) == 7
    consumer.mark_done_sync(id)


@_needs_cuda
def test_cuda_tensor_falls_back_to_a_host_copy_when_the_daemon_has_no_gpu(new_id):
    from conftest import Daemon  # noqa: PLC0415

    d = Daemon("64MiB", extra_env={"CUDA_VISIBLE_DEVICES": ""}, node_id="python-no-gpu")
    try:
        a, b = _ranks(2)
        with Sidecar(_config(a, d.socket)) as producer, Sidecar(_config(b, d.socket)) as consumer:
            for _ in range(2):  # the first finds out, the second goes straight to the host copy
                id = new_id()
                t = torch.arange(4 << 20, dtype=torch.int64, device="cuda")  # 32 MiB: an IPC export, not staged
                producer.send(t, id, [[consumer.sidecar_rank]]).result(timeout=30)
                assert not producer._gpu_copy
                assert torch.equal(consumer.recv_sync(id), t.cpu())
                consumer.mark_done_sync(id)
    finally:
        assert d.stop() == 0, d.log()


# -- mark_done, streams, timeouts ------------------------------------------------------------------

def test_mark_done_rules(pair, new_id):
    producer, consumer = pair
    id = new_id()
    for i in range(3):
        producer.send(i, id, [[consumer.sidecar_rank]], chunk_id=i, num_chunks=3)
    assert [consumer.recv_sync(id, i) for i in range(3)] == [0, 1, 2]
    for i in (2, 0, 1):  # any order
        consumer.mark_done_sync(id, i)
    with pytest.raises(SidecarValueError) as e:
        consumer.mark_done_sync(id, 1)
    assert e.value.code == "already-done"
    with pytest.raises(SidecarValueError):
        consumer.recv_sync(id, 0)
    # The id may be sent again once it was fully marked done.
    producer.send("again", id, [[consumer.sidecar_rank]]).result(timeout=30)
    assert consumer.recv_sync(id) == "again"
    consumer.mark_done_sync(id)


def test_stream_end_and_large_chunk_ids(pair, new_id):
    producer, consumer = pair
    id = new_id()
    producer.send("tail", id, [[consumer.sidecar_rank]], chunk_id=1001, stream=True)
    producer.send("head", id, [[consumer.sidecar_rank]], chunk_id=1000, stream=True)
    producer.close_stream(id, 1002, [[consumer.sidecar_rank]])
    assert consumer.recv_sync(id, 1001) == "tail"
    assert consumer.recv_sync(id, 1000) == "head"
    assert consumer.recv_sync(id, 1002) is None
    consumer.mark_done_sync(id, 1000)
    consumer.mark_done_sync(id, 1001)


def test_recv_timeout(pair, new_id):
    _, consumer = pair
    with pytest.raises(SidecarTimeoutError) as e:
        consumer.recv_sync(new_id("never"), timeout=0.1)
    assert isinstance(e.value, TimeoutError) and e.value.code == "timeout"


# -- asyncio -----------------------------------------------------------------------------------------

def test_asyncio_many_concurrent_recvs(pair, new_id):
    producer, consumer = pair
    n = 300
    ids = [new_id("async") for _ in range(n)]

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        recvs = [asyncio.create_task(consumer.recv(id)) for id in ids]
        await asyncio.sleep(0.05)
        assert not any(r.done() for r in recvs), "a recv finished before anything was sent"
        ticks_before = ticks
        # Sent in reverse order from another thread: each recv completes when its data arrives,
        # not behind the recvs issued before it.
        sender = threading.Thread(target=lambda: [producer.send(i, ids[i], [[consumer.sidecar_rank]])
                                                  for i in reversed(range(n))])
        sender.start()
        got = await asyncio.wait_for(asyncio.gather(*recvs), 60)
        sender.join()
        assert got == list(range(n))
        assert ticks > ticks_before, "the event loop was blocked while recvs waited"
        await asyncio.gather(*(consumer.mark_done(id) for id in ids))
        stop.set()
        await tick_task

    asyncio.run(main())


def test_asyncio_recv_cancelled_by_the_caller(pair, new_id):
    producer, consumer = pair
    id = new_id()

    async def main():
        task = asyncio.create_task(consumer.recv(id))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        producer.send("late", id, [[consumer.sidecar_rank]])
        assert await consumer.recv(id, timeout=30) == "late"
        await consumer.mark_done(id)

    asyncio.run(main())


# -- shutdown ----------------------------------------------------------------------------------------

def test_shutdown_fails_waiting_recvs_and_later_calls(daemon, new_id):
    rank = _ranks(1)[0]
    sc = Sidecar(_config(rank, daemon.socket))
    result = {}

    def waiter():
        try:
            sc.recv_sync(new_id("never"))
        except SidecarError as e:
            result["error"] = e

    t = threading.Thread(target=waiter)
    t.start()
    threading.Event().wait(0.1)
    sc.shutdown_sync()
    t.join(10)
    assert not t.is_alive(), "a recv still waits after shutdown"
    assert result["error"].code == "cancelled"
    sc.shutdown_sync()  # idempotent
    with pytest.raises(SidecarError) as e:
        sc.send("x", new_id(), [[rank + 1]])
    assert e.value.code == "not-registered"
    # The rank is free again.
    Sidecar(_config(rank, daemon.socket)).shutdown_sync()


def test_async_shutdown(daemon):
    async def main():
        sc = Sidecar(_config(_ranks(1)[0], daemon.socket))
        await sc.shutdown()
        await sc.shutdown()

    asyncio.run(main())


def test_views_read_after_shutdown_do_not_crash(daemon):
    # In a child process: a fault would kill it, not the test run.
    code = f"""
import numpy as np
from sidecar import Sidecar, SidecarConfig
cfg = dict(send_tensor_dtype="float32", send_tensor_shape=(-1, 64), socket_path={daemon.socket!r})
a, b = Sidecar(SidecarConfig(sidecar_rank=950, **cfg)), Sidecar(SidecarConfig(sidecar_rank=951, **cfg))
a.send(np.ones((4, 64), np.float32), "after-shutdown", [[951]]).result(timeout=30)
view = b.recv_sync("after-shutdown")
assert float(view.sum()) == 256.0
b.shutdown_sync()
print("read after shutdown:", float(view.sum()))
a.shutdown_sync()
"""
    assert "read after shutdown: 0.0" in _run_child(code)


def _run_child(code: str) -> str:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"exit {out.returncode}:\n{out.stdout}{out.stderr}"
    return out.stdout


def test_last_reference_dropped_on_the_owner_thread(daemon):
    # The Sidecar's last reference is held by a pending recv; when its timeout fires the owner
    # thread drops it, and must not join itself (that aborted the process).
    out = _run_child(f"""
import time
from sidecar import Sidecar, SidecarConfig
cfg = dict(sidecar_rank=960, send_tensor_dtype="uint8", send_tensor_shape=(-1, 64), socket_path={daemon.socket!r})
sc = Sidecar(SidecarConfig(**cfg))
# What an abandoned recv leaves behind, made deterministic with the native call itself: only
# the pending recv holds the Sidecar (its keep-alive) when its 300 ms timeout fires.
sc._backend().recv("never", 0, 300, lambda result, error: None, sc)
del sc
time.sleep(0.6)
deadline = time.monotonic() + 10
while True:  # the rank is unregistered once the helper thread has stopped the old Sidecar
    try:
        Sidecar(SidecarConfig(**cfg)).shutdown_sync()
        break
    except ValueError:
        assert time.monotonic() < deadline, "rank 960 still registered"
        time.sleep(0.05)
print("reregistered")
""")
    assert "reregistered" in out


def test_sidecar_made_before_fork_refuses_calls_in_the_child(pair, new_id):
    import os
    producer, consumer = pair
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            producer.send("x", new_id(), [[consumer.sidecar_rank]])
        except SidecarError as e:
            code = 0 if e.code == "not-registered" and "fork" in str(e) else 2
        except BaseException:  # noqa: BLE001
            code = 3
        producer.shutdown_sync()  # a no-op here
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    # The parent's Sidecar is unaffected.
    id = new_id()
    producer.send("still here", id, [[consumer.sidecar_rank]])
    assert consumer.recv_sync(id) == "still here"
    consumer.mark_done_sync(id)

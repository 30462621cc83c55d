"""The acceptance scenarios (../shared/scenarios/cornserve-test-matrix.md) as functions that run in
rank processes (ranks.py), written against the reference API (send, recv_sync, mark_done_sync,
close_stream). Each function registers its rank, runs both directions (a -> b, then b -> a, with
a phase barrier between them, as the C++ matrix does) and returns a summary.

Tensors are torch tensors, on CUDA when a GPU is there (SIDECAR_TEST_DEVICE=cpu keeps them on the
CPU), or numpy arrays when torch is not used (bfloat16 is then float16: numpy has no bfloat16).
Values are deterministic per (scenario, direction, id, chunk): every member of a sending group
sends the same replica, and receivers rebuild what to expect.
"""

from __future__ import annotations

import os
import queue
import random
import zlib
from typing import Any, List, Sequence

import numpy as np

from sidecar import Sidecar, SidecarConfig
from sidecar import dtypes as _dtypes

torch = _dtypes.torch
RECV_TIMEOUT_S = 120


def device() -> str:
    if torch is not None and os.environ.get("SIDECAR_TEST_DEVICE", "") != "cpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def dtype_name(name: str) -> str:
    return "float16" if torch is None and name == "bfloat16" else name


def make_tensor(shape: Sequence[int], dtype: str, seed: int) -> Any:
    """Small exact values (multiples of 1/4 below 64 in magnitude, exact in every dtype used),
    built with one full-size allocation: a seeded row pattern plus a per-row offset."""
    dtype = dtype_name(dtype)
    shape = tuple(shape)
    rows = shape[0] if shape else 1
    row = shape[1:] if shape else ()
    row_numel = int(np.prod(row)) if row else 1
    pattern = (np.arange(row_numel, dtype=np.int64) * 7 + seed) % 127 - 63
    offsets = np.arange(rows, dtype=np.int64) % 16 - 8
    if torch is not None:
        tdtype = getattr(torch, dtype)
        floating = tdtype.is_floating_point
        p = torch.from_numpy(pattern.astype(np.float32) / 4 if floating else pattern).to(tdtype)
        o = torch.from_numpy(offsets.astype(np.float32) / 4 if floating else offsets).to(tdtype)
        t = p.reshape(1, row_numel) + o.reshape(rows, 1)
        return t.reshape(shape).to(device())
    floating = np.dtype(dtype).kind == "f"
    p = (pattern.astype(np.float32) / 4 if floating else pattern).astype(dtype)
    o = (offsets.astype(np.float32) / 4 if floating else offsets).astype(dtype)
    return (p.reshape(1, row_numel) + o.reshape(rows, 1)).reshape(shape)


def assert_tensor_equal(got: Any, want: Any, where: str) -> None:
    if torch is not None:
        want = want.cpu()
        assert isinstance(got, torch.Tensor), f"{where}: got {type(got).__name__}, not a tensor"
        assert got.device.type == "cpu", f"{where}: received on {got.device}"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert tuple(got.shape) == tuple(want.shape), f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert torch.equal(got, want), f"{where}: values differ"
    else:
        assert isinstance(got, np.ndarray), f"{where}: got {type(got).__name__}, not an array"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        assert np.array_equal(got, want), f"{where}: values differ"


def assert_object_equal(got: Any, want: Any, where: str) -> None:
    assert type(got) is type(want), f"{where}: got {type(got).__name__} {got!r}, want {type(want).__name__}"
    assert got == want, f"{where}: got {got!r}, want {want!r}"


# -- signals between rank processes ---------------------------------------------------------------

_stash: List[tuple] = []


def post(inboxes, rank: int, message: tuple) -> None:
    inboxes[rank].put(message)


def wait(inboxes, rank: int, message: tuple, count: int) -> None:
    """Waits for `count` copies of `message` in this rank's inbox (others are kept for later)."""
    while count > 0:
        if message in _stash:
            _stash.remove(message)
            count -= 1
            continue
        try:
            got = inboxes[rank].get(timeout=RECV_TIMEOUT_S)
        except queue.Empty:
            raise AssertionError(f"rank {rank}: no {message} within {RECV_TIMEOUT_S} s") from None
        _stash.append(got)


def phase_barrier(inboxes, rank: int, everyone: Sequence[int], tag: str) -> None:
    lowest = min(everyone)
    if rank == lowest:
        wait(inboxes, rank, ("arrived", tag), len(everyone) - 1)
        for r in everyone:
            if r != lowest:
                post(inboxes, r, ("proceed", tag))
    else:
        post(inboxes, lowest, ("arrived", tag))
        wait(inboxes, rank, ("proceed", tag), 1)


def release(sc: Sidecar, inboxes, rank: int, group: Sequence[int], id: str, chunk: int) -> None:
    """The receiving group's lowest member marks the chunk done once every member has it."""
    leader = min(group)
    if rank == leader:
        wait(inboxes, rank, ("got", id, chunk), len(group) - 1)
        sc.mark_done_sync(id, chunk)
    else:
        post(inboxes, leader, ("got", id, chunk))


def config(rank: int, group: Sequence[int], socket: str, dtype: str, shape: Sequence[int],
           concurrent: bool = False, recv_dtype: str | None = None) -> SidecarConfig:
    return SidecarConfig(sidecar_rank=rank, group=list(group), send_tensor_dtype=dtype_name(dtype),
                         send_tensor_shape=tuple(shape), recv_tensor_dtype=dtype_name(recv_dtype or dtype),
                         recv_tensor_shape=tuple(shape), concurrent_copy=concurrent, socket_path=socket)


# -- scenarios -----------------------------------------------------------------------------------

def objects(rank: int, socket: str, inboxes, a: List[int], b: List[int], prefix: str, values: List[Any]) -> int:
    group = a if rank in a else b
    checked = 0
    _stash.clear()
    with Sidecar(config(rank, group, socket, "uint8", (-1, 64))) as sc:
        for phase, (src, dst) in enumerate(((a, b), (b, a))):
            futures = []
            for k, value in enumerate(values):
                id = f"{prefix}-{phase}-{k}"
                if rank in src:
                    futures.append(sc.send(value, id, [dst]))
            for k, value in enumerate(values):
                id = f"{prefix}-{phase}-{k}"
                if rank in dst:
                    assert_object_equal(sc.recv_sync(id, timeout=RECV_TIMEOUT_S), value, f"rank {rank} {id}")
                    assert_object_equal(sc.recv_sync(id, timeout=RECV_TIMEOUT_S), value, f"rank {rank} {id} again")
                    checked += 1
                    release(sc, inboxes, rank, dst, id, 0)
            for f in futures:
                f.result(timeout=RECV_TIMEOUT_S)
            phase_barrier(inboxes, rank, a + b, f"{prefix}-{phase}")
    return checked


def _tokens(prefix: str, phase: int, k: int, chunk: int, tokens: Sequence[int]) -> int:
    return random.Random(f"{prefix}/{phase}/{k}/{chunk}").randint(tokens[0], tokens[1])


def _seed(prefix: str, phase: int, k: int, chunk: int) -> int:
    return zlib.crc32(f"{prefix}/{phase}/{k}/{chunk}".encode()) % 1000


def tensors(rank: int, socket: str, inboxes, a: List[int], b: List[int], prefix: str, chunks: int,
            chunk_shape: Sequence[int], dtype: str, tokens: Sequence[int], concurrent: bool, count: int) -> int:
    group = a if rank in a else b
    checked = 0
    _stash.clear()
    with Sidecar(config(rank, group, socket, dtype, (-1, *chunk_shape), concurrent)) as sc:
        for phase, (src, dst) in enumerate(((a, b), (b, a))):
            futures = []
            if rank in src:
                for k in range(count):
                    id = f"{prefix}-{phase}-{k}"
                    for i in range(chunks):
                        n = _tokens(prefix, phase, k, i, tokens)
                        t = make_tensor((n, *chunk_shape), dtype, _seed(prefix, phase, k, i))
                        futures.append(sc.send(t, id, [dst], chunk_id=i, num_chunks=chunks))
            if rank in dst:
                for k in range(count):
                    id = f"{prefix}-{phase}-{k}"
                    for i in range(chunks):
                        n = _tokens(prefix, phase, k, i, tokens)
                        want = make_tensor((n, *chunk_shape), dtype, _seed(prefix, phase, k, i))
                        got = sc.recv_sync(id, i, timeout=RECV_TIMEOUT_S)
                        assert_tensor_equal(got, want, f"rank {rank} {id} chunk {i}")
                        del got  # a view of the arena: not used after mark_done
                        checked += 1
                        release(sc, inboxes, rank, dst, id, i)
                    assert sc.recv_sync(id, chunks + 1, timeout=RECV_TIMEOUT_S) is None, f"{id}: not end of stream"
            for f in futures:
                f.result(timeout=RECV_TIMEOUT_S)
            phase_barrier(inboxes, rank, a + b, f"{prefix}-{phase}")
    return checked


def mixed_streaming(rank: int, socket: str, inboxes, a: List[int], b: List[int], prefix: str, concurrent: bool,
                    close_first: bool = False) -> int:
    chunks, chunk_shape, dtype, tokens, count = 10, (3584,), "bfloat16", (1, 5), 5
    header = {"first_token": 11908, "num_prefill_tokens": 100}
    group = a if rank in a else b
    checked = 0
    _stash.clear()
    with Sidecar(config(rank, group, socket, dtype, (-1, *chunk_shape), concurrent)) as sc:
        for phase, (src, dst) in enumerate(((a, b), (b, a))):
            futures = []
            if rank in src:
                closer = rank == min(src)
                for k in range(count):
                    id = f"{prefix}-{phase}-{k}"
                    if close_first and closer:
                        sc.close_stream(id, chunks, [dst])
                    for i in range(1, chunks):
                        n = _tokens(prefix, phase, k, i, tokens)
                        t = make_tensor((n, *chunk_shape), dtype, _seed(prefix, phase, k, i))
                        futures.append(sc.send(t, id, [dst], chunk_id=i, stream=True))
                    futures.append(sc.send(dict(header, id=k), id, [dst], chunk_id=0, stream=True))
                    if not close_first and closer:
                        sc.close_stream(id, chunks, [dst])
            if rank in dst:
                for k in range(count):
                    id = f"{prefix}-{phase}-{k}"
                    assert_object_equal(sc.recv_sync(id, 0, timeout=RECV_TIMEOUT_S), dict(header, id=k), id)
                    release(sc, inboxes, rank, dst, id, 0)
                    for i in range(1, chunks):
                        n = _tokens(prefix, phase, k, i, tokens)
                        want = make_tensor((n, *chunk_shape), dtype, _seed(prefix, phase, k, i))
                        assert_tensor_equal(sc.recv_sync(id, i, timeout=RECV_TIMEOUT_S), want, f"{id} chunk {i}")
                        checked += 1
                        release(sc, inboxes, rank, dst, id, i)
                    assert sc.recv_sync(id, chunks, timeout=RECV_TIMEOUT_S) is None, f"{id}: not end of stream"
            for f in futures:
                f.result(timeout=RECV_TIMEOUT_S)
            phase_barrier(inboxes, rank, a + b, f"{prefix}-{phase}")
    return checked


def dtype_mismatch(rank: int, socket: str, inboxes, prefix: str, dtype_a: str, dtype_b: str) -> int:
    """Rank 0 (group 1) sends A and declares receive B; rank 2 (group 2) the reverse."""
    mine, theirs = (dtype_a, dtype_b) if rank == 0 else (dtype_b, dtype_a)
    peer = 2 if rank == 0 else 0
    _stash.clear()
    with Sidecar(config(rank, [rank], socket, mine, (-1, 10, 10), recv_dtype=theirs)) as sc:
        for phase, (src, sent_dtype) in enumerate(((0, dtype_a), (2, dtype_b))):
            id = f"{prefix}-{phase}"
            t = make_tensor((10, 10), sent_dtype, phase + 1)
            if rank == src:
                sc.send(t, id, [[peer]]).result(timeout=RECV_TIMEOUT_S)
            else:
                assert_tensor_equal(sc.recv_sync(id, timeout=RECV_TIMEOUT_S), t, f"rank {rank} {id}")
                sc.mark_done_sync(id)
            phase_barrier(inboxes, rank, [0, 2], id)
    return 1

"""Sidecar: a rank's client, with the API of Cornserve's ``cornserve.sidecar.api.Sidecar``.

Differences from the reference, all in the caller's favour:
- errors reach the caller: bad arguments raise at once; a send returns a future (the reference
  returns None) that fails when the daemon refuses the chunk, and an unobserved failure is
  raised by the next call on that id;
- CPU tensors and numpy arrays can be sent; received tensors keep the sent dtype and shape;
- CUDA tensors are copied off the GPU by the daemon (CUDA IPC, on its own streams), not by torch
  in the caller's process;
- recv and recv_sync take an optional ``timeout`` in seconds.

Threads: one owner thread per Sidecar runs libsidecar (see owner_thread.h); every method may be
called from any thread and from asyncio code, and any number of recvs may wait at once.
max_workers is accepted for compatibility and not needed.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import mock, objects, tensors
from .config import SidecarConfig

log = logging.getLogger("sidecar")

_UINT32_MAX = 2**32 - 1


class SendFuture(concurrent.futures.Future):
    """The outcome of a send: done when the daemon has the chunk; its exception when refused.
    A failure nobody looked at (result() / exception()) is raised by the next call on its id."""

    def __init__(self) -> None:
        super().__init__()
        self.observed = False

    def result(self, timeout: Optional[float] = None) -> Any:
        self.observed = True
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self.observed = True
        return super().exception(timeout)


def _done_future() -> SendFuture:
    future = SendFuture()
    future.set_result(None)
    return future


def _check_id(id: Any) -> str:
    if not isinstance(id, str) or not id:
        raise ValueError(f"id must be a non-empty str (e.g. uuid4().hex), got {id!r}")
    return id


def _check_index(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, got {value!r}")
    if value < minimum or value > _UINT32_MAX:
        raise ValueError(f"{what} must be in [{minimum}, {_UINT32_MAX}], got {value}")
    return value


def _timeout_ms(timeout: Optional[float]) -> int:
    if timeout is None:
        return 0
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds (or None: no limit), got {timeout}")
    return max(1, min(_UINT32_MAX, int(timeout * 1000)))


def _from_native(raw: Tuple) -> Any:
    kind = raw[0]
    if kind == "tensor":
        return tensors.wrap_received(raw[1], tensors.view_buffer(raw[1], raw[2], raw[3]))
    if kind == "object":
        return objects.decode(raw[1], raw[2])
    return None


def _settle_concurrent(future: concurrent.futures.Future, result: Any, error: Optional[BaseException]) -> None:
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _asyncio_callback(loop: asyncio.AbstractEventLoop, future: asyncio.Future):
    """A native completion callback that settles `future` on its loop's thread."""

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if future.done():
            return  # cancelled by the caller
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def done(result: Any, error: Optional[BaseException]) -> None:
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    return done


_live: "weakref.WeakSet[Sidecar]" = weakref.WeakSet()
_left_behind_by_fork: list = []


def _after_fork_in_child() -> None:
    # The owner threads did not survive fork(): their Sidecars are unusable here (and their
    # native halves must never be destroyed, which would join a thread that does not exist).
    for sidecar in list(_live):
        _left_behind_by_fork.append(sidecar._native)
        sidecar._native = None
        sidecar._forked = True
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _shutdown_all() -> None:
    # The owner threads take the GIL for their callbacks: end them before the interpreter does.
    for sidecar in list(_live):
        try:
            sidecar.shutdown_sync()
        except Exception:  # noqa: BLE001 (exiting)
            pass


class Sidecar:
    """A rank registered on its node's sidecard (or, in mock mode, files; see sidecar.mock)."""

    def __init__(self, config: SidecarConfig):
        if not isinstance(config, SidecarConfig):
            raise ValueError(f"Sidecar needs a SidecarConfig, got {type(config).__name__}")
        self.config = config
        self.sidecar_rank = config.sidecar_rank
        self.group = list(config.group)
        self._failed: Dict[str, Tuple[SendFuture, BaseException]] = {}
        self._lock = threading.Lock()
        self._native = None
        self._forked = False
        self._gpu_copy = True  # CUDA tensors through the daemon's GPU copy until that proves impossible
        self._mock = mock.MockBackend() if mock.enabled() else None
        if self._mock is not None:
            return
        from . import _native  # noqa: PLC0415 (mock mode needs no extension)

        send_code, send_row = config.send_hint()
        recv_code, recv_row = config.recv_hint()
        self._native = _native.NativeSidecar(
            config.sidecar_rank, self.group, send_code, send_row, recv_code, recv_row,
            bool(config.concurrent_copy), config.socket_path or "")
        _live.add(self)

    # -- argument checks -------------------------------------------------------------------------

    def _destinations(self, dst_sidecar_ranks: Any) -> List[List[int]]:
        if not isinstance(dst_sidecar_ranks, (list, tuple)) or not dst_sidecar_ranks:
            raise ValueError(f"dst_sidecar_ranks must be a non-empty list of groups such as [[2, 3]], "
                             f"got {dst_sidecar_ranks!r}")
        groups = []
        for group in dst_sidecar_ranks:
            if not isinstance(group, (list, tuple)) or not group:
                raise ValueError(f"each destination must be a non-empty list of ranks such as [2, 3], got {group!r}")
            ranks = []
            for rank in group:
                if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or rank > 2**31 - 1:
                    raise ValueError(f"destination ranks must be ints >= 0, got {rank!r}")
                if rank == self.sidecar_rank:
                    raise ValueError(f"rank {rank} cannot send to itself (dst_sidecar_ranks={dst_sidecar_ranks!r})")
                ranks.append(rank)
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"destination group {list(group)} lists a rank twice")
            groups.append(sorted(ranks))
        return groups

    def _raise_failed(self, id: str) -> None:
        """Raises the failure of an earlier send of `id` that nobody observed."""
        with self._lock:
            entry = self._failed.pop(id, None)
        if entry is not None and not entry[0].observed:
            raise entry[1]

    def _record_failure(self, id: str, future: SendFuture, error: BaseException) -> None:
        log.warning("sidecar: send of %r failed: %s", id, error)
        with self._lock:
            self._failed[id] = (future, error)

    def _backend(self):
        """The native Sidecar; SidecarError when it cannot be used in this process."""
        if self._native is None:
            from .errors import SidecarError  # noqa: PLC0415

            raise SidecarError("not-registered", "this Sidecar was created before fork(); create a new one in this "
                               "process")
        return self._native

    # -- the reference API -----------------------------------------------------------------------

    def send(self, data: Any, id: str, dst_sidecar_ranks: List[List[int]], chunk_id: int = 0,
             num_chunks: int = 1, stream: bool = False) -> SendFuture:
        """Sends `data` (str, bytes, int, float, bool, dict, list, a torch tensor or a numpy array)
        as chunk `chunk_id` of `id` to every group in `dst_sidecar_ranks`. With stream=True the
        number of chunks is not known yet (close_stream() gives it). Returns once a tensor is
        copied into the arena (the caller may then change it); the future is done when the
        daemon has the chunk."""
        id = _check_id(id)
        groups = self._destinations(dst_sidecar_ranks)
        chunk_id = _check_index(chunk_id, "chunk_id", 0)
        if stream:
            wire_chunks = 0
        else:
            num_chunks = _check_index(num_chunks, "num_chunks", 1)
            if chunk_id >= num_chunks:
                raise ValueError(f"chunk_id {chunk_id} is not below num_chunks {num_chunks} "
                                 "(use stream=True when the count is not known yet)")
            wire_chunks = num_chunks
        is_tensor = tensors.is_tensor(data)
        if not is_tensor and not objects.is_object(data):
            objects.encode(data)  # raises the ValueError that says what can be sent
        self._raise_failed(id)
        if self._mock is not None:
            self._mock.send(data, id, chunk_id)
            return _done_future()

        if is_tensor and self._gpu_copy and tensors.is_cuda(data):
            acked = self._send_cuda(data, id, groups, chunk_id, wire_chunks)
            if acked is not None:
                return acked

        handed = concurrent.futures.Future()
        acked = SendFuture()

        def on_handed(result: Any, error: Optional[BaseException]) -> None:
            _settle_concurrent(handed, result, error)

        def on_acked(result: Any, error: Optional[BaseException]) -> None:
            if error is not None:
                self._record_failure(id, acked, error)
            _settle_concurrent(acked, result, error)

        if is_tensor:
            host = tensors.describe(data)
            self._backend().send_tensor(id, host.dtype, host.shape, host.strides, host.address, groups, chunk_id,
                                     wire_chunks, on_handed, on_acked)
            handed.result()  # `host` (and the memory it points at) lives until the copy is over
            del host
        else:
            tag, raw = objects.encode(data)
            self._backend().send_object(id, tag, raw, groups, chunk_id, wire_chunks, on_handed, on_acked)
            handed.result()
        return acked

    def _send_cuda(self, data: Any, id: str, groups: List[List[int]], chunk_id: int,
                   wire_chunks: int) -> Optional[SendFuture]:
        """A CUDA tensor through the daemon's GPU copy: libsidecar passes an IPC handle and an
        event recorded on the tensor's current stream, and the daemon copies it off the GPU on its
        own streams. Waits until the daemon has the chunk, so that the caller may change the tensor
        when send() returns, as with CPU tensors. None (and no more GPU sends by this Sidecar) when
        no GPU copy is possible here (libsidecar or the daemon without CUDA, memory without IPC
        handles): the caller falls back to a host copy."""
        cuda = tensors.describe_cuda(data)
        issued = concurrent.futures.Future()
        stored = concurrent.futures.Future()
        self._backend().send_device_tensor(id, cuda.dtype, cuda.shape, cuda.strides, cuda.address, cuda.device,
                                           cuda.stream, groups, chunk_id, wire_chunks,
                                           lambda r, e: _settle_concurrent(issued, r, e),
                                           lambda r, e: _settle_concurrent(stored, r, e))
        error = issued.exception()
        if error is None:
            error = stored.exception()
        del cuda  # the tensor may be freed or changed now: the daemon has its bytes
        acked = SendFuture()
        if error is None:
            acked.set_result(None)
            return acked
        if getattr(error, "code", None) == "gpu-unavailable":
            self._gpu_copy = False
            log.warning("sidecar: the daemon cannot copy from the GPU (%s); CUDA tensors go through a host "
                        "copy from now on", error)
            return None
        if not issued.exception():
            self._record_failure(id, acked, error)
            acked.set_exception(error)
            return acked
        raise error

    def close_stream(self, id: str, num_chunks: int, dst_sidecar_ranks: List[List[int]]) -> None:
        """Fixes the number of chunks of a stream sent with stream=True (any time: before,
        between or after its chunks)."""
        id = _check_id(id)
        groups = self._destinations(dst_sidecar_ranks)
        num_chunks = _check_index(num_chunks, "num_chunks", 1)
        self._raise_failed(id)
        if self._mock is not None:
            return
        future = concurrent.futures.Future()
        self._backend().close_stream(id, num_chunks, groups, lambda r, e: _settle_concurrent(future, r, e))
        future.result()

    def _recv_args(self, id: Any, chunk_id: Any, timeout: Optional[float]) -> Tuple[str, int, int]:
        id = _check_id(id)
        chunk_id = _check_index(chunk_id, "chunk_id", 0)
        timeout_ms = _timeout_ms(timeout)
        self._raise_failed(id)
        return id, chunk_id, timeout_ms

    def recv_sync(self, id: str, chunk_id: int = 0, timeout: Optional[float] = None) -> Any:
        """Waits for chunk `chunk_id` of `id` and returns it: the object, a tensor viewing the
        node's arena (valid until mark_done of the chunk and shutdown), or None past the end of a
        stream. May be called again (by every member of the receiving group) until mark_done.
        `timeout` (ours): seconds, then SidecarTimeoutError."""
        id, chunk_id, timeout_ms = self._recv_args(id, chunk_id, timeout)
        if self._mock is not None:
            return self._mock.recv(id, chunk_id)
        future = concurrent.futures.Future()
        self._backend().recv(id, chunk_id, timeout_ms, lambda r, e: _settle_concurrent(future, r, e), self)
        return _from_native(future.result())

    async def recv(self, id: str, chunk_id: int = 0, timeout: Optional[float] = None) -> Any:
        """recv_sync for asyncio: many may wait at once without blocking the loop."""
        id, chunk_id, timeout_ms = self._recv_args(id, chunk_id, timeout)
        if self._mock is not None:
            return self._mock.recv(id, chunk_id)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._backend().recv(id, chunk_id, timeout_ms, _asyncio_callback(loop, future), self)
        return _from_native(await future)

    def mark_done_sync(self, id: str, chunk_id: int = 0) -> None:
        """Releases chunk `chunk_id` of `id` for this rank's group: its memory is freed once every
        receiving group is done. A second call is an error (SidecarValueError, already-done)."""
        id = _check_id(id)
        chunk_id = _check_index(chunk_id, "chunk_id", 0)
        self._raise_failed(id)
        if self._mock is not None:
            return
        future = concurrent.futures.Future()
        self._backend().mark_done(id, chunk_id, lambda r, e: _settle_concurrent(future, r, e))
        future.result()

    async def mark_done(self, id: str, chunk_id: int = 0) -> None:
        id = _check_id(id)
        chunk_id = _check_index(chunk_id, "chunk_id", 0)
        self._raise_failed(id)
        if self._mock is not None:
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._backend().mark_done(id, chunk_id, _asyncio_callback(loop, future))
        await future

    def shutdown_sync(self) -> None:
        """Unregisters the rank. Waiting recvs fail (cancelled); received tensors become invalid.
        Idempotent; later calls raise SidecarError (not-registered). Does nothing in a child
        process forked after this Sidecar was made (the parent's registration stays)."""
        if self._native is not None:
            self._native.shutdown()
            _live.discard(self)

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown_sync)

    def __enter__(self) -> "Sidecar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown_sync()

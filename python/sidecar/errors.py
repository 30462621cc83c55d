"""Errors of the sidecar package.

Every failure the daemon or libsidecar reports is a :class:`SidecarError` with a ``code`` (the
libsidecar error code, e.g. ``"chunk-out-of-range"``) and a message saying what to do. Codes that
mean "you passed something wrong" are also ``ValueError``; a recv deadline is also
``TimeoutError``; an unreachable daemon is also ``ConnectionError``. So code written against the
reference client, which catches ``ValueError``, keeps working.
"""

from __future__ import annotations


class SidecarError(Exception):
    """A failure reported by the daemon or the client library."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class SidecarValueError(SidecarError, ValueError):
    """Bad arguments: the daemon refused the request (the message says which and why)."""


class SidecarTimeoutError(SidecarError, TimeoutError):
    """A recv's deadline passed before its chunk arrived."""


class SidecarConnectionError(SidecarError, ConnectionError):
    """The daemon (or, across nodes, a peer daemon) could not be reached, or the connection broke."""


_VALUE_CODES = {
    "invalid-argument", "chunk-out-of-range", "num-chunks-mismatch", "already-sent", "already-done",
    "not-receiver", "not-available", "too-large", "already-registered",
}
_CONNECTION_CODES = {"unavailable", "disconnected", "protocol-mismatch", "peer-unreachable", "peer-lost"}


def from_native(code: str, message: str) -> SidecarError:
    """The exception for a libsidecar error (called by sidecar._native)."""
    if code in _VALUE_CODES:
        return SidecarValueError(code, message)
    if code == "timeout":
        return SidecarTimeoutError(code, message)
    if code in _CONNECTION_CODES:
        return SidecarConnectionError(code, message)
    return SidecarError(code, message)

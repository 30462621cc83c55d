"""Mock mode: the reference's file-backed stand-in for a daemon, for testing executors alone.

On when ``CORNSERVE_MOCK_SIDECAR`` (or our ``SIDECAR_MOCK``) is ``1`` or ``true`` (any case).
``CORNSERVE_MOCK_SIDECAR_MAPPING`` (or ``SIDECAR_MOCK_MAPPING``) is JSON mapping ``"{id}-{chunk_id}"``
to a file path; invalid JSON is logged and read as an empty map. Both are read when a Sidecar is
made. send() writes a tensor with ``torch.save`` (numpy arrays too when torch is there, else
``numpy.save``) and anything else as JSON text; recv() reads it back: ``.pt``/``.pth`` files with
``torch.load(map_location="cpu")``, ``.npy`` with numpy, others as JSON. Ours: bytes (which JSON
cannot hold; the reference fails on them) go to and come from ``.bin`` files as they are. A key missing from the
map raises ValueError; a missing file reads as None. The other calls do nothing.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict

import numpy as np

from . import dtypes, tensors

log = logging.getLogger("sidecar")

_FLAGS = ("CORNSERVE_MOCK_SIDECAR", "SIDECAR_MOCK")
_MAPPINGS = ("CORNSERVE_MOCK_SIDECAR_MAPPING", "SIDECAR_MOCK_MAPPING")


def enabled() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true") for name in _FLAGS)


def mapping() -> Dict[str, str]:
    for name in _MAPPINGS:
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            log.error("%s is not valid JSON (%s); mock mode uses an empty mapping", name, e)
            return {}
        if not isinstance(value, dict):
            log.error("%s must be a JSON object of \"{id}-{chunk_id}\": path; mock mode uses an empty mapping",
                      name)
            return {}
        return {str(k): str(v) for k, v in value.items()}
    return {}


class MockBackend:
    """What Sidecar does in mock mode: files instead of a daemon."""

    def __init__(self) -> None:
        self.mapping = mapping()

    def _path(self, id: str, chunk_id: int) -> str:
        key = f"{id}-{chunk_id}"
        if key not in self.mapping:
            raise ValueError(f"mock sidecar: {key!r} is not in the mapping "
                             f"(set CORNSERVE_MOCK_SIDECAR_MAPPING or SIDECAR_MOCK_MAPPING)")
        return self.mapping[key]

    def send(self, data: Any, id: str, chunk_id: int) -> None:
        path = self._path(id, chunk_id)
        torch = dtypes.torch
        if torch is not None and isinstance(data, (torch.Tensor, np.ndarray)):
            torch.save(torch.as_tensor(data).detach().cpu(), path)
        elif isinstance(data, np.ndarray):
            with open(path, "wb") as f:
                np.save(f, data)
        elif isinstance(data, bytes):
            if not path.endswith(".bin"):
                raise ValueError(f"mock sidecar: bytes are kept in .bin files (JSON has no bytes); map {id}-{chunk_id} "
                                 f"to a .bin path instead of {path}")
            with open(path, "wb") as f:
                f.write(data)
        else:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f)

    def recv(self, id: str, chunk_id: int) -> Any:
        path = self._path(id, chunk_id)
        if not os.path.exists(path):
            return None
        if path.endswith((".pt", ".pth")):
            torch = dtypes.torch
            if torch is None:
                raise ValueError(f"mock sidecar: {path} is a torch file and torch is not available")
            return torch.load(path, map_location="cpu")
        if path.endswith(".bin"):
            with open(path, "rb") as f:
                return f.read()
        if path.endswith(".npy"):
            return tensors.wrap_received(-1, np.load(path))
        with open(path, encoding="utf-8") as f:
            return json.load(f)

"""sidecar: moves tensors and small objects between executors through the node's sidecard.

A drop-in for Cornserve's sidecar client: replace
``from cornserve.sidecar.api import Sidecar`` and ``from cornserve.sidecar.schema import
SidecarConfig`` with ``from sidecar import Sidecar, SidecarConfig``.
"""

from .api import SendFuture, Sidecar
from .config import SidecarConfig
from .errors import SidecarConnectionError, SidecarError, SidecarTimeoutError, SidecarValueError

__all__ = [
    "Sidecar", "SidecarConfig", "SendFuture", "SidecarError", "SidecarValueError", "SidecarTimeoutError",
    "SidecarConnectionError",
]

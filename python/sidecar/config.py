"""SidecarConfig: a rank's registration, with the reference client's fields and validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

from . import dtypes

Shape = Union[int, Sequence[int]]


def _row_shape(shape: Shape, what: str) -> List[int]:
    """The memory hint's row of a shape given as (-1, *row) or an int (a row of that many
    elements): one unit of allocation is prod(row) elements."""
    if isinstance(shape, bool):
        raise ValueError(f"{what}: expected a tuple such as (-1, 4096) or an int, got {shape!r}")
    if isinstance(shape, int):
        dims = [shape]
    else:
        try:
            dims = [int(d) for d in shape]
        except (TypeError, ValueError):
            raise ValueError(f"{what}: expected a tuple such as (-1, 4096) or an int, got {shape!r}") from None
        if not dims:
            raise ValueError(f"{what}: the shape is empty; use e.g. (-1, 4096)")
        dims = dims[1:]  # the first dimension is the number of rows, known per tensor
    if any(d <= 0 for d in dims):
        raise ValueError(f"{what}: row dimensions must be > 0, got {shape!r}")
    return dims or [1]


@dataclass
class SidecarConfig:
    """A rank's registration on its node's sidecard (the reference's fields, in its order).

    `group` defaults to ``[sidecar_rank]`` and is kept sorted. The memory hint (dtype and shape,
    e.g. ``torch.bfloat16`` and ``(-1, 4096)``) is the unit the daemon allocates in; each side falls
    back to the other's when missing. Dtypes: a torch.dtype, a numpy dtype or a name.
    `socket_path` (ours): the daemon's unix socket; default ``$SIDECAR_SOCKET`` or
    ``/run/sidecar/sidecar.sock``.
    """

    sidecar_rank: int
    group: Optional[List[int]] = None
    max_workers: int = 8
    send_tensor_dtype: Any = None
    send_tensor_shape: Optional[Shape] = None
    recv_tensor_dtype: Any = None
    recv_tensor_shape: Optional[Shape] = None
    concurrent_copy: bool = False
    socket_path: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.sidecar_rank, bool) or not isinstance(self.sidecar_rank, int):
            raise ValueError(f"sidecar_rank must be an int, got {self.sidecar_rank!r}")
        if self.sidecar_rank < 0:
            raise ValueError(f"sidecar_rank must be >= 0, got {self.sidecar_rank}")
        if self.group is None:
            self.group = [self.sidecar_rank]
        try:
            self.group = sorted(int(r) for r in self.group)
        except (TypeError, ValueError):
            raise ValueError(f"group must be a list of ranks, got {self.group!r}") from None
        if len(set(self.group)) != len(self.group):
            raise ValueError(f"group {self.group} lists a rank twice")
        if self.sidecar_rank not in self.group:
            raise ValueError(f"sidecar_rank {self.sidecar_rank} is not in its group {self.group}")
        if any(r < 0 for r in self.group):
            raise ValueError(f"group ranks must be >= 0, got {self.group}")
        if self.max_workers <= 0:
            raise ValueError(f"max_workers must be > 0, got {self.max_workers}")
        send_given = self.send_tensor_shape is not None
        recv_given = self.recv_tensor_shape is not None
        if not send_given and not recv_given:
            raise ValueError("give send_tensor_shape or recv_tensor_shape (with its dtype), e.g. "
                             "send_tensor_shape=(-1, 4096), send_tensor_dtype=torch.bfloat16")
        for side, shape, dtype in (("send", self.send_tensor_shape, self.send_tensor_dtype),
                                   ("recv", self.recv_tensor_shape, self.recv_tensor_dtype)):
            if shape is not None and dtype is None:
                raise ValueError(f"{side}_tensor_shape is given without {side}_tensor_dtype")
            if dtype is not None and shape is None:
                raise ValueError(f"{side}_tensor_dtype is given without {side}_tensor_shape")
        # Checked here, so that a bad hint fails when the config is made.
        self.send_hint()
        self.recv_hint()

    def send_hint(self) -> Tuple[int, List[int]]:
        """(dtype code, row shape) of the send hint, the recv hint's when there is none."""
        if self.send_tensor_shape is None:
            return self.recv_hint()
        return (dtypes.code_of(self.send_tensor_dtype, "send_tensor_dtype"),
                _row_shape(self.send_tensor_shape, "send_tensor_shape"))

    def recv_hint(self) -> Tuple[int, List[int]]:
        if self.recv_tensor_shape is None:
            return self.send_hint()
        return (dtypes.code_of(self.recv_tensor_dtype, "recv_tensor_dtype"),
                _row_shape(self.recv_tensor_shape, "recv_tensor_shape"))

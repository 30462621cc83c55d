"""Tensors to send (torch or numpy) described for libsidecar, and received arena views wrapped.

Send: a CPU tensor is described by its address, shape and strides and copied into the arena once
by the owner thread (strided tensors included, without a temporary). The caller's send() waits
until that copy is over, so the tensor may change as soon as send() returns.

Receive: a zero-copy view of the node's arena: a torch tensor (over the numpy array, through
torch.from_numpy) or a numpy array. Valid until mark_done() of that chunk by this rank's group,
and until shutdown(); reading it later reads memory that was handed to other data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

import numpy as np

from . import dtypes

torch = dtypes.torch


@dataclass
class HostTensor:
    """What libsidecar needs to copy a CPU tensor: code, shape, strides (elements), address.
    `owner` keeps the memory alive until the copy is over."""

    dtype: int
    shape: List[int]
    strides: List[int]
    address: int
    owner: Any


def is_tensor(data: Any) -> bool:
    return isinstance(data, np.ndarray) or (torch is not None and isinstance(data, torch.Tensor))


@dataclass
class CudaTensor:
    """What libsidecar needs to let the daemon copy a CUDA tensor off the GPU: code, shape,
    strides (elements, contiguous), device pointer, device index and the cudaStream_t (as an int)
    whose queued work must finish first. `owner` keeps the memory alive until the daemon copied it."""

    dtype: int
    shape: List[int]
    strides: List[int]
    address: int
    device: int
    stream: int
    owner: Any


def is_cuda(data: Any) -> bool:
    return torch is not None and isinstance(data, torch.Tensor) and data.device.type == "cuda"


def describe_cuda(data: Any) -> CudaTensor:
    """The CudaTensor of a CUDA torch tensor (made contiguous on its device first, on the current
    stream); ValueError for unsupported dtypes."""
    if data.dtype not in dtypes._TORCH_CODES:
        raise ValueError(f"tensors of dtype {data.dtype} cannot be sent; use one of {', '.join(dtypes.NAMES)}")
    data = data.detach()
    if data.is_conj() or data.is_neg():
        data = data.resolve_conj().resolve_neg()
    data = data.contiguous()
    stream = torch.cuda.current_stream(data.device).cuda_stream
    return CudaTensor(dtypes._TORCH_CODES[data.dtype], list(data.shape), list(data.stride()), data.data_ptr(),
                      data.device.index, stream, data)


def device_tensor_to_host(tensor: Any) -> Any:
    """A device tensor's data on the host: one device-to-host copy by torch. The fallback when the
    daemon (or libsidecar) cannot copy from the GPU itself, and the path for non-CUDA devices."""
    return tensor.detach().to("cpu")


def describe(data: Any) -> HostTensor:
    """The HostTensor of a torch tensor or numpy array; ValueError for unsupported dtypes."""
    if torch is not None and isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            data = device_tensor_to_host(data)
        if data.dtype not in dtypes._TORCH_CODES:
            raise ValueError(f"tensors of dtype {data.dtype} cannot be sent; use one of {', '.join(dtypes.NAMES)}")
        data = data.detach()
        if data.is_conj() or data.is_neg():
            data = data.resolve_conj().resolve_neg()
        return HostTensor(dtypes._TORCH_CODES[data.dtype], list(data.shape), list(data.stride()),
                          data.data_ptr(), data)
    code = dtypes.numpy_code(data)
    itemsize = data.dtype.itemsize
    if any(s % itemsize for s in data.strides):
        data = np.ascontiguousarray(data)
    return HostTensor(code, list(data.shape), [s // itemsize for s in data.strides],
                      data.__array_interface__["data"][0], data)


_NUMPY_VIEW = ("?", "u1", "i1", "i2", "i4", "i8", "f2", "u2", "f4", "f8")  # bfloat16: its raw bits


def view_buffer(code: int, shape: tuple, buffer: Any) -> np.ndarray:
    """A zero-copy numpy view of a received chunk's arena bytes (sidecar._native.ArenaBuffer);
    the array keeps the buffer, and so the Sidecar, alive."""
    dtype = np.dtype(_NUMPY_VIEW[code])
    if len(buffer) == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def wrap_received(code: int, array: np.ndarray) -> Any:
    """The user's view of a received tensor: torch when torch is used, else numpy (bfloat16 as
    uint16 raw bits)."""
    if torch is None:
        return array
    if code == dtypes.BFLOAT16:
        # torch.from_numpy knows int16 but not uint16 (torch 1.13); both views are zero-copy.
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)

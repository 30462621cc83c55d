"""Element types: the names libsidecar knows, and torch / numpy dtypes to and from them.

torch is optional: without it (or with ``SIDECAR_NO_TORCH=1``) the package works with numpy
only, and bfloat16 data is received as ``numpy.uint16`` arrays of the raw bits (numpy has no
bfloat16). Received bfloat16 is ``torch.bfloat16`` whenever torch is used.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

# libsidecar's Dtype enum (include/sidecar/sidecar.h), in its order.
NAMES = ("bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64")
CODES = {name: code for code, name in enumerate(NAMES)}
BFLOAT16 = CODES["bfloat16"]
ITEM_BYTES = (1, 1, 1, 2, 4, 8, 2, 2, 4, 8)

_ALIASES = {
    "half": "float16", "float": "float32", "double": "float64", "long": "int64", "int": "int32",
    "short": "int16", "bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64",
}

_NUMPY_BY_CODE = ("?", "u1", "i1", "i2", "i4", "i8", "f2", "u2", "f4", "f8")
_CODE_BY_NUMPY = {np.dtype(c).str: code for code, c in enumerate(_NUMPY_BY_CODE) if code != BFLOAT16}


def _load_torch() -> Optional[Any]:
    if os.environ.get("SIDECAR_NO_TORCH", "").lower() in ("1", "true", "yes"):
        return None
    try:
        import torch  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    return torch


torch = _load_torch()


def torch_dtypes() -> dict:
    """torch.dtype -> code (empty without torch)."""
    if torch is None:
        return {}
    return {getattr(torch, name): code for code, name in enumerate(NAMES)}


_TORCH_CODES = torch_dtypes()


def code_of(dtype: Any, what: str = "dtype") -> int:
    """The libsidecar code of a torch.dtype, a numpy dtype (or type) or a name; ValueError else."""
    if torch is not None and isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_CODES:
            raise ValueError(f"{what}: {dtype} is not supported; use one of {', '.join(NAMES)}")
        return _TORCH_CODES[dtype]
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.lower().removeprefix("torch."), dtype.lower().removeprefix("torch."))
        if name in CODES:
            return CODES[name]
    try:
        npd = np.dtype(dtype)
    except TypeError:
        npd = None
    if npd is not None and npd.isnative and npd.str in _CODE_BY_NUMPY:
        return _CODE_BY_NUMPY[npd.str]
    raise ValueError(f"{what}: {dtype!r} is not a supported dtype; use a torch.dtype, a numpy dtype or "
                     f"one of {', '.join(NAMES)}")


def numpy_code(array: np.ndarray) -> int:
    """The code of a numpy array's dtype; ValueError for other dtypes (or a non-native byte order)."""
    code = _CODE_BY_NUMPY.get(array.dtype.str)
    if code is None:
        raise ValueError(f"numpy arrays of dtype {array.dtype} cannot be sent; use one of "
                         f"{', '.join(n for n in NAMES if n != 'bfloat16')} (bfloat16 needs torch)")
    return code

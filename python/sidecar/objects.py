"""Small objects: Python values carried in a sidecar::Object with a type tag.

Round trips are exact: an int comes back an int (any size), a bool a bool, bytes as bytes.

==== ======= =================================================
tag  type    bytes on the wire
==== ======= =================================================
1    str     UTF-8
2    bytes   as is
3    int     decimal ASCII (arbitrary precision)
4    float   ``repr`` (exact: ``float(repr(x)) == x``, NaN and infinities included)
5    bool    ``1`` or ``0``
6    dict    JSON (string keys; values str, int, float, bool, None, list, dict)
7    list    JSON, as for dict
==== ======= =================================================

C++ executors that exchange objects with Python use these tags.
"""

from __future__ import annotations

import json
from typing import Any, Tuple

TAG_STR, TAG_BYTES, TAG_INT, TAG_FLOAT, TAG_BOOL, TAG_DICT, TAG_LIST = 1, 2, 3, 4, 5, 6, 7


def _check_json(value: Any, path: str) -> None:
    """ValueError unless `value` survives a JSON round trip unchanged (types included)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: dict keys must be str to be sent, got {type(key).__name__} {key!r}")
            _check_json(item, f"{path}[{key!r}]")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
        return
    raise ValueError(f"{path}: {type(value).__name__} cannot be sent inside a dict or list; use str, int, "
                     "float, bool, None, list or dict")


def is_object(data: Any) -> bool:
    return isinstance(data, (str, bytes, int, float, dict, list))  # bool is an int


def encode(data: Any) -> Tuple[int, bytes]:
    """(tag, bytes) of a supported object; ValueError for anything else."""
    if isinstance(data, bool):
        return TAG_BOOL, b"1" if data else b"0"
    if isinstance(data, int):
        return TAG_INT, str(data).encode("ascii")
    if isinstance(data, float):
        return TAG_FLOAT, repr(data).encode("ascii")
    if isinstance(data, str):
        return TAG_STR, data.encode("utf-8")
    if isinstance(data, bytes):
        return TAG_BYTES, data
    if isinstance(data, (dict, list)):
        _check_json(data, "data")
        return (TAG_DICT if isinstance(data, dict) else TAG_LIST), json.dumps(data).encode("utf-8")
    raise ValueError(f"unsupported data type {type(data).__name__}: send str, bytes, int, float, bool, dict, "
                     "list, a torch tensor or a numpy array")


def decode(tag: int, raw: bytes) -> Any:
    """The object that encode() turned into (tag, raw); ValueError for an unknown tag."""
    if tag == TAG_STR:
        return raw.decode("utf-8")
    if tag == TAG_BYTES:
        return bytes(raw)
    if tag == TAG_INT:
        return int(raw)
    if tag == TAG_FLOAT:
        return float(raw)
    if tag == TAG_BOOL:
        return raw == b"1"
    if tag in (TAG_DICT, TAG_LIST):
        return json.loads(raw)
    raise ValueError(f"received an object with type tag {tag}, which this package does not know "
                     "(sent by another client?); tags 1-7 are str, bytes, int, float, bool, dict, list")


__all__ = ["encode", "decode", "is_object"]

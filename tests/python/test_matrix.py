"""The same-node acceptance matrix (../shared/scenarios/cornserve-test-matrix.md) against a real
sidecard, each rank its own process (ranks.py), both directions per scenario."""

from __future__ import annotations

import uuid

import pytest


def _prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _run(pool, name, ranks, **kwargs):
    prefix = _prefix(kwargs.pop("label", name))
    return pool.run({r: (name, dict(kwargs, prefix=prefix)) for r in ranks})


@pytest.mark.parametrize("a,b,values", [
    ([0], [2], ["string", b"bytes", 5, 10.6, False]),
    ([0, 1], [2, 3], ["another string", b"different bytes", 100, 5 / 3, True]),
], ids=["0to2", "01to23"])
def test_objects(rank_pool, a, b, values):
    out = _run(rank_pool, "objects", a + b, a=a, b=b, values=values)
    for r in a + b:
        assert out[r] == len(values), f"rank {r} checked {out[r]} objects"


# name: senders, receivers, chunks, chunk_shape, dtype, tokens, concurrent copy, count
TENSOR_CASES = {
    "single_corner": ([0], [2], 1, (100,), "bfloat16", (1, 1), False, 4),
    "single_small": ([0], [2], 1, (100,), "float64", (5, 10), False, 5),
    "single_medium": ([0, 1], [2], 2, (1176,), "bfloat16", (5, 10), False, 6),
    "single_large": ([0, 1], [2, 3], 4, (29, 4096), "bfloat16", (100, 200), False, 7),
    "concurrent_small": ([0], [2], 4, (13, 4096), "bfloat16", (100, 200), True, 8),
    "concurrent_medium": ([0, 1], [2], 2, (1176,), "bfloat16", (50, 100), True, 9),
    "concurrent_large": ([0, 1], [2, 3], 1, (100,), "float64", (5, 50), True, 10),
    "concurrent_corner": ([0, 1], [2, 3], 1, (100,), "bfloat16", (1, 1), True, 3),
}


@pytest.mark.parametrize("name", list(TENSOR_CASES))
def test_tensors(rank_pool, name):
    a, b, chunks, chunk_shape, dtype, tokens, concurrent, count = TENSOR_CASES[name]
    out = _run(rank_pool, "tensors", a + b, label=name, a=a, b=b, chunks=chunks, chunk_shape=chunk_shape,
               dtype=dtype, tokens=tokens, concurrent=concurrent, count=count)
    # Every receiver verified every chunk of its direction.
    for r in a + b:
        assert out[r] == count * chunks, f"rank {r} verified {out[r]} chunks"


@pytest.mark.parametrize("a,b", [([0], [2]), ([0, 1], [2, 3])], ids=["0to2", "01to23"])
@pytest.mark.parametrize("concurrent", [False, True], ids=["single", "concurrent"])
def test_mixed_streaming(rank_pool, a, b, concurrent):
    out = _run(rank_pool, "mixed_streaming", a + b, a=a, b=b, concurrent=concurrent)
    for r in a + b:
        assert out[r] == 5 * 9


def test_mixed_streaming_close_first(rank_pool):
    out = _run(rank_pool, "mixed_streaming", [0, 2], a=[0], b=[2], concurrent=False, close_first=True)
    assert out[2] == 5 * 9


@pytest.mark.parametrize("dtype_a,dtype_b", [("int64", "bfloat16"), ("float32", "float64")])
def test_dtype_mismatch(rank_pool, dtype_a, dtype_b):
    out = _run(rank_pool, "dtype_mismatch", [0, 2], dtype_a=dtype_a, dtype_b=dtype_b)
    assert out == {0: 1, 2: 1}

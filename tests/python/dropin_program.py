"""A program written against Cornserve's sidecar API (cornserve.sidecar.api / .schema), as an
executor would use it. Only its import lines differ from the Cornserve version:

    from cornserve.sidecar.api import Sidecar          ->  from sidecar import Sidecar
    from cornserve.sidecar.schema import SidecarConfig ->  from sidecar import SidecarConfig

Usage: dropin_program.py producer|consumer RANK NONCE. Producers are ranks 0 and 1 (one
tensor-parallel group, each sending its replica), the consumer is rank 2. The daemon's socket
comes from $SIDECAR_SOCKET; with CORNSERVE_MOCK_SIDECAR=1 everything goes through files instead.
Exits 0 when every check passed.
"""

import asyncio
import os
import sys

import torch

from sidecar import Sidecar  # was: from cornserve.sidecar.api import Sidecar
from sidecar import SidecarConfig  # was: from cornserve.sidecar.schema import SidecarConfig

PRODUCERS = [0, 1]
CONSUMER = 2
OBJECTS = ["string", b"bytes", 5, 10.6, False]
HIDDEN = 4096


def ids(nonce):
    """Data id -> number of chunks (the end-of-stream chunk included for streams)."""
    out = {f"{nonce}-obj-{k}": 1 for k in range(len(OBJECTS))}
    out[f"{nonce}-hidden"] = 3
    out[f"{nonce}-stream"] = 5
    out[f"{nonce}-mismatch"] = 1
    out[f"{nonce}-ack"] = 1
    return out


def hidden_chunk(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(5 + i, HIDDEN, generator=g).to(torch.bfloat16)


def mocked():
    return os.environ.get("CORNSERVE_MOCK_SIDECAR", "").lower() in ("1", "true")


def producer(rank, nonce):
    config = SidecarConfig(sidecar_rank=rank, group=PRODUCERS, send_tensor_dtype=torch.bfloat16,
                           send_tensor_shape=(-1, HIDDEN))
    sidecar = Sidecar(config)
    dst = [[CONSUMER]]
    for k, obj in enumerate(OBJECTS):
        sidecar.send(obj, f"{nonce}-obj-{k}", dst)
    for i in range(3):
        sidecar.send(hidden_chunk(i), f"{nonce}-hidden", dst, chunk_id=i, num_chunks=3)
    # Mixed streaming: tensor chunks first with an unknown count, then the header, then the count.
    for i in range(1, 4):
        sidecar.send(hidden_chunk(10 + i), f"{nonce}-stream", dst, chunk_id=i, stream=True)
    sidecar.send({"first_token": 11908, "num_prefill_tokens": 100}, f"{nonce}-stream", dst, chunk_id=0,
                 stream=True)
    if rank == PRODUCERS[0]:
        sidecar.close_stream(f"{nonce}-stream", 4, dst)
    # The consumer declared float32 for receiving; int64 must still arrive as int64.
    sidecar.send(torch.arange(100, dtype=torch.int64).reshape(10, 10), f"{nonce}-mismatch", dst)
    if not mocked():
        ack = sidecar.recv_sync(f"{nonce}-ack")
        assert ack == "all received", ack
        if rank == PRODUCERS[-1]:
            sidecar.mark_done_sync(f"{nonce}-ack")
    sidecar.shutdown_sync()


async def consumer(nonce):
    config = SidecarConfig(sidecar_rank=CONSUMER, recv_tensor_dtype=torch.float32, recv_tensor_shape=(-1, 10, 10))
    sidecar = Sidecar(config)
    for k, obj in enumerate(OBJECTS):
        got = await sidecar.recv(f"{nonce}-obj-{k}")
        assert type(got) is type(obj) and got == obj, (got, obj)
        await sidecar.mark_done(f"{nonce}-obj-{k}")
    chunks = await asyncio.gather(*(sidecar.recv(f"{nonce}-hidden", i) for i in range(3)))
    for i, chunk in enumerate(chunks):
        assert chunk.dtype == torch.bfloat16 and torch.equal(chunk, hidden_chunk(i)), f"hidden chunk {i}"
    for i in range(3):
        await sidecar.mark_done(f"{nonce}-hidden", i)
    header = await sidecar.recv(f"{nonce}-stream", 0)
    assert header == {"first_token": 11908, "num_prefill_tokens": 100}, header
    for i in range(1, 4):
        assert torch.equal(await sidecar.recv(f"{nonce}-stream", i), hidden_chunk(10 + i)), f"stream chunk {i}"
    assert await sidecar.recv(f"{nonce}-stream", 4) is None
    for i in range(4):
        await sidecar.mark_done(f"{nonce}-stream", i)
    mismatch = sidecar.recv_sync(f"{nonce}-mismatch")
    assert mismatch.dtype == torch.int64 and torch.equal(mismatch, torch.arange(100).reshape(10, 10))
    sidecar.mark_done_sync(f"{nonce}-mismatch")
    if not mocked():
        sidecar.send("all received", f"{nonce}-ack", [PRODUCERS])
    await sidecar.shutdown()


def main():
    role, rank, nonce = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if role == "producer":
        producer(rank, nonce)
    else:
        asyncio.run(consumer(nonce))
    print(f"{role} {rank}: ok")


if __name__ == "__main__":
    main()

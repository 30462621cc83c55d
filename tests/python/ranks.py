"""Rank processes for the multi-rank scenarios: one long-lived process per rank (spawned, never
forked: the test process may hold Sidecar owner threads), each running scenario functions from
scenarios.py on request. Reused across tests, so torch is imported once per rank.

Ranks signal each other through per-rank inboxes (multiprocessing queues): e.g. a receiving
group's members tell its leader that they have a chunk, and the leader then marks it done.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from typing import Any, Dict, List

_JOB_TIMEOUT_S = 240


def _worker(rank: int, socket: str, jobs, results, inboxes) -> None:
    import scenarios  # noqa: PLC0415 (imported in the child)

    while True:
        job = jobs.get()
        if job is None:
            return
        name, kwargs = job
        try:
            out = getattr(scenarios, name)(rank=rank, socket=socket, inboxes=inboxes, **kwargs)
            results.put(("ok", out))
        except BaseException:  # noqa: BLE001 (reported to the test)
            results.put(("error", f"rank {rank}:\n{traceback.format_exc()}"))


class RankPool:
    def __init__(self, socket, count: int):
        """`socket`: one unix socket path for every rank, or a list with one per rank (the inter
        setup: each rank talks to its own node's daemon)."""
        self.sockets = list(socket) if isinstance(socket, (list, tuple)) else [socket] * count
        self.count = count
        self._ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        ctx = self._ctx
        self.inboxes = [ctx.Queue() for _ in range(self.count)]
        self.jobs = [ctx.Queue() for _ in range(self.count)]
        self.results = [ctx.Queue() for _ in range(self.count)]
        self.procs = [ctx.Process(target=_worker, args=(r, self.sockets[r], self.jobs[r], self.results[r], self.inboxes),
                                  daemon=True) for r in range(self.count)]
        for p in self.procs:
            p.start()

    def run(self, jobs: Dict[int, tuple]) -> Dict[int, Any]:
        """Runs {rank: (function name, kwargs)} at once; returns {rank: result}. Raises
        AssertionError with every failing rank's traceback, or on a hang (the pool restarts)."""
        for rank, (name, kwargs) in jobs.items():
            self.jobs[rank].put((name, kwargs))
        out, errors = {}, []
        for rank in jobs:
            try:
                status, value = self.results[rank].get(timeout=_JOB_TIMEOUT_S)
            except queue.Empty:
                errors.append(f"rank {rank}: no answer within {_JOB_TIMEOUT_S} s")
                continue
            if status == "ok":
                out[rank] = value
            else:
                errors.append(value)
        if errors:
            if any("no answer" in e for e in errors):
                self.close()
                self._start()
            else:
                self._drain_inboxes()
            raise AssertionError("\n".join(errors))
        return out

    def _drain_inboxes(self) -> None:
        for inbox in self.inboxes:
            while True:
                try:
                    inbox.get_nowait()
                except queue.Empty:
                    break

    def close(self) -> None:
        for p, jobs in zip(self.procs, self.jobs):
            if p.is_alive():
                jobs.put(None)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


__all__: List[str] = ["RankPool"]

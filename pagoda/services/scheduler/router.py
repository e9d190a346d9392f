"""Routing: which worker runs a request. Pure logic, fed from the registry and prefix index.

The prefix router weighs each worker's cached prefix of the request (in leading full blocks,
from the block-hash index workers publish) against its load. A load gate keeps a hot prefix from
pinning all traffic on one worker: only workers whose load is within `load_gate` of the least
loaded one may be chosen for their cache. Session affinity is honoured under the same gate.
"""

from __future__ import annotations

import abc
import itertools
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class WorkerState:
    worker_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    max_num_seqs: int = 256
    num_prefilling: int = 0  # running sequences without a first token (known to the worker itself)

    @property
    def load(self) -> float:
        """Requests per sequence slot (waiting ones count double: they queue), plus KV pressure."""
        return (self.num_running + 2 * self.num_waiting) / max(self.max_num_seqs, 1) + self.kv_usage


@dataclass(frozen=True)
class Decision:
    worker_id: str
    overlap_blocks: int  # leading blocks of the prompt the chosen worker has cached
    reason: str  # "prefix", "session", "least-load", "round-robin"


class Router(abc.ABC):
    """Chooses among live workers (never an empty list). Holds no state a restart would lose
    except round-robin position."""

    name: ClassVar[str]

    @abc.abstractmethod
    def choose(
        self, workers: list[WorkerState], overlap: dict[str, int], session_worker: str | None = None
    ) -> Decision: ...


_ROUTERS: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    _ROUTERS[cls.name] = cls
    return cls


def make_router(name: str) -> Router:
    if name not in _ROUTERS:
        raise ValueError(f"router {name!r} is not known; choose one of {', '.join(sorted(_ROUTERS))}")
    return _ROUTERS[name]()


@register
class RoundRobinRouter(Router):
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(
        self, workers: list[WorkerState], overlap: dict[str, int], session_worker: str | None = None
    ) -> Decision:
        ordered = sorted(workers, key=lambda w: w.worker_id)
        w = ordered[next(self._counter) % len(ordered)]
        return Decision(w.worker_id, overlap.get(w.worker_id, 0), "round-robin")


@register
class LeastLoadRouter(Router):
    name = "least-load"

    def choose(
        self, workers: list[WorkerState], overlap: dict[str, int], session_worker: str | None = None
    ) -> Decision:
        w = min(workers, key=lambda w: (w.load, w.worker_id))
        return Decision(w.worker_id, overlap.get(w.worker_id, 0), "least-load")


@register
class PrefixRouter(Router):
    name = "prefix"

    def __init__(self, load_gate: float = 0.25) -> None:
        self.load_gate = load_gate

    def choose(
        self, workers: list[WorkerState], overlap: dict[str, int], session_worker: str | None = None
    ) -> Decision:
        least = min(workers, key=lambda w: (w.load, w.worker_id))
        eligible = [w for w in workers if w.load <= least.load + self.load_gate]
        by_id = {w.worker_id: w for w in eligible}
        if session_worker in by_id:
            return Decision(session_worker, overlap.get(session_worker, 0), "session")
        best = max(eligible, key=lambda w: (overlap.get(w.worker_id, 0), -w.load, w.worker_id))
        if overlap.get(best.worker_id, 0) > 0:
            return Decision(best.worker_id, overlap[best.worker_id], "prefix")
        return Decision(least.worker_id, overlap.get(least.worker_id, 0), "least-load")


def leading_overlap(block_owners: list[set[str]]) -> dict[str, int]:
    """Per worker, how many leading blocks it holds, given each block's owners in prompt order."""
    result: dict[str, int] = {}
    alive: set[str] | None = None
    for i, owners in enumerate(block_owners):
        alive = set(owners) if alive is None else alive & owners
        if not alive:
            break
        for w in alive:
            result[w] = i + 1
    return result

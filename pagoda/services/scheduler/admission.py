"""Admission: refuse at once, with a 503 and `Retry-After`, what the fleet has no room for, instead
of queueing without bound.

A worker has `max_num_seqs` running slots and may queue `max_waiting` more sequences
(`--max-waiting-requests`). Priority requests (`priority` < 0: the engine serves lower values
first, as vLLM does) may go `priority_reserve` sequences past that queue cap, so they still get
through a saturated fleet. Three places apply the same rule, each with what it knows:

- the gateway (`FleetAdmission`): its own sequences in flight against the fleet's slots plus queue
  caps, read from the worker registry. Exact for one gateway, and it answers before anything is
  sent, so a streaming client gets a real HTTP 503;
- the scheduler (`has_room`): each worker's heartbeat figures plus what it routed there since;
  workers without room are not chosen. Its view lags (a request that finished since the last
  heartbeat still counts), so it refuses nothing itself: when no worker seems to have room it
  sends the request to the least loaded, which decides;
- the worker (`WorkerService`): its engine's own running and waiting sequences, exact: a request
  beyond its slots plus queue cap is rejected (503 + Retry-After).

With no queue (cap 0) the worker also refuses a request that would wait behind another one's
prefill: while a busy batch (some sequences decoding) runs a step that prefills others. The
request would start only after that step, then prefill in a step of its own: on a CPU worker two
prefill-sized steps, twice an unloaded TTFT. Requests that arrive between steps start together at
the next one, and an engine that only prefills (a burst into an idle worker) takes all it has slots
for.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pagoda.services.scheduler.registry import Refreshed, WorkerRegistry, load_of
from pagoda.services.scheduler.router import WorkerState
from pagoda.services.transport.errors import APIError, bad_request

logger = logging.getLogger("pagoda.admission")

RETRY_AFTER_S = 1
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Gettable(Protocol[T_co]):
    """What `first_output` reads: an asyncio.Queue, or the gateway's Mailbox."""

    async def get(self) -> T_co: ...


@dataclass(frozen=True)
class AdmissionLimits:
    max_waiting: int | None = 64  # sequences queued per worker beyond its running slots; None: no cap
    priority_reserve: int = 8  # more queued sequences allowed for priority (< 0) requests

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"--max-waiting-requests must be >= 0, got {self.max_waiting}")
        if self.priority_reserve < 0:
            raise ValueError(f"--priority-reserve must be >= 0, got {self.priority_reserve}")

    def queue_cap(self, priority: int) -> int | None:
        if self.max_waiting is None:
            return None
        return self.max_waiting + (self.priority_reserve if priority < 0 else 0)


def fleet_saturated(detail: str) -> APIError:
    return APIError(
        503,
        f"The server is at capacity ({detail}); retry after {RETRY_AFTER_S} s.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def queued(state: WorkerState, extra: int = 0) -> int:
    """Sequences a worker holds beyond its running slots, with `extra` more sent to it."""
    return max(0, state.num_running + state.num_waiting + extra - state.max_num_seqs)


def behind_a_prefill(state: WorkerState) -> bool:
    """Whether a request arriving now would wait for a step that prefills others in a busy batch."""
    return 0 < state.num_prefilling < state.num_running


def has_room(
    state: WorkerState, limits: AdmissionLimits, priority: int, extra: int = 0, seqs: int = 1
) -> bool:
    """Whether `state` can take `seqs` more sequences (with `extra` already sent its way)."""
    cap = limits.queue_cap(priority)
    if cap == 0 and behind_a_prefill(state):
        return False
    return cap is None or queued(state, extra + seqs) <= cap


class FleetAdmission(Refreshed):
    """The gateway's view of one model: sequences it has in flight for it, against the slots plus
    queue caps of that model's workers (from the registry, refreshed every half heartbeat). With no
    worker known it admits: the frontend or the scheduler answers 503 "no worker" on its own."""

    def __init__(self, registry: WorkerRegistry, limits: AdmissionLimits, model: str) -> None:
        self.registry = registry
        self.limits = limits
        self.model = model
        self.in_flight = 0
        self._workers: list[WorkerState] = []

    @property
    def refresh_interval_s(self) -> float:
        return self.registry.heartbeat_s / 2

    def capacity(self, priority: int) -> int | None:
        cap = self.limits.queue_cap(priority)
        if cap is None or not self._workers:
            return None
        return sum(w.max_num_seqs + cap for w in self._workers)

    def admit(self, seqs: int, priority: int) -> None:
        """Take `seqs` sequences for one call, or raise 503; give them back with `release`."""
        cap = self.limits.queue_cap(priority)
        largest = (
            max((w.max_num_seqs + cap for w in self._workers), default=None) if cap is not None else None
        )
        if largest is not None and seqs > largest:  # no wait would let it in
            raise bad_request(
                f"This request needs {seqs} sequences (n x prompts), more than a worker holds "
                f"({largest}); ask for fewer choices or prompts.",
                param="n",
            )
        capacity = self.capacity(priority)
        if capacity is not None and self.in_flight + seqs > capacity:
            raise fleet_saturated(
                f"{self.in_flight} sequences in flight, room for {capacity} on {len(self._workers)} workers"
            )
        self.in_flight += seqs

    def release(self, seqs: int) -> None:
        self.in_flight -= seqs
        assert self.in_flight >= 0, f"released more sequences than admitted ({self.in_flight})"

    async def refresh(self) -> None:
        try:
            alive = await self.registry.alive()
            self._workers = [load_of(beat) for beat in alive if beat.model == self.model]
        except Exception as exc:  # keep the last view; the gateway's readiness says the rest
            logger.debug("admission: cannot read the worker registry: %s", exc)


# -------------------------------------------------------------------------------- queue timeout

QUEUE_TIMEOUT_GRACE_S = 5.0  # the gateway's own wait beyond the workers', for a request lost on the way


def queue_timed_out(timeout_s: float) -> APIError:
    return APIError(
        503,
        f"The request did not start within the queue timeout ({timeout_s:g} s): the server is "
        f"overloaded; retry later.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def queue_deadline(
    arrival_time: float, queue_timeout_s: float | None, now_wall: float, now_mono: float
) -> float | None:
    """The monotonic time by which a request received now must have started: its timeout less
    the time already spent upstream (by the senders' wall clock, so never below zero or above
    the whole timeout when clocks disagree)."""
    if queue_timeout_s is None:
        return None
    spent = min(max(now_wall - arrival_time, 0.0), queue_timeout_s) if arrival_time > 0 else 0.0
    return now_mono + queue_timeout_s - spent


def first_output_wait(queue_timeout_s: float | None) -> float | None:
    return None if queue_timeout_s is None else queue_timeout_s + QUEUE_TIMEOUT_GRACE_S


async def first_output(outputs: Gettable[T], timeout_s: float) -> T | APIError:
    """The next item of `outputs`, or the queue-timeout error if none comes within `timeout_s`."""
    try:
        return await asyncio.wait_for(outputs.get(), timeout_s)
    except TimeoutError:
        return queue_timed_out(timeout_s - QUEUE_TIMEOUT_GRACE_S)

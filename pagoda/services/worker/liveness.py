"""What a worker tells the registry about itself: its heartbeat, and whether its step loop is
stalled (see pagoda/services/worker/service.py for what each state makes the others do)."""

from __future__ import annotations

import logging
import time

from pagoda.engine import AsyncEngine
from pagoda.services.transport.messages import WorkerHeartbeat, WorkerStatus

logger = logging.getLogger("pagoda.worker")


def heartbeat_of(engine: AsyncEngine, worker_id: str, state: WorkerStatus) -> WorkerHeartbeat:
    """The worker's engine now, as the registry records it. Live figures: a step's own go stale
    when requests are aborted and no step follows."""
    figures = engine.counters()
    capacity = engine.capacity
    return WorkerHeartbeat(
        worker_id=worker_id,
        state=state,
        model=engine.model_name,
        num_running=figures.num_running,
        num_waiting=engine.num_waiting,
        kv_usage=figures.kv_usage,
        kv_live_tokens=figures.kv_live_tokens,
        kv_live_token_ratio=figures.kv_live_token_ratio,
        max_num_seqs=capacity.max_num_seqs,
        block_size=capacity.block_size,
        num_blocks=capacity.num_blocks,
        num_free_blocks=figures.num_free_blocks,
        steps=engine.steps,
        loras=tuple(engine.list_loras()),
    )


class StallWatch:
    """Tells "stalled" from "ready"/"draining", once a heartbeat: stalled when requests wait and
    the step loop has not advanced for `timeout_s` (a draining worker included: its gateways move
    its requests instead of waiting out the drain), or for good once the engine died. Logs each
    change of verdict."""

    def __init__(self, worker_id: str, timeout_s: float) -> None:
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self._progress = (0, time.monotonic())  # (engine steps, when they last changed)

    def check(
        self, engine: AsyncEngine, was: WorkerStatus, draining: bool, num_requests: int
    ) -> WorkerStatus:
        """The state to announce now; `was` the one announced last, `num_requests` for the log."""
        if engine.dead_reason is not None:  # its step loop never advances again
            if was != "stalled":
                logger.error(
                    "worker %s: its engine stopped (%s); reporting stalled, so that its %d requests move",
                    self.worker_id, engine.dead_reason, num_requests,
                )  # fmt: skip
            return "stalled"
        steps, now = engine.steps, time.monotonic()
        if steps != self._progress[0] or not engine.has_unfinished():
            self._progress = (steps, now)
        stalled = now - self._progress[1] > self.timeout_s
        if stalled != (was == "stalled"):
            if stalled:
                logger.error(
                    "worker %s: the step loop has not advanced for %.1fs with %d requests; reporting stalled",
                    self.worker_id, now - self._progress[1], num_requests,
                )  # fmt: skip
            else:
                logger.info("worker %s: the step loop advances again", self.worker_id)
        if stalled:
            return "stalled"
        return "draining" if draining else "ready"

"""Several steps in flight through a pipeline's stages (micro-batches), so that the stages work at
once: while the last stage runs step A, rank 0 (the first stage) already runs step B's layers.

`advance()` is the engine's schedule + execute for a pipeline of `depth` stages: it starts steps
(`Batcher.schedule` then `ModelRunner.launch`, which runs rank 0's stage and sends the hidden
states on) until `depth` are in flight or nothing more can start, then finishes the oldest
(`ModelRunner.finish`: its logits from the last stage, sampled) and returns it for the batcher's
update. A request is in at most one step in flight: the batcher neither schedules nor preempts
the requests of unfinished steps, and a step takes at most its share (1/depth) of the running
requests, so a decode batch splits into `depth` micro-batches that take turns through the stages.

Each stage runs the steps in the order rank 0 started them, so a KV block freed while a step that
wrote it is still in flight (an abort) is reused only by later steps, which reach every stage
after it. The runner drops an aborted request's state only once no step in flight holds it.
"""

from __future__ import annotations

from collections import deque

from pagoda.engine.runner.model_runner import Launched, ModelRunner
from pagoda.engine.scheduling.batcher import Batcher, BatchPlan, RunnerOutput


class MicroBatches:
    """The steps in flight of one engine's pipeline, oldest first."""

    def __init__(self, batcher: Batcher, runner: ModelRunner, depth: int) -> None:
        self.batcher, self.runner, self.depth = batcher, runner, depth
        self.in_flight: deque[tuple[BatchPlan, Launched]] = deque()
        self.deferred: set[str] = set()  # finished requests the runner drops once none is in flight
        self.most_in_flight = 0  # the most steps seen in flight at once

    def _busy(self) -> set[str]:
        return {rid for plan, _ in self.in_flight for rid in plan.num_scheduled_tokens}

    def advance(self) -> tuple[BatchPlan, RunnerOutput]:
        """Start steps while there is room and work, then finish the oldest: (its plan, its output)
        for `Batcher.update`. With nothing in flight and nothing to start: an empty plan."""
        while len(self.in_flight) < self.depth:
            busy = self._busy()
            share = max(1, -(-self.batcher.num_running // self.depth))  # of the running requests
            plan = self.batcher.schedule(busy, share)
            # the runner keeps the state of requests in flight until their step is finished
            plan.finished_req_ids |= self.deferred - busy
            self.deferred &= busy
            self.deferred |= plan.finished_req_ids & busy
            plan.finished_req_ids -= busy
            launched = self.runner.launch(plan)
            if plan.is_empty:
                if not self.in_flight:
                    return plan, self.runner.finish(launched)
                break
            self.in_flight.append((plan, launched))
            self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        plan, launched = self.in_flight.popleft()
        return plan, self.runner.finish(launched)

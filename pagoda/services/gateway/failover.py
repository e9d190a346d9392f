"""Failover: what the gateway keeps per request to continue it on another worker, and how it
decides that a worker is lost.

A request's `RequestTrack` holds the request as scheduled (prompt ids, sampling) and the output
tokens already sent to the client. When its worker is lost (no heartbeat for a while, or it
reports its step loop stalled), the gateway sends the scheduler a continuation: the original
prompt followed by the tokens generated so far, with `max_tokens`/`min_tokens` reduced by as many,
as attempt + 1. The scheduler answers `Assigned` with the new worker; from then on the gateway
takes deltas only from that worker and drops any token whose position in the output was already
sent, so the client sees one stream. With temperature 0 the continuation produces the same
tokens an undisturbed run would (the prompt's KV is recomputed, the sampler is greedy), so the
old worker's deltas still on their way are taken until the new worker is assigned.

A request with n > 1 cannot be continued (its choices have different outputs); nor can one past
`MAX_ATTEMPTS`. Those end with a clear error instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagoda.services.transport.messages import Assigned, ScheduleRequest, TokenDelta, TokenizeRequest

MAX_ATTEMPTS = 3


@dataclass
class RequestTrack:
    request: TokenizeRequest
    n: int
    prompt_token_ids: list[int] = field(default_factory=list)  # set when the tokenizer accepts it
    worker_id: str | None = None  # the worker running the current attempt
    attempt: int = 0
    offset: int = 0  # output tokens already in the current attempt's prompt
    awaiting: bool = False  # a continuation is on its way, not yet assigned
    generated: list[int] = field(default_factory=list)  # output ids sent so far (n == 1)
    delivered: dict[int, int] = field(default_factory=dict)  # choice index -> output tokens sent
    cached_tokens: int | None = None

    def assign(self, msg: Assigned) -> str | None:
        """Take the scheduler's assignment; returns a worker that should abort its copy (one this
        request moved away from, or a stale assignment), if any."""
        if msg.attempt < self.attempt:
            return msg.worker_id if msg.worker_id != self.worker_id else None
        superseded = self.worker_id if self.worker_id not in (None, msg.worker_id) else None
        self.worker_id, self.attempt, self.offset = msg.worker_id, msg.attempt, msg.resume_from
        self.awaiting = False
        return superseded

    def accept(self, worker_id: str, delta: TokenDelta) -> TokenDelta | None:
        """The delta as the client should see it (positions already sent dropped, counts made
        relative to the original prompt), or None to drop it."""
        if self.awaiting and self.request.sampling.temperature > 0:
            # Sampled: the continuation follows the tokens sent so far, so later ones from the old
            # worker would not fit it. Greedy: they are the same tokens; take what is on its way.
            return None
        if self.worker_id is None:  # deltas before any assignment: the worker that sent them
            self.worker_id = worker_id
        elif worker_id != self.worker_id:
            return None
        end = self.offset + delta.num_output_tokens  # position after this delta's last token
        sent = self.delivered.get(delta.index, 0)
        skip = max(0, min(len(delta.new_token_ids), sent - (end - len(delta.new_token_ids))))
        new = delta.new_token_ids[skip:]
        if not new and not delta.finished:
            return None
        self.delivered[delta.index] = max(sent, end)
        if self.n == 1:
            self.generated.extend(new)
        if self.cached_tokens is None:
            self.cached_tokens = delta.num_cached_tokens
        num_prompt = len(self.prompt_token_ids) or delta.num_prompt_tokens
        if (skip, end, num_prompt, self.cached_tokens) == (
            0, delta.num_output_tokens, delta.num_prompt_tokens, delta.num_cached_tokens,
        ):  # fmt: skip
            return delta  # the usual case: nothing to change (deltas are frozen)
        return delta.model_copy(
            update={
                "new_token_ids": new,
                "logprobs": delta.logprobs[skip:] if delta.logprobs is not None else None,
                "num_output_tokens": end,
                "num_prompt_tokens": num_prompt,
                "num_cached_tokens": self.cached_tokens,
            }
        )

    def continuation(self) -> ScheduleRequest | str:
        """The next attempt (and the track now waits for its assignment), or why there is none."""
        if self.n != 1:
            return f"a request with n={self.n} cannot be continued on another worker"
        if self.attempt + 1 >= MAX_ATTEMPTS:
            return f"it was already moved {self.attempt} times"
        if not self.prompt_token_ids:
            return "it was not tokenized yet"
        done = len(self.generated)
        spec = self.request.sampling
        update: dict[str, int] = {"min_tokens": max(0, spec.min_tokens - done)}
        if spec.max_tokens is not None:
            if spec.max_tokens - done <= 0:
                return "it had already produced all its tokens"
            update["max_tokens"] = spec.max_tokens - done
        self.attempt += 1
        self.awaiting = True
        req = self.request
        return ScheduleRequest(
            request_id=req.request_id, reply_to=req.reply_to, model=req.model, lora_name=req.lora_name,
            lora_path=req.lora_path,
            prompt_token_ids=self.prompt_token_ids + self.generated,
            sampling=spec.model_copy(update=update), priority=req.priority, cache_salt=req.cache_salt,
            session_id=req.session_id, arrival_time=req.arrival_time, attempt=self.attempt, resume_from=done,
        )  # fmt: skip


class WorkerWatch:
    """Which workers are lost, from successive reads of the registry.

    A worker is lost when it reports its step loop stalled, or when it has been missing from the
    registry (no heartbeat within the registry's window) for `grace_s` more. The grace covers a
    store that restarted empty: every live worker re-registers with its next heartbeat. A read
    that fails (store unreachable) tells nothing, and declares no one lost.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._missing_since: dict[str, float] = {}
        self._seen: set[str] = set()

    def update(self, states: dict[str, str], watched: set[str], now: float | None = None) -> set[str]:
        """`states`: worker id -> its reported state, for workers heard from; `watched`: workers
        that run requests now. Returns the watched workers that are lost."""
        now = time.monotonic() if now is None else now
        lost = set()
        for wid in watched:
            if states.get(wid) == "stalled":
                lost.add(wid)
            elif wid in states:
                self._missing_since.pop(wid, None)
            elif now - self._missing_since.setdefault(wid, now) >= self.grace_s:
                lost.add(wid)
        for wid in list(self._missing_since):
            if wid not in watched:
                del self._missing_since[wid]
        return lost

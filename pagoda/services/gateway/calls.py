"""Running the requests of one OpenAI API call: the "pumps" that read each request's outputs,
logprob formatting, usage and the request log line, and waiting for a non-streaming result while
watching for the client to go away (per-choice state: choices.py; the SSE side: streams.py).

Each sub-request (one prompt and its n choices) is read by a pump task that turns
`RequestOutput`s into per-choice deltas on a queue; the HTTP side reads the queue. Whatever way a
sub-request ends (finished, a stop string hit, the client went away, an error) it is released
exactly once: its outputs iterator is closed, and `frontend.abort` is called unless every choice
finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request

from pagoda.engine import TokenLogprob
from pagoda.services.gateway.choices import APIRequest, Choice, ChoiceDelta, SubRequest
from pagoda.services.gateway.frontend import Frontend, close_quietly
from pagoda.services.gateway.protocol import (
    ChatLogprobEntry,
    ChatLogprobs,
    ChatLogprobTop,
    CompletionLogprobs,
    PromptTokensDetails,
    UsageInfo,
)
from pagoda.services.gateway.tools import ToolPlan
from pagoda.services.ops.metrics import GatewayMetrics, ServedRequest
from pagoda.services.transport.errors import APIError

# One logger for the server's request lines, whichever module writes them.
logger = logging.getLogger("pagoda.services.gateway.server")

MIN_LOGPROB = -9999.0  # what vLLM writes for -inf (JSON has no infinity)

_PUMPS: set[asyncio.Task[None]] = set()  # strong references to running pump tasks


def clamp_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else value


@dataclass
class Call:
    """One API call in flight: its sub-requests and what its responses need."""

    frontend: Frontend
    req: APIRequest
    request_id: str
    model: str
    start: float = field(default_factory=time.monotonic)
    subs: list[SubRequest] = field(default_factory=list)
    logged: bool = False
    metrics: GatewayMetrics | None = None  # observes the call when it is logged
    metrics_model: str = ""  # its `model_name` label
    first_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # inter-token latencies of all choices
    # called once when the call ends (with its prompt + completion tokens): admission, rate limits
    on_end: list[Callable[[int], None]] = field(default_factory=list)
    tools: ToolPlan | None = None  # how a chat call's answers become tool calls
    reasoning: str | None = None  # the server's --reasoning-parser, for a chat call

    # ------------------------------------------------------------------------------- running

    async def release(self, sub: SubRequest) -> None:
        """Close the sub-request's outputs and abort it unless it finished (once; never raises)."""
        if sub.released:
            return
        sub.released = True
        await close_quietly(sub.outputs)
        if not sub.engine_finished:
            with contextlib.suppress(Exception):
                await self.frontend.abort(sub.request_id)

    async def release_all(self) -> None:
        with anyio.CancelScope(shield=True):
            for sub in self.subs:
                await self.release(sub)

    async def _sub_deltas(self, sub: SubRequest) -> AsyncGenerator[ChoiceDelta, None]:
        """The deltas of one sub-request until all its choices are done; released however it ends."""
        try:
            async for out in sub.outputs:
                delta = sub.process(out)
                if delta is not None:
                    if out.new_token_ids:
                        self.token_seen(delta.choice)
                    yield delta
                # a delta that did not finish its choice cannot have finished them all
                if (delta is None or delta.finish_reason is not None) and all(c.done for c in sub.choices):
                    break
            for choice in sub.choices:  # the engine stopped without finishing a choice
                if not choice.done:
                    choice.finish_reason = "abort"
                    yield ChoiceDelta(choice, choice.stop.flush(), [], "abort")
        finally:
            await self.release(sub)

    async def _pump(self, sub: SubRequest, queue: asyncio.Queue[Any]) -> None:
        try:
            async with contextlib.aclosing(self._sub_deltas(sub)) as deltas:
                async for delta in deltas:
                    queue.put_nowait(delta)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            queue.put_nowait(err)

    def token_seen(self, choice: Choice) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
        if choice.last_token_at is not None:
            self.token_gaps.append(now - choice.last_token_at)
        choice.last_token_at = now

    @property
    def finished(self) -> bool:
        """Every choice of every sub-request is done: no delta follows."""
        return all(c.done for s in self.subs for c in s.choices)

    def backlog(self) -> bool:
        """More output of this call has arrived and waits to be read (known for one prompt only)."""
        backlog = self.subs[0].backlog if len(self.subs) == 1 else None
        return backlog is not None and backlog()

    def deltas(self) -> AsyncGenerator[ChoiceDelta, None]:
        """Deltas of all choices of all sub-requests, as they come. Closing it releases them all.
        One sub-request (one prompt) is read in the caller's task; several get a pump task each."""
        if len(self.subs) == 1:
            return self._sub_deltas(self.subs[0])
        return self._pumped()

    async def _pumped(self) -> AsyncGenerator[ChoiceDelta, None]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(sub, queue)) for sub in self.subs]
        for task in tasks:
            _PUMPS.add(task)
            task.add_done_callback(_PUMPS.discard)
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    def usage(self) -> UsageInfo:
        prompt = sum(len(s.prompt_ids) for s in self.subs)
        completion = sum(c.num_output_tokens for s in self.subs for c in s.choices)
        cached = sum(s.num_cached_tokens for s in self.subs)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def log(self, status: int | str) -> None:
        """The one INFO line per request (later calls do nothing)."""
        if self.logged:
            return
        self.logged = True
        prompt = sum(len(s.prompt_ids) for s in self.subs)
        completion = sum(c.num_output_tokens for s in self.subs for c in s.choices)
        logger.info(
            "request %s model=%s status=%s prompt_tokens=%d completion_tokens=%d latency=%.3fs",
            self.request_id,
            self.model or self.metrics_model,
            status,
            prompt,
            completion,
            time.monotonic() - self.start,
        )
        if self.metrics is not None:
            self.metrics.observe(self.metrics_model, self._record(status, prompt, completion))
        for hook in self.on_end:
            hook(prompt + completion)

    def _record(self, status: int | str, prompt: int, completion: int) -> ServedRequest:
        first = self.first_token_at
        return ServedRequest(
            status=status,
            e2e_s=time.monotonic() - self.start,
            ttft_s=None if first is None else first - self.start,
            token_gaps_s=self.token_gaps,
            prompt_tokens=prompt,
            generation_tokens=completion,
            finish_reasons=[c.finish_reason for s in self.subs for c in s.choices],
            submitted=bool(self.subs),
        )

    # ------------------------------------------------------------------------------- logprobs

    def _token_str(self, token_id: int) -> str:
        return self.frontend.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(self, entries: list[TokenLogprob], k: int) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> ChatLogprobTop:
            s = self._token_str(token_id)
            return ChatLogprobTop(token=s, logprob=clamp_logprob(logprob), bytes=list(s.encode("utf-8")))

        content = []
        for e in entries:
            best = sorted(e.top.items(), key=lambda kv: -kv[1])[:k]
            head = top(e.token_id, e.logprob)
            content.append(ChatLogprobEntry(**head.model_dump(), top_logprobs=[top(t, lp) for t, lp in best]))
        return ChatLogprobs(content=content)

    def completion_logprobs(self, entries: list[TokenLogprob], k: int, offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for e in entries:
            token = self._token_str(e.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(clamp_logprob(e.logprob))
            result.text_offset.append(offset)
            offset += len(token)
            best = sorted(e.top.items(), key=lambda kv: -kv[1])[:k]
            tops = {token: clamp_logprob(e.logprob)}
            tops.update({self._token_str(t): clamp_logprob(lp) for t, lp in best})
            result.top_logprobs.append(tops)
        return result


# ------------------------------------------------------------------------------ non-streaming


async def collect(call: Call, request: Request) -> None:
    """Runs a non-streaming call to the end; failures are logged and answered as APIErrors.
    If the client disconnects first, the call is aborted (uvicorn does not cancel handlers)."""

    async def consume() -> None:
        async with contextlib.aclosing(call.deltas()) as deltas:
            async for _ in deltas:
                pass

    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(client_gone())
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            call.log("disconnected")
            raise APIError(499, "Client disconnected.")
        work.result()
    except APIError as err:
        if err.status != 499:
            call.log(err.status)
        raise
    except Exception as err:
        logger.exception("request %s failed", call.request_id)
        call.log(500)
        raise APIError(500, f"Internal server error ({type(err).__name__}).") from None
    except BaseException:
        call.log("disconnected")
        raise
    finally:
        for task in (work, watch):
            task.cancel()
        await call.release_all()


# ---------------------------------------------------------------------------------- streaming

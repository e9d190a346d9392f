"""The tokenizer service: chat template, tokenization and prompt checks, off the gateway's loop.

Stateless: run as many as the load needs; those of one model share its `pagoda.tokenize.<model>`
queue (a process serving several models runs one service per model). For each request
it either answers the gateway with `Rejected` (a 400 the client sees, with the lengths) or sends
the request, with its prompt ids, on to the scheduler, whose `Assigned` tells the gateway both
where it runs and its prompt ids (one message a request fewer than a separate answer from here).
"""

from __future__ import annotations

import asyncio
import logging

from pagoda.services.ops import tracing
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.transport.bus import Bus, Delivery, Subscription
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import (
    MessageError,
    PromptInput,
    Queues,
    Rejected,
    ScheduleRequest,
    TokenizeRequest,
    decode,
    encode,
)

logger = logging.getLogger("pagoda.tokenizer")

CONCURRENCY = 64  # requests tokenized and forwarded at once per tokenizer process
# A prompt shorter than this (characters, no tools) is tokenized on the event loop: ~0.1 ms for a
# short chat, where the hop to a thread and back cost ~0.06 ms of CPU more per request.
INLINE_CHARS = 2048


def _short(prompt: PromptInput) -> bool:
    if prompt.tools:
        return False
    if prompt.messages is not None:
        size = sum(len(str(m.get("content") or "")) for m in prompt.messages)
    else:
        size = len(prompt.text or "") + len(prompt.token_ids or ())
    return size < INLINE_CHARS


class TokenizerService:
    def __init__(
        self, bus: Bus, processor: PromptProcessor, model: str, queues: Queues | None = None
    ) -> None:
        self.bus = bus
        self.queues = queues or Queues()
        self.processor = processor
        self.model = model  # the served model name: this tokenizer reads that model's queue
        self.queue = self.queues.tokenize(model)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        await self.bus.declare_work_queue(self.queue)
        await self.bus.declare_work_queue(self.queues.schedule)
        # Each request waits on a confirmed publish (a round trip to the broker): handle many at
        # once, or the round trips cap the whole cluster at a few hundred requests a second.
        self._sub = await self.bus.consume(
            self.queue, self._on_message, prefetch=CONCURRENCY * 2, concurrency=CONCURRENCY
        )
        logger.info("tokenizer ready on %s", self.queue)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.cancel()

    async def _on_message(self, message: Delivery) -> None:
        try:
            msg = decode(message.body)
        except MessageError as exc:
            logger.warning("tokenizer: dropped a malformed message: %s", exc)
            return
        if not isinstance(msg, TokenizeRequest):
            logger.warning("tokenizer: dropped an unexpected %s message", msg.type)
            return
        with tracing.hop("tokenizer", "tokenizer.tokenize", message.headers) as span:
            await self._tokenize(msg, span)

    async def _tokenize(self, msg: TokenizeRequest, span: tracing.TraceHandle) -> None:
        try:
            params = msg.sampling.to_params()
            process = self.processor.process
            if _short(msg.prompt):
                ids = process(msg.prompt, params)
            else:  # long prompts take a while to tokenize: keep the event loop free meanwhile
                ids = await asyncio.to_thread(process, msg.prompt, params)
        except APIError as err:
            span.fail(err.message)
            await self._answer(msg.reply_to, Rejected(
                request_id=msg.request_id, status=err.status, message=err.message, param=err.param
            ))  # fmt: skip
            logger.info("request %s rejected: %s", msg.request_id, err.message)
            return
        except ValueError as err:
            span.fail(err)
            await self._answer(
                msg.reply_to, Rejected(request_id=msg.request_id, status=400, message=str(err))
            )
            return
        forward = ScheduleRequest(
            request_id=msg.request_id, reply_to=msg.reply_to, model=msg.model, lora_name=msg.lora_name,
            lora_path=msg.lora_path, prompt_token_ids=ids,
            sampling=msg.sampling,
            priority=msg.priority, cache_salt=msg.cache_salt, session_id=msg.session_id,
            arrival_time=msg.arrival_time, queue_timeout_s=msg.queue_timeout_s,
        )  # fmt: skip
        span.set("gen_ai.usage.input_tokens", len(ids))
        try:
            await self.bus.publish(self.queues.schedule, encode(forward), span.headers())
        except Exception as exc:  # the broker stayed away: the gateway must not wait forever
            logger.warning("tokenizer: could not forward %s to the scheduler: %s", msg.request_id, exc)
            text = "The request could not reach the scheduler (message broker unavailable); retry shortly."
            await self._answer(msg.reply_to, Rejected(request_id=msg.request_id, status=503, message=text))
            return
        logger.info("request %s tokenized: %d prompt tokens", msg.request_id, len(ids))

    async def _answer(self, reply_to: str, msg: Rejected) -> None:
        try:
            await self.bus.publish(reply_to, encode(msg))
        except Exception as exc:  # the gateway went away
            logger.warning("tokenizer: could not answer %s: %s", reply_to, exc)

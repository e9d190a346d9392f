"""What the OpenAI server talks to: a `Frontend` that turns a prompt into a running request.

`Frontend` is the one interface between the HTTP server and whatever runs requests. The services
(`pagoda serve` included, over an in-memory bus) use `BusFrontend`, the gateway's side of the bus
(tokenizer -> scheduler -> worker); `LocalFrontend` runs them on an in-process `AsyncEngine`, with
no bus. Either way the server learns the prompt's token ids only when the request is accepted
(`Submitted`), and keeps a tokenizer of its own for detokenization, echo and /tokenize.

`PromptProcessor` (pagoda.services.tokenizer.prompts) is the one place that renders chat templates,
tokenizes and checks a prompt, so that LocalFrontend and the tokenizer service answer the same 400s.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pagoda.engine import PoolerConfig, RequestOutput, SamplingParams, Tokenizer
from pagoda.services.gateway.adapters import Adapter
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.transport.errors import APIError, from_value_error
from pagoda.services.transport.messages import PromptInput

if TYPE_CHECKING:
    from pagoda.engine import AsyncEngine


# What a frontend may hand a waiting stream instead of queueing an output (`Submitted.set_sink`):
# an unfinished output without log-probs, as (new token ids, output tokens so far, cached prompt
# tokens), the three fields a plain stream's chunk needs, with no `RequestOutput` built per token.
Sink = Callable[[list[int], int, int], bool]


@dataclass
class Submitted:
    """An accepted request: its prompt ids and its outputs (deltas for the n choices, tagged by
    `index`). Closing `outputs` early aborts the request."""

    prompt_token_ids: list[int]
    outputs: AsyncIterator[RequestOutput]
    # True while `outputs` holds an output that has arrived and not been read (None: unknown);
    # a stream then writes what it has read so far together with it, in one send
    backlog: Callable[[], bool] | None = None
    # Installs (None: removes) a sink that the frontend may hand an unfinished output without
    # log-probs to (`Sink`), instead of queueing it, while the reader waits on `outputs` with
    # nothing queued; the sink returns False to have it queued after all, and an exception it
    # raises reaches the reader instead.
    # None: the frontend has no such path.
    set_sink: Callable[[Sink | None], None] | None = None


class Frontend(Protocol):
    """Runs requests for the HTTP server; implementations own tokenization and prompt checks."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer  # the gateway's own, for detokenization and /tokenize
    default_sampling: dict[str, float]  # model generation defaults for fields a request omits
    pooler: PoolerConfig | None  # an embedding model's pooling (--task embed); None: it generates

    async def submit(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        session_id: str | None = None,
        lora: Adapter | None = None,
    ) -> Submitted:
        """Tokenize, check and start a request (with the LoRA adapter `lora` over the model, when
        given); its outputs are deltas for each of `params.n` choices (tagged by `index`), each
        choice ending with one whose `finished` is True.
        Closing them early (or cancelling the task reading them) aborts the request. Raises
        `APIError`: 400 for a prompt the model cannot take, 503 when nothing can serve it (429
        when overloaded)."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request (idempotent; unknown ids are ignored); its KV blocks are freed soon."""
        ...

    def is_ready(self) -> bool:
        """True while requests can be served (the engine's step loop runs and answers)."""
        ...


class LocalFrontend:
    """A Frontend over an in-process AsyncEngine: PromptProcessor, then `engine.add_request`.
    `session_id` has no meaning for one engine and is ignored."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.tokenizer: Tokenizer = engine.tokenizer
        self.default_sampling: dict[str, float] = dict(engine.default_sampling)
        self.pooler: PoolerConfig | None = getattr(engine, "pooler", None)  # test engines generate
        self.processor = PromptProcessor(engine.tokenizer, engine.max_model_len)

    async def submit(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        session_id: str | None = None,
        lora: Adapter | None = None,
    ) -> Submitted:
        ids = self.processor.process(prompt, params)
        try:
            if lora is not None and lora.name not in self.engine.list_loras():
                await self.engine.load_lora(lora.name, lora.path)
            outputs = self.engine.add_request(
                request_id, ids, params, priority=priority, cache_salt=cache_salt,
                lora_name=lora.name if lora is not None else None,
            )  # fmt: skip
        except ValueError as err:  # the engine's own prompt (and adapter) checks
            raise from_value_error(err) from None
        except RuntimeError as err:  # e.g. AsyncEngine's EngineDeadError
            if self.engine.is_ready():
                raise
            raise APIError(503, f"The engine cannot take requests: {err}") from None
        return Submitted(ids, outputs)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def is_ready(self) -> bool:
        return self.engine.is_ready()


async def close_quietly(outputs: AsyncIterator[RequestOutput] | None) -> None:
    """Close an outputs iterator (which aborts its request), ignoring errors."""
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()

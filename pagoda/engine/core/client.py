"""The narrow interface a front end (OpenAI server, gateway) needs from an engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.tokenization.tokenizer import Tokenizer


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    tokenizer: Tokenizer
    # the model's sampling defaults for fields a request leaves out (generation_config.json)
    default_sampling: dict[str, float]

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Start a request; iterate for its outputs (deltas for each of params.n choices, tagged
        by `index`). Each choice ends with one output whose `finished` is True. Closing the
        iterator early (or cancelling the task consuming it) aborts the request."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed within one step."""
        ...

    def is_ready(self) -> bool:
        """True while the step loop is running and answering."""
        ...

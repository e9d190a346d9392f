"""What the engine hands back: one `RequestOutput` per request per step that produced tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class TokenLogprob:
    """The sampled token's logprob and the top-N alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """New tokens of one request since its previous output (a delta, not the whole text)."""

    request_id: str
    new_token_ids: list[int]
    index: int  # which of the request's n choices this is
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int  # total generated so far, including new_token_ids
    new_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # the stop/eos token that finished it, if any
    queue_time_s: float | None = None  # arrival to first schedule on the engine (None: not scheduled)
    embedding: list[float] | None = None  # a pooling request's result (with finished=True)

"""A request inside the engine: counters, not phases. Prefill and decode are one code path."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from pagoda.engine.kv.block_hash import BlockHash
from pagoda.engine.outputs import FinishReason
from pagoda.engine.sampling.params import SamplingParams

if TYPE_CHECKING:  # check_prompt_ids serves engines without a model (SimCore): no torch at run time
    import torch

    from pagoda.engine.lora.request import LoRARequest
    from pagoda.engine.structured.compiler import SequenceGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    """One sequence. `num_tokens` = prompt + output tokens known so far; `num_computed_tokens`
    = how many of them have KV in the cache. The request needs compute while the two differ."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        index: int = 0,
        parent_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        generator: torch.Generator | None = None,
        lora_request: LoRARequest | None = None,
        lora_key: str | None = None,
    ) -> None:
        """`lora_request`: the adapter it runs with (None: the base model); `lora_key`: that
        adapter's prefix-cache key (LoRAManager.cache_key), which its block hashes take."""
        assert prompt_token_ids, "empty prompt"
        assert (lora_request is None) == (lora_key is None), (lora_request, lora_key)
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.priority = priority
        self.extra_keys: tuple[str, ...] = (cache_salt,) if cache_salt else ()
        self.lora_request = lora_request
        self.lora_key = lora_key
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.generator = generator
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_new_tokens = 0  # output tokens the last step appended (speculation: several)
        self.num_cached_tokens = -1  # prompt tokens hit in the prefix cache at first schedule
        self.queue_time_s: float | None = None  # arrival to first schedule (metrics, tracing)
        self.num_preemptions = 0
        self.block_hashes: list[BlockHash] = []
        self.finish_reason: FinishReason | None = None
        self.stop_token_id: int | None = None
        self.grammar: SequenceGrammar | None = None  # structured output: what it may sample next
        self.embedding: list[float] | None = None  # a pooling request's result

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def new_token_ids(self) -> list[int]:
        """The output tokens the last step appended."""
        return self.output_token_ids[self.num_output_tokens - self.num_new_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id}, {self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )


def check_prompt_ids(
    prompt_token_ids: list[int], max_model_len: int, vocab_size: int, output_room: int = 1
) -> None:
    """Raise ValueError (a user error, naming the value) when a prompt cannot run on an engine;
    `output_room`: the tokens it must leave for output (0: a pooling request, which has none)."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty; send at least one token")
    n = len(prompt_token_ids)
    if n > max_model_len - output_room:
        raise ValueError(
            f"the prompt has {n} tokens but max_model_len is {max_model_len}; "
            f"shorten the prompt to at most {max_model_len - output_room} tokens"
        )
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of vocabulary (size {vocab_size})")

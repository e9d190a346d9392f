"""What a Responses API call answers and keeps: the finished chat answer as output items (reasoning,
message, function calls), the Response object around them, and the stored responses.

Streamed and whole responses build their items here from the same `Answer` with the same ids,
so the items a stream announced are the ones its `response.completed` carries (the openai SDK
checks that) and the ones a later GET returns.

Stored responses are an exception to "Redis holds only metadata" (docs/architecture.md): with
`store` (the default, as in OpenAI's API) a response and the conversation that produced it are
kept in the store under `responses:<id>` for `--responses-ttl` seconds, for GET and for
`previous_response_id`. Every response keeps its whole conversation, so one that continues an
expired chain still stands alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pagoda.services.gateway.calls import Call
from pagoda.services.gateway.reasoning import split_reasoning
from pagoda.services.gateway.responses_input import assistant_message
from pagoda.services.gateway.responses_protocol import (
    RESPONSES_TTL_S,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    OutputItem,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ResponseObject,
    ResponseUsage,
    new_id,
)
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    response: ResponseObject
    conversation: list[dict[str, Any]]  # chat messages: the input (no instructions), then the answer


class ResponseStore:
    """Stored responses in the deployment's store (Redis, or memory in one process), each with a
    TTL. A store that cannot be reached fails reads (503: a conversation cannot be continued
    without it) but not writes (the answer is still given, and the failure logged)."""

    def __init__(self, store: Store, ttl_s: float = RESPONSES_TTL_S) -> None:
        if ttl_s <= 0:
            raise ValueError(f"responses_ttl_s must be > 0 seconds, got {ttl_s}")
        self.store, self.ttl_s = store, ttl_s

    @staticmethod
    def _key(response_id: str) -> str:
        return f"responses:{response_id}"

    async def put(self, stored: Stored) -> None:
        body = {"response": stored.response.model_dump(mode="json"), "conversation": stored.conversation}
        try:
            await self.store.set(self._key(stored.response.id), json.dumps(body), ttl_s=self.ttl_s)
        except Exception as exc:
            logger.warning("response %s not stored, the store failed: %s", stored.response.id, exc)

    async def get(self, response_id: str) -> Stored | None:
        try:
            raw = await self.store.get(self._key(response_id))
        except Exception as exc:
            raise APIError(503, f"The response store cannot be reached: {exc}") from None
        if raw is None:
            return None
        body = json.loads(raw)
        return Stored(ResponseObject.model_validate(body["response"]), body["conversation"])

    async def delete(self, response_id: str) -> bool:
        try:
            return await self.store.delete(self._key(response_id)) > 0
        except Exception as exc:
            raise APIError(503, f"The response store cannot be reached: {exc}") from None


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param)


# ------------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answer:
    """A finished answer, split as the chat API splits it: reasoning, content, tool calls (in
    the chat API's shape, each with its `call_...` id)."""

    reasoning: str
    content: str | None
    calls: list[dict[str, Any]]
    finish_reason: str

    @classmethod
    def of(cls, call: Call) -> Answer:
        """The answer of a call's one choice, once it has finished."""
        choice = call.subs[0].choices[0]
        reasoning, text = ("", choice.text)
        if call.reasoning is not None:
            reasoning, text = split_reasoning(choice.text, call.reasoning)
        content: str | None = text
        calls = None
        if call.tools is not None and choice.finish_reason == "stop":
            content, calls = call.tools.answer(text, reasoning)
        return cls(reasoning, content, calls or [], choice.finish_reason or "stop")

    @property
    def status(self) -> ItemStatus:
        return "incomplete" if self.finish_reason == "length" else "completed"


@dataclass(frozen=True)
class ItemIds:
    """The ids of a response's reasoning and message items, chosen before any is streamed."""

    message: str = field(default_factory=lambda: new_id("msg"))
    reasoning: str = field(default_factory=lambda: new_id("rs"))


def output_items(answer: Answer, ids: ItemIds) -> list[OutputItem]:
    """The response's output: reasoning (when any), the message (when it has text, or when
    there is nothing else), then one function_call item per tool call."""
    items: list[OutputItem] = []
    if answer.reasoning:
        last = not answer.content and not answer.calls
        status: ItemStatus = answer.status if last else "completed"
        items.append(
            ReasoningItem(id=ids.reasoning, content=[ReasoningText(text=answer.reasoning)], status=status)
        )
    if answer.content or not (items or answer.calls):
        text = OutputText(text=answer.content or "")
        items.append(MessageItem(id=ids.message, status=answer.status, content=[text]))
    for c in answer.calls:
        fn = c["function"]
        item_id = "fc_" + c["id"].removeprefix("call_")
        items.append(
            FunctionCallItem(id=item_id, call_id=c["id"], name=fn["name"], arguments=fn["arguments"])
        )
    return items


@dataclass
class Pending:
    """A response in flight: its head (the Response as `response.created` shows it), the
    conversation so far, and where it is stored once its call ends."""

    call: Call
    head: ResponseObject
    conversation: list[dict[str, Any]]
    store: ResponseStore | None  # None: `store: false`
    ids: ItemIds = field(default_factory=ItemIds)

    async def finish(self, answer: Answer) -> ResponseObject:
        """The whole Response of a finished call, stored (before it is sent, so that a client
        may continue it at once) unless the request said `store: false`."""
        usage = self.call.usage()
        reasoning_tokens = 0
        if answer.reasoning:  # an estimate: the reasoning text as the tokenizer reads it again
            ids = self.call.frontend.tokenizer.encode(answer.reasoning, add_special_tokens=False)
            reasoning_tokens = min(len(ids), usage.completion_tokens)
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        response = self.head.model_copy(
            update={
                "status": answer.status,
                "incomplete_details": IncompleteDetails(reason="max_output_tokens")
                if answer.status == "incomplete"
                else None,
                "output": output_items(answer, self.ids),
                "usage": ResponseUsage(
                    input_tokens=usage.prompt_tokens,
                    input_tokens_details=InputTokensDetails(cached_tokens=cached),
                    output_tokens=usage.completion_tokens,
                    output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
                    total_tokens=usage.total_tokens,
                ),
            }
        )
        if self.store is not None:
            said = assistant_message(answer.content, answer.calls)
            await self.store.put(Stored(response, [*self.conversation, said]))
        return response

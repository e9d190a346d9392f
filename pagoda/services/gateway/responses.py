"""OpenAI's Responses API: POST /v1/responses (whole or streamed), GET and DELETE
/v1/responses/{id}.

A response runs as a chat completion (gateway/responses_input.py translates the request) through
the chat path's own steps: tool plan, chat template, structured outputs, limits, admission and
`Call`, so there is one way to generate. Its answer becomes output items (responses_output.py)
or a stream of typed events (responses_stream.py). Errors keep the OpenAI error body, with `param`
naming the Responses request's field (`max_output_tokens`, `text.format`, `input`).

`previous_response_id` continues a stored response's conversation; one that is unknown or
expired is a 400 naming `previous_response_id` with OpenAI's message ("Previous response with id
'...' not found."), as OpenAI's API answers (vLLM answers 404; pagoda's `code` repeats the status
everywhere, so OpenAI's `previous_response_not_found` code is not sent); an unknown id on GET or
DELETE is a 404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response

from pagoda.services.gateway.calls import Call, collect
from pagoda.services.gateway.protocol import ChatCompletionRequest, ChatMessage
from pagoda.services.gateway.responses_input import chat_request, input_messages, rename_param
from pagoda.services.gateway.responses_output import Answer, Pending, not_found
from pagoda.services.gateway.responses_protocol import (
    DeletedResponse,
    ResponseObject,
    ResponsesRequest,
    new_id,
)
from pagoda.services.gateway.responses_stream import response_stream
from pagoda.services.gateway.routes import start_call
from pagoda.services.gateway.tools import template_messages, tool_plan
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import PromptInput

if TYPE_CHECKING:
    from pagoda.services.gateway.server import OpenAIServer, ServedModels

# A call's request until its Responses request is translated (a refusal is logged on the call)
_UNTRANSLATED = ChatCompletionRequest(messages=[ChatMessage(role="user", content="")])


def register_responses(app: FastAPI, models: ServedModels) -> None:
    """The Responses API's routes on `app`, each request served by the model it names (stored
    responses live in the store the models share)."""
    store = models.default.responses

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, request: Request) -> Response:
        server = models.pick(req.model, request)
        call = server.call(_UNTRANSLATED, new_id("resp"))
        pending = await _prepare(server, call, req)
        try:
            await start_call(server, call, request, [_prompt(server, call)])
        except APIError as err:
            raise rename_param(err) from None
        if req.stream:
            return response_stream(pending)
        await collect(call, request)
        response = await pending.finish(Answer.of(call))
        call.log(200)
        return _json(response)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        stored = await store.get(response_id)
        if stored is None:
            raise not_found(response_id, "response_id")
        return _json(stored.response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        if not await store.delete(response_id):
            raise not_found(response_id, "response_id")
        return _json(DeletedResponse(id=response_id))


async def _prepare(server: OpenAIServer, call: Call, req: ResponsesRequest) -> Pending:
    """Translate `req` onto `call` (its chat request and tool plan) and start its Pending
    response; a refusal is logged on the call and raised naming the Responses field."""
    try:
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            previous = await server.responses.get(req.previous_response_id)
            if previous is None:
                raise _previous_not_found(req.previous_response_id)
            history = previous.conversation
        given = input_messages(req.input)
        call.req = chat_request(req, [*history, *given])
        call.tools = tool_plan(call.req, server.tool_parser)
        head = _head(server, call, req)
    except APIError as err:
        call.log(err.status)
        raise rename_param(err) from None
    call.reasoning = server.reasoning_parser
    return Pending(call, head, [*history, *given], server.responses if req.store else None)


def _previous_not_found(response_id: str) -> APIError:
    return APIError(
        400,
        f"Previous response with id '{response_id}' not found (unknown, deleted, stored with store: "
        "false, or past the server's --responses-ttl).",
        param="previous_response_id",
    )


def _prompt(server: OpenAIServer, call: Call) -> PromptInput:
    assert isinstance(call.req, ChatCompletionRequest)
    messages, tools = template_messages(call.req, call.tools, server.template_knows_tools)
    return PromptInput(messages=messages, tools=tools)


def _head(server: OpenAIServer, call: Call, req: ResponsesRequest) -> ResponseObject:
    """The Response before its output: what the request asked, echoed as OpenAI echoes it
    (sampling values the request left out as the model's defaults)."""
    defaults = {"temperature": 1.0, "top_p": 1.0, **server.frontend.default_sampling}
    return ResponseObject(
        id=call.request_id,
        status="in_progress",
        model=server.check_model(req.model),
        instructions=req.instructions,
        tools=list(req.tools or []),
        tool_choice=req.tool_choice or "auto",
        parallel_tool_calls=req.parallel_tool_calls is not False,
        text=req.text or {"format": {"type": "text"}},
        temperature=req.temperature if req.temperature is not None else defaults["temperature"],
        top_p=req.top_p if req.top_p is not None else defaults["top_p"],
        max_output_tokens=req.max_output_tokens,
        previous_response_id=req.previous_response_id,
        store=req.store,
        metadata=dict(req.metadata or {}),
        user=req.user,
    )


def _json(body: ResponseObject | DeletedResponse) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")

"""The HTTP routes of the OpenAI server (server.py builds the app and calls `register_routes`).

One registration function per group: operations (health, readiness, metrics, version), the model
list, tokenization, and generation (chat and text completions, streamed or whole). Routes hold no
logic of their own beyond shaping responses: requests are validated, admitted and submitted by
the `OpenAIServer`, run by calls.py and streamed by streams.py.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from pagoda.services.gateway.calls import Call, collect
from pagoda.services.gateway.embeddings import (
    EmbeddingRequest,
    embedding_params,
    embedding_prompts,
    embedding_response,
)
from pagoda.services.gateway.embeddings import new_id as new_embedding_id
from pagoda.services.gateway.limits import check_request
from pagoda.services.gateway.plain_stream import PlainSSEResponse, is_plain
from pagoda.services.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeAPIRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ReasoningMessage,
    TokenizeAPIRequest,
    TokenizeResponse,
    ToolCallsMessage,
)
from pagoda.services.gateway.reasoning import split_reasoning
from pagoda.services.gateway.streams import chat_stream, completion_stream
from pagoda.services.gateway.tools import template_messages, tool_plan
from pagoda.services.ops.metrics import CONTENT_TYPE_LATEST
from pagoda.services.transport.errors import APIError, bad_request
from pagoda.services.transport.messages import PromptInput

if TYPE_CHECKING:
    from pagoda.services.gateway.server import OpenAIServer, ServedModels


def register_routes(app: FastAPI, models: ServedModels) -> None:
    """Every route of the API on `app`; each request is served by the model it names."""
    _register_operations(app, models)
    _register_models(app, models)
    _register_tokenization(app, models)
    _register_generation(app, models)
    _register_embeddings(app, models)


def _register_operations(app: FastAPI, models: ServedModels) -> None:
    """/health (the process answers), /health/ready (some model can serve), /metrics, /version."""

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        if not models.is_ready():
            raise APIError(503, "The engine is not ready.")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(models.default.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": app.version})


def _register_models(app: FastAPI, models: ServedModels) -> None:
    @app.get("/v1/models")
    async def model_list() -> ModelList:
        cards = []
        for server in models.servers:
            root, max_model_len = server.served_model_names[0], server.frontend.max_model_len
            names = server.served_model_names
            cards += [ModelCard(id=name, root=root, max_model_len=max_model_len) for name in names]
            if models.adapters is not None:  # LoRA adapters over it, as vLLM lists them
                adapters = models.adapters.of(root)
                cards += [
                    ModelCard(id=a.name, root=a.path, parent=root, max_model_len=max_model_len)
                    for a in adapters
                ]
        return ModelList(data=cards)


def _register_tokenization(app: FastAPI, models: ServedModels) -> None:
    """/tokenize and /detokenize, with the model's own tokenizer and chat template."""

    @app.post("/tokenize")
    async def tokenize(req: TokenizeAPIRequest, request: Request) -> TokenizeResponse:
        server = models.pick(req.model, request)
        server.check_model(req.model)
        tokenizer = server.frontend.tokenizer
        if req.messages is not None:
            chat = ChatCompletionRequest(messages=req.messages)
            messages, _ = template_messages(chat, None, server.template_knows_tools)
            text = server.processor.render_chat(messages, req.add_generation_prompt)
            add_special = False if req.add_special_tokens is None else req.add_special_tokens
        else:
            assert req.prompt is not None
            text = req.prompt
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=server.frontend.max_model_len, tokens=ids, token_strs=strs
        )

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeAPIRequest, request: Request) -> DetokenizeResponse:
        server = models.pick(req.model, request)
        server.check_model(req.model)
        server.processor.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=server.frontend.tokenizer.decode(req.tokens))


def _register_generation(app: FastAPI, models: ServedModels) -> None:
    """/v1/chat/completions and /v1/completions: a stream when asked, else one JSON body."""

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        server = models.pick(req.model, request)
        call = server.call(req, f"chatcmpl-{uuid.uuid4().hex}")
        try:
            call.tools = tool_plan(req, server.tool_parser)
        except APIError as err:
            call.log(err.status)
            raise
        call.reasoning = server.reasoning_parser
        messages, tools = template_messages(req, call.tools, server.template_knows_tools)
        prompt = PromptInput(messages=messages, tools=tools, add_generation_prompt=req.add_generation_prompt)
        await start_call(server, call, request, [prompt])
        if req.stream:
            return PlainSSEResponse(call, req) if is_plain(call, req) else chat_stream(call, req)
        await collect(call, request)
        return _json(_chat_response(call, req))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        server = models.pick(req.model, request)
        call = server.call(req, f"cmpl-{uuid.uuid4().hex}")
        prompts = [
            PromptInput(text=p, add_special_tokens=True) if isinstance(p, str) else PromptInput(token_ids=p)
            for p in req.prompts()
        ]
        await start_call(server, call, request, prompts)
        if req.stream:
            return PlainSSEResponse(call, req) if is_plain(call, req) else completion_stream(call, req)
        await collect(call, request)
        return _json(_completion_response(call, req))


def _session_id(request: Request, req: ChatCompletionRequest | CompletionRequest) -> str | None:
    return request.headers.get("x-session-id") or req.user


async def start_call(
    server: OpenAIServer,
    call: Call,
    request: Request,
    prompts: list[PromptInput],
) -> None:
    """Validate the call, then submit its prompts; a refusal is logged and raised as it is."""
    req = call.req
    assert not isinstance(req, EmbeddingRequest)
    try:
        call.model = server.check_model(req.model)
        if server.pooler is not None:
            raise bad_request("The model serves embeddings (--task embed): use /v1/embeddings.", "model")
        check_request(req, server.limits, server.frontend.max_model_len)
        params = await server.sampling_params(req, call.tools)
        await server.admit(call, request, prompts, params)
        await server.submit(call, prompts, params, _session_id(request, req))
    except APIError as err:
        call.log(err.status)
        raise
    except Exception:
        call.log(500)
        raise
    except BaseException:
        call.log("disconnected")
        raise


def _register_embeddings(app: FastAPI, models: ServedModels) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
        server = models.pick(req.model, request)
        call = server.call(req, new_embedding_id())
        try:
            call.model = server.check_model(req.model)
            params = embedding_params(req, server)
            prompts = embedding_prompts(req, server)
            await server.admit(call, request, prompts, params)
            await server.submit(call, prompts, params, request.headers.get("x-session-id") or req.user)
        except APIError as err:
            call.log(err.status)
            raise
        await collect(call, request)
        return Response(embedding_response(call, req).model_dump_json(), media_type="application/json")


def _chat_response(call: Call, req: ChatCompletionRequest) -> ChatCompletionResponse:
    """The whole answer of a collected (non-streamed) chat call; logs it as a 200."""
    k = req.top_logprobs or 0
    choices = []
    for c in call.subs[0].choices:
        message, finish_reason, text = ChatResponseMessage(content=c.text), c.finish_reason, c.text
        reasoning = None
        if call.reasoning is not None:
            reasoning, text = split_reasoning(c.text, call.reasoning)
            message = ReasoningMessage(content=text or None, reasoning_content=reasoning or None)
        if call.tools is not None and c.finish_reason == "stop":
            content, tool_calls = call.tools.answer(text, reasoning or "")
            if tool_calls is not None:
                message = ToolCallsMessage(
                    content=content, tool_calls=tool_calls, reasoning_content=reasoning or None
                )
                finish_reason = call.tools.finish_reason
        logprobs = call.chat_logprobs(c.logprobs, k) if req.logprobs else None
        choices.append(
            ChatCompletionChoice(
                index=c.index,
                message=message,
                logprobs=logprobs,
                finish_reason=finish_reason,
                stop_reason=c.stop_reason,
            )
        )
    call.log(200)
    return ChatCompletionResponse(id=call.request_id, model=call.model, choices=choices, usage=call.usage())


def _completion_response(call: Call, req: CompletionRequest) -> CompletionResponse:
    """The whole answer of a collected completion call (echoed prompts prefixed); logs a 200."""
    choices = []
    for sub in call.subs:
        prefix = sub.prompt_text if req.echo else ""
        for c in sub.choices:
            logprobs = None
            if req.logprobs is not None:
                logprobs = call.completion_logprobs(c.logprobs, req.logprobs, len(prefix))
            choices.append(
                CompletionChoice(
                    index=c.index,
                    text=prefix + c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
    call.log(200)
    return CompletionResponse(id=call.request_id, model=call.model, choices=choices, usage=call.usage())


def _json(body: ChatCompletionResponse | CompletionResponse) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")

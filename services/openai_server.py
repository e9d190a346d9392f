"""The OpenAI-compatible HTTP front end over an `EngineClient`.

It owns what the client connection owns (see DESIGN.md, gateway): tokenization and the context
check, incremental detokenization, stop strings, usage, SSE, and aborting the engine request when
the output is no longer wanted (a stop string hit, or the client went away).

Each engine request is consumed by a "pump" task that turns `RequestOutput`s into per-choice
deltas and puts them on a queue; the HTTP side reads the queue. Cancelling a pump closes the
engine iterator, which aborts the request; `engine.abort` is called as well, to be sure.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from engine.detokenizer import IncrementalDetokenizer, StopChecker
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from services.errors import APIError, bad_request, from_value_error, install_error_handlers, model_not_found
from services.errors import unauthorized as unauthorized_error
from services.openai_protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobEntry,
    ChatLogprobs,
    ChatLogprobTop,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
)

if TYPE_CHECKING:
    from engine.engine_client import EngineClient

logger = logging.getLogger(__name__)

_OPEN_PATHS = frozenset({"/health", "/health/ready", "/version"})


def _version() -> str:
    try:
        return metadata.version("pagoda")
    except metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass
class _Choice:
    """Output state of one choice: text so far, tokens, logprobs, how it finished."""

    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopChecker
    text: str = ""
    num_output_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    engine_finished: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Delta:
    choice: _Choice
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None


@dataclass
class _SubRequest:
    """One engine request: one prompt and its n choices."""

    request_id: str
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams
    choices: list[_Choice]
    num_cached_tokens: int = 0

    def process(self, out: RequestOutput) -> _Delta | None:
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        choice = self.choices[out.index]
        if choice.done:
            return None  # already finished by a stop string; the engine has not noticed yet
        choice.num_output_tokens = out.num_output_tokens
        choice.engine_finished = out.finished
        new_logprobs = list(out.new_logprobs or [])
        choice.logprobs.extend(new_logprobs)
        text, hit = choice.stop.add(choice.detokenizer.add(out.new_token_ids))
        if hit is not None:
            choice.finish_reason, choice.stop_reason = "stop", hit
        elif out.finished:
            text += choice.stop.flush()
            choice.finish_reason = out.finish_reason or "stop"
            choice.stop_reason = out.stop_token_id
        choice.text += text
        return _Delta(choice, text, new_logprobs, choice.finish_reason)

    @property
    def engine_finished(self) -> bool:
        return all(c.engine_finished for c in self.choices)


class _SSEResponse(StreamingResponse):
    """Closes the body generator however streaming ends, so the engine request is aborted promptly
    (starlette otherwise leaves that to garbage collection when the client disconnects)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(ClientDisconnect):  # the client went away: nothing left to answer
            await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class _BearerAuth:
    """ASGI middleware: every path but health/version needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in api_keys]

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
        scheme, _, token = header.partition(b" ")
        ok = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(token.strip(), key)
        return ok and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in _OPEN_PATHS
            and scope.get("method") != "OPTIONS"
            and not self._authorized(scope)
        ):
            await unauthorized_error().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class OpenAIServer:
    """Request handling, independent of routing: build with `build_app`."""

    def __init__(self, engine: EngineClient, served_model_names: list[str]) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self._pumps: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------ preparation

    def check_model(self, model: str | None) -> str:
        if model is None or model == "":
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise model_not_found(model)
        return model

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.tokenizer.vocab_size
        for tid in ids:
            if not 0 <= tid < vocab:
                raise bad_request(f"token id {tid} is out of vocabulary (vocab_size {vocab})", param=param)

    def prepare(
        self,
        request_id: str,
        prompt_ids: list[int],
        prompt_text: str,
        req: ChatCompletionRequest | CompletionRequest,
        first_index: int,
    ) -> _SubRequest:
        """Context-length check, sampling params and per-choice state for one prompt."""
        max_len = self.engine.max_model_len
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise bad_request("The prompt is empty; give at least one token.", param="prompt")
        if n_prompt >= max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, your request has "
                f"{n_prompt} input tokens. Please reduce the length of the input messages."
            )
        try:
            params = req.to_sampling_params(
                default_max_tokens=max_len - n_prompt,
                defaults=getattr(self.engine, "default_sampling", None),
            )
        except ValueError as err:
            raise from_value_error(err) from None
        if params.logit_bias:
            self.check_token_ids(list(params.logit_bias), "logit_bias")
        assert params.max_tokens is not None
        if n_prompt + params.max_tokens > max_len:
            raise bad_request(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the messages "
                f"or completion.",
                param="max_tokens",
            )
        tokenizer = self.engine.tokenizer
        choices = [
            _Choice(
                index=first_index + i,
                detokenizer=IncrementalDetokenizer(tokenizer, prompt_ids, req.skip_special_tokens),
                stop=StopChecker(req.stop_strings, req.include_stop_str_in_output),
            )
            for i in range(params.n)
        ]
        return _SubRequest(request_id, prompt_ids, prompt_text, params, choices)

    # --------------------------------------------------------------------------------- running

    async def _pump(
        self, sub: _SubRequest, req: ChatCompletionRequest | CompletionRequest, queue: asyncio.Queue[Any]
    ) -> None:
        outputs: AsyncIterator[RequestOutput] | None = None
        try:
            outputs = self.engine.add_request(
                sub.request_id, sub.prompt_ids, sub.params, priority=req.priority, cache_salt=req.cache_salt
            )
            async for out in outputs:
                delta = sub.process(out)
                if delta is not None:
                    queue.put_nowait(delta)
                if all(c.done for c in sub.choices):
                    break
            for choice in sub.choices:  # the engine stopped without finishing a choice
                if not choice.done:
                    choice.finish_reason = "abort"
                    queue.put_nowait(_Delta(choice, choice.stop.flush(), [], "abort"))
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            queue.put_nowait(err)
        finally:
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
            if outputs is not None and not sub.engine_finished:
                with contextlib.suppress(Exception):
                    await self.engine.abort(sub.request_id)

    async def run(
        self, subs: list[_SubRequest], req: ChatCompletionRequest | CompletionRequest
    ) -> AsyncGenerator[_Delta, None]:
        """Deltas of all choices of all sub-requests, as they come. Closing it aborts them all."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(sub, req, queue)) for sub in subs]
        for task in tasks:
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)
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

    @staticmethod
    def usage(subs: list[_SubRequest]) -> UsageInfo:
        prompt = sum(len(s.prompt_ids) for s in subs)
        completion = sum(c.num_output_tokens for s in subs for c in s.choices)
        cached = sum(s.num_cached_tokens for s in subs)
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    # ------------------------------------------------------------------------------- logprobs

    def _token_str(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(self, entries: list[TokenLogprob], k: int) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> ChatLogprobTop:
            s = self._token_str(token_id)
            return ChatLogprobTop(token=s, logprob=logprob, bytes=list(s.encode("utf-8")))

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
            result.token_logprobs.append(e.logprob)
            result.text_offset.append(offset)
            offset += len(token)
            best = sorted(e.top.items(), key=lambda kv: -kv[1])[:k]
            tops = {token: e.logprob}
            tops.update({self._token_str(t): lp for t, lp in best})
            result.top_logprobs.append(tops)
        return result


def _log(request_id: str, status: int | str, subs: list[_SubRequest], start: float) -> None:
    prompt = sum(len(s.prompt_ids) for s in subs)
    completion = sum(c.num_output_tokens for s in subs for c in s.choices)
    logger.info(
        "request %s status=%s prompt_tokens=%d completion_tokens=%d latency=%.3fs",
        request_id,
        status,
        prompt,
        completion,
        time.monotonic() - start,
    )


def build_app(
    engine: EngineClient,
    *,
    served_model_names: list[str] | None = None,
    api_keys: list[str] | None = None,
) -> FastAPI:
    """The FastAPI app; `served_model_names` defaults to the engine's model name."""
    server = OpenAIServer(engine, list(served_model_names or [engine.model_name]))
    app = FastAPI(title="pagoda", version=_version())
    app.state.openai_server = server
    install_error_handlers(app)
    if api_keys:
        app.add_middleware(_BearerAuth, api_keys=list(api_keys))

    _register_routes(app, server)
    return app


def _register_routes(app: FastAPI, server: OpenAIServer) -> None:
    engine = server.engine

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        if not engine.is_ready():
            raise APIError(503, "The engine is not ready.")
        return JSONResponse({"status": "ready"})

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @app.get("/v1/models")
    async def models() -> ModelList:
        root = server.served_model_names[0]
        return ModelList(
            data=[
                ModelCard(id=name, root=root, max_model_len=engine.max_model_len)
                for name in server.served_model_names
            ]
        )

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        server.check_model(req.model)
        tokenizer = engine.tokenizer
        if req.messages is not None:
            messages = ChatCompletionRequest(messages=req.messages).template_messages()
            text = _apply_template(server, messages, req.add_generation_prompt)
            add_special = False if req.add_special_tokens is None else req.add_special_tokens
        else:
            assert req.prompt is not None
            text = req.prompt
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs
        )

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        server.check_model(req.model)
        server.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        start = time.monotonic()
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        subs: list[_SubRequest] = []
        try:
            model = server.check_model(req.model)
            prompt = _apply_template(server, req.template_messages(), req.add_generation_prompt)
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
            subs = [server.prepare(request_id, ids, prompt, req, first_index=0)]
        except APIError as err:
            _log(request_id, err.status, subs, start)
            raise
        if req.stream:
            return _SSEResponse(
                _chat_stream(server, req, request_id, model, subs, start), media_type="text/event-stream"
            )
        await _collect(server, subs, req, request_id, start, request)
        k = req.top_logprobs or 0
        choices = [
            ChatCompletionChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=server.chat_logprobs(c.logprobs, k) if req.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in subs[0].choices
        ]
        _log(request_id, 200, subs, start)
        body = ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=server.usage(subs))
        return Response(body.model_dump_json(), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        start = time.monotonic()
        request_id = f"cmpl-{uuid.uuid4().hex}"
        subs: list[_SubRequest] = []
        try:
            model = server.check_model(req.model)
            prompts = req.prompts()
            for i, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    ids, text = engine.tokenizer.encode(prompt, add_special_tokens=True), prompt
                else:
                    server.check_token_ids(prompt, "prompt")
                    ids, text = prompt, engine.tokenizer.decode(prompt)
                sub_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                subs.append(server.prepare(sub_id, ids, text, req, first_index=i * req.n))
        except APIError as err:
            _log(request_id, err.status, subs, start)
            raise
        if req.stream:
            return _SSEResponse(
                _completion_stream(server, req, request_id, model, subs, start),
                media_type="text/event-stream",
            )
        await _collect(server, subs, req, request_id, start, request)
        choices = []
        for sub in subs:
            prefix = sub.prompt_text if req.echo else ""
            for c in sub.choices:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = server.completion_logprobs(c.logprobs, req.logprobs, len(prefix))
                choices.append(
                    CompletionChoice(
                        index=c.index,
                        text=prefix + c.text,
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        _log(request_id, 200, subs, start)
        body = CompletionResponse(id=request_id, model=model, choices=choices, usage=server.usage(subs))
        return Response(body.model_dump_json(), media_type="application/json")


async def _collect(
    server: OpenAIServer,
    subs: list[_SubRequest],
    req: ChatCompletionRequest | CompletionRequest,
    request_id: str,
    start: float,
    request: Request,
) -> None:
    """Runs a non-streaming request to the end; failures are logged and answered as APIErrors.
    If the client disconnects first, the request is aborted (uvicorn does not cancel handlers)."""

    async def consume() -> None:
        async with contextlib.aclosing(server.run(subs, req)) as deltas:
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
            _log(request_id, "disconnected", subs, start)
            raise APIError(499, "Client disconnected.")
        work.result()
    except APIError as err:
        if err.status != 499:
            _log(request_id, err.status, subs, start)
        raise
        _log(request_id, err.status, subs, start)
        raise
    except Exception as err:
        logger.exception("request %s failed", request_id)
        _log(request_id, 500, subs, start)
        raise APIError(500, f"Internal server error ({type(err).__name__}).") from None
    except BaseException:
        _log(request_id, "disconnected", subs, start)
        raise
    finally:
        for task in (work, watch):
            task.cancel()


def _apply_template(server: OpenAIServer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        tokenizer = server.engine.tokenizer
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except APIError:
        raise
    except Exception as err:  # a template's raise_exception() is about the user's messages
        raise bad_request(f"Could not apply the chat template: {err}", param="messages") from None


async def _stream_errors(
    events: AsyncGenerator[str, None], request_id: str, subs: list[_SubRequest], start: float
) -> AsyncIterator[str]:
    """Wraps a stream: an error mid-stream becomes an error event; logs one line at the end."""
    status: int | str = "disconnected"
    try:
        async for event in events:
            yield event
        status = 200
    except APIError as err:
        status = err.status
        yield _sse(json.dumps(err.body()))
        yield _sse("[DONE]")
    except Exception as err:
        logger.exception("request %s failed while streaming", request_id)
        status = 500
        yield _sse(json.dumps(APIError(500, f"Internal server error ({type(err).__name__}).").body()))
        yield _sse("[DONE]")
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
        _log(request_id, status, subs, start)


def _chat_stream(
    server: OpenAIServer,
    req: ChatCompletionRequest,
    request_id: str,
    model: str,
    subs: list[_SubRequest],
    start: float,
) -> AsyncIterator[str]:
    async def events() -> AsyncGenerator[str, None]:
        created = int(time.time())

        def chunk(choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None) -> str:
            body = ChatCompletionChunk(
                id=request_id, created=created, model=model, choices=choices, usage=usage
            )
            return _sse(body.model_dump_json())

        for c in subs[0].choices:
            yield chunk(
                [ChatCompletionChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))]
            )
        k = req.top_logprobs or 0
        async with contextlib.aclosing(server.run(subs, req)) as deltas:
            async for d in deltas:
                if not d.text and not d.logprobs and d.finish_reason is None:
                    continue
                logprobs = server.chat_logprobs(d.logprobs, k) if req.logprobs and d.logprobs else None
                yield chunk(
                    [
                        ChatCompletionChunkChoice(
                            index=d.choice.index,
                            delta=DeltaMessage(content=d.text or None),
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                            stop_reason=d.choice.stop_reason if d.finish_reason else None,
                        )
                    ]
                )
        if req.include_usage_in_stream:
            yield chunk([], usage=server.usage(subs))
        yield _sse("[DONE]")

    return _stream_errors(events(), request_id, subs, start)


def _completion_stream(
    server: OpenAIServer,
    req: CompletionRequest,
    request_id: str,
    model: str,
    subs: list[_SubRequest],
    start: float,
) -> AsyncIterator[str]:
    async def events() -> AsyncGenerator[str, None]:
        created = int(time.time())
        offsets: dict[int, int] = {}  # choice index -> characters streamed so far

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            body = CompletionResponse(
                id=request_id, created=created, model=model, choices=choices, usage=usage
            )
            return _sse(body.model_dump_json(exclude_none=False))

        for sub in subs:
            for c in sub.choices:
                offsets[c.index] = len(sub.prompt_text) if req.echo else 0
                if req.echo:
                    yield chunk([CompletionChoice(index=c.index, text=sub.prompt_text)])
        async with contextlib.aclosing(server.run(subs, req)) as deltas:
            async for d in deltas:
                if not d.text and not d.logprobs and d.finish_reason is None:
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = server.completion_logprobs(d.logprobs, req.logprobs, offsets[d.choice.index])
                offsets[d.choice.index] += len(d.text)
                yield chunk(
                    [
                        CompletionChoice(
                            index=d.choice.index,
                            text=d.text,
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                            stop_reason=d.choice.stop_reason if d.finish_reason else None,
                        )
                    ]
                )
        if req.include_usage_in_stream:
            yield chunk([], usage=server.usage(subs))
        yield _sse("[DONE]")

    return _stream_errors(events(), request_id, subs, start)

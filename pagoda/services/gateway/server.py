"""The OpenAI-compatible HTTP front end over a `Frontend` (pagoda/services/gateway/frontend.py).

It owns what the client connection owns (docs/architecture.md, the gateway): validation, auth, n choices,
incremental detokenization, stop strings, echo, usage, logprobs, SSE, and aborting a request when
its output is no longer wanted (a stop string hit, or the client went away). Tokenization and the
prompt checks belong to the frontend (`submit` answers the prompt ids or raises an APIError);
/tokenize and /detokenize use the server's own tokenizer. The routes live in
routes.py, running the submitted requests in calls.py and writing their SSE streams in streams.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import anyio
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.engine import SamplingParams
from pagoda.services.gateway.adapter_routes import register_adapter_routes
from pagoda.services.gateway.adapters import Adapter, AdapterDirectory
from pagoda.services.gateway.auth import OPEN_PATHS, BearerAuth, key_id
from pagoda.services.gateway.calls import Call, logger
from pagoda.services.gateway.choices import APIRequest, SubRequest
from pagoda.services.gateway.frontend import Frontend, Submitted
from pagoda.services.gateway.limits import BodyGuard, RequestLimits
from pagoda.services.gateway.plain_stream import GatewayApp
from pagoda.services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from pagoda.services.gateway.ratelimit import RateLimiter, estimate_tokens
from pagoda.services.gateway.responses import register_responses
from pagoda.services.gateway.responses_output import ResponseStore
from pagoda.services.gateway.responses_protocol import RESPONSES_TTL_S
from pagoda.services.gateway.routes import register_routes
from pagoda.services.gateway.structured import check as check_structured
from pagoda.services.gateway.structured import structured_outputs_of
from pagoda.services.gateway.tools import ToolPlan
from pagoda.services.ops import tracing
from pagoda.services.ops.metrics import GatewayMetrics, Metrics
from pagoda.services.scheduler.admission import FleetAdmission
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.transport.errors import (
    bad_request,
    from_value_error,
    install_error_handlers,
    model_not_found,
)
from pagoda.services.transport.messages import PromptInput
from pagoda.services.transport.store import InMemoryStore, Store

__all__ = ["ModelEndpoint", "OpenAIServer", "ServedModels", "build_app", "logger"]

PICKED_MODEL = "pagoda_model"  # the request state's key for the model a route picked


def _version() -> str:
    try:
        return metadata.version("pagoda")
    except metadata.PackageNotFoundError:
        return "0.1.0"


class _ResponseCounter:
    """ASGI middleware: counts the API's responses by status (not health, version or metrics),
    labelled with the model a route picked (`ServedModels.pick` notes it in the request's state),
    else with the default model's name."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, model_name: str) -> None:
        self.app = app
        self.metrics = metrics
        self.model_name = model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        status = 499  # the client went away before a response started

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            self.metrics.response(self._model(scope), 500 if status == 499 else status)
            raise
        self.metrics.response(self._model(scope), status)

    def _model(self, scope: Scope) -> str:
        return str(scope.get("state", {}).get(PICKED_MODEL, self.model_name))


class OpenAIServer:
    """Request handling, independent of routing: build with `build_app`."""

    def __init__(
        self,
        frontend: Frontend,
        served_model_names: list[str],
        metrics: Metrics,
        *,
        limits: RequestLimits | None = None,
        rate_limiter: RateLimiter | None = None,
        admission: FleetAdmission | None = None,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
        responses: ResponseStore | None = None,
        adapters: AdapterDirectory | None = None,
    ) -> None:
        self.frontend = frontend
        self.adapters = adapters  # LoRA adapters (--enable-lora); those over this model are served here
        self.served_model_names = served_model_names
        self.metrics = metrics
        self.limits = limits or RequestLimits()
        self.rate_limiter = rate_limiter
        self.admission = admission
        self.reasoning_parser = reasoning_parser  # splits reasoning from content (gateway/reasoning.py)
        # stored Responses API responses (gateway/responses_output.py)
        self.responses = responses or ResponseStore(InMemoryStore())
        # whether the model's chat template renders `tools` itself (gateway/tools.py)
        self.template_knows_tools = "tools" in (getattr(frontend.tokenizer, "chat_template", None) or "")
        # how tool_choice auto reads calls (--tool-call-parser, gateway/tool_parsers.py): in the
        # model's own format where its template renders tools, else in the Hermes format pagoda
        # writes into the prompt for it
        self.tool_parser = (
            tool_call_parser if tool_call_parser is None or self.template_knows_tools else "hermes"
        )
        self._charges: set[asyncio.Task[None]] = set()  # rate-limit top-ups in flight
        self.gateway_metrics = metrics.gateway()
        # the gateway's own tokenizer: chat template for /tokenize, vocabulary for /detokenize
        self.processor = PromptProcessor(frontend.tokenizer, frontend.max_model_len)
        self.pooler = frontend.pooler  # an embedding model: /v1/embeddings only (gateway/embeddings.py)

    def check_model(self, model: str | None) -> str:
        if model is None or model == "":
            return self.served_model_names[0]
        if model not in self.served_model_names and self.lora_of(model) is None:
            raise model_not_found(model)
        return model

    def lora_of(self, model: str) -> Adapter | None:
        """The LoRA adapter over this model that `model` names (None: it names no adapter)."""
        adapter = self.adapters.get(model) if self.adapters is not None else None
        return adapter if adapter is not None and adapter.parent in self.served_model_names else None

    async def sampling_params(
        self, req: ChatCompletionRequest | CompletionRequest, tools: ToolPlan | None = None
    ) -> SamplingParams:
        """Omitted max_tokens stays None: the engine stops at the model's context length. A
        structured-output constraint (or the one tool calls need) is checked against the
        model's tokenizer first."""
        asked = structured_outputs_of(req)
        forced = tools.constraint() if tools is not None else None
        if forced is not None:
            if asked is not None:
                raise bad_request("tool calls and a structured output cannot be combined.", asked[1])
            asked = (forced, "tools")
        if asked is not None:
            await check_structured(*asked, self.frontend.tokenizer)
        try:
            return req.to_sampling_params(self.frontend.default_sampling, asked[0] if asked else None)
        except ValueError as err:
            raise from_value_error(err) from None

    async def admit(
        self, call: Call, request: Request, prompts: list[PromptInput], params: SamplingParams
    ) -> None:
        """The per-key rate limit (429), then room in the fleet (503); both at once, before any
        work is queued. What is taken is given back (or topped up) when the call ends."""
        seqs = len(prompts) * params.n
        if self.rate_limiter is not None:
            key = key_id(request.headers.get("authorization"))
            estimate = estimate_tokens(prompts, params, self.frontend.max_model_len)
            await self.rate_limiter.admit(key, estimate)
            call.on_end.append(lambda used: self._top_up(key, used - estimate))
        if self.admission is not None:
            self.admission.admit(seqs, call.req.priority)
            admission = self.admission
            call.on_end.append(lambda _: admission.release(seqs))

    def _top_up(self, key: str, tokens: int) -> None:
        """Charge the tokens a call used beyond its estimate (a call without max_tokens)."""
        if tokens > 0 and self.rate_limiter is not None:
            task = asyncio.create_task(self.rate_limiter.charge(key, tokens))
            self._charges.add(task)
            task.add_done_callback(self._charges.discard)

    async def submit(
        self, call: Call, prompts: list[PromptInput], params: SamplingParams, session_id: str | None
    ) -> None:
        """Submit one request per prompt (ids `<id>-<i>` when there are several), concurrently,
        and add them to `call.subs` in prompt order. If any is refused, the accepted ones are
        released and the first refusal is raised."""
        req = call.req
        results: dict[int, Submitted] = {}

        async def one(i: int, prompt: PromptInput) -> None:
            results[i] = await self.frontend.submit(
                self._sub_id(call, i, len(prompts)),
                prompt,
                params,
                priority=req.priority,
                cache_salt=req.cache_salt,
                session_id=session_id,
                lora=self.lora_of(call.model),
            )

        if len(prompts) == 1:  # no tasks to run it beside others (a refusal is raised as it is)
            await one(0, prompts[0])
            self._add_sub(call, 0, results[0], prompts)
            return
        tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(prompts)]
        try:
            await asyncio.wait(tasks)
        except BaseException:  # cancelled: release what was accepted meanwhile
            await self._settle(call, tasks, results, prompts)
            await call.release_all()
            raise
        await self._settle(call, tasks, results, prompts)
        errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
        if errors:
            await call.release_all()
            raise errors[0]  # type: ignore[misc]

    async def _settle(
        self,
        call: Call,
        tasks: list[asyncio.Task[None]],
        results: dict[int, Submitted],
        prompts: list[PromptInput],
    ) -> None:
        """Wait for the submit tasks to end; add a SubRequest for each accepted prompt."""
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
        for i, submitted in sorted(results.items()):
            self._add_sub(call, i, submitted, prompts)

    def _add_sub(self, call: Call, i: int, submitted: Submitted, prompts: list[PromptInput]) -> None:
        req, tokenizer = call.req, self.frontend.tokenizer
        text = ""
        if isinstance(req, CompletionRequest) and req.echo:
            given = prompts[i].text
            text = given if given is not None else tokenizer.decode(submitted.prompt_token_ids)
        sub_id = self._sub_id(call, i, len(prompts))
        call.subs.append(SubRequest.of(sub_id, submitted, text, req, tokenizer, first_index=i * req.n))

    @staticmethod
    def _sub_id(call: Call, i: int, count: int) -> str:
        return call.request_id if count == 1 else f"{call.request_id}-{i}"

    def call(self, req: APIRequest, request_id: str) -> Call:
        return Call(
            self.frontend, req, request_id, model="",
            metrics=self.gateway_metrics, metrics_model=self.served_model_names[0],
        )  # fmt: skip


@dataclass(frozen=True)
class ModelEndpoint:
    """One model a gateway serves: its frontend, the names clients use for it (default: the
    model's own) and the gateway's admission for it (None: off)."""

    frontend: Frontend
    names: tuple[str, ...] = ()
    admission: FleetAdmission | None = None


class ServedModels:
    """The models of one gateway, each an `OpenAIServer`; routes pick one by the request's
    `model` (the first serves a request that names none). An unknown name picks the first too,
    whose `check_model` then answers the 404 in the request's usual error path."""

    def __init__(self, servers: list[OpenAIServer], adapters: AdapterDirectory | None = None) -> None:
        assert servers, "a gateway serves at least one model"
        self.servers = servers
        self.default = servers[0]
        self.adapters = adapters
        self._by_name: dict[str, OpenAIServer] = {}
        for server in servers:
            for name in server.served_model_names:
                if name in self._by_name:
                    raise ValueError(f"two models are served as {name!r}; give each its own name")
                self._by_name[name] = server

    def pick(self, model: str | None, request: Request | None = None) -> OpenAIServer:
        """The server of the model `model` names (a LoRA adapter's: its base model's)."""
        adapter = self.adapters.get(model) if self.adapters is not None else None
        server = self._by_name.get(adapter.parent if adapter is not None else model or "", self.default)
        if request is not None:  # for the response counter's model label
            request.scope.setdefault("state", {})[PICKED_MODEL] = server.served_model_names[0]
        return server

    def is_ready(self) -> bool:
        """Some model can serve requests (one without live workers answers 503s of its own)."""
        return any(s.frontend.is_ready() for s in self.servers)


def build_app(
    frontend: Frontend | Sequence[ModelEndpoint],
    *,
    served_model_names: list[str] | None = None,
    api_keys: list[str] | None = None,
    metrics: Metrics | None = None,
    limits: RequestLimits | None = None,
    rate_limiter: RateLimiter | None = None,
    admission: FleetAdmission | None = None,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    store: Store | None = None,
    responses_ttl_s: float = RESPONSES_TTL_S,
    adapters: AdapterDirectory | None = None,
) -> FastAPI:
    """The FastAPI app over `frontend` (`LocalFrontend(engine)` serves an in-process engine), or
    over several models (`ModelEndpoint`s: the first is the default); `served_model_names` and
    `admission` are the one frontend's. GET /metrics serves `metrics` (a fresh registry when
    omitted; pass the one the process's other services share). `limits` bound each request
    (defaults: `RequestLimits()`); `rate_limiter` and `admission` are off unless given;
    `tool_call_parser` (--tool-call-parser) lets tool_choice `auto` read the model's calls;
    `reasoning_parser` (--reasoning-parser) splits reasoning from content. Stored responses of
    the Responses API live in `store` (the deployment's; a private in-memory one when omitted)
    for `responses_ttl_s` seconds (--responses-ttl). `adapters`: the LoRA adapters served over
    the models (--enable-lora: with /v1/load_lora_adapter and /v1/unload_lora_adapter)."""
    if isinstance(frontend, Sequence):
        endpoints = list(frontend)
    else:
        endpoints = [ModelEndpoint(frontend, tuple(served_model_names or ()), admission)]
    metrics = metrics if metrics is not None else Metrics()
    responses = ResponseStore(store or InMemoryStore(), responses_ttl_s)
    models = ServedModels([
        OpenAIServer(
            e.frontend, list(e.names or [e.frontend.model_name]), metrics, limits=limits,
            rate_limiter=rate_limiter, admission=e.admission, tool_call_parser=tool_call_parser,
            reasoning_parser=reasoning_parser, responses=responses, adapters=adapters,
        )
        for e in endpoints
    ], adapters)  # fmt: skip
    server = models.default
    start_only = frozenset({BodyGuard, BearerAuth, _ResponseCounter, tracing.TraceMiddleware})
    app = GatewayApp(start_only=start_only, title="pagoda", version=_version())
    app.state.openai_server = server
    app.state.served_models = models
    install_error_handlers(app)
    app.add_middleware(BodyGuard, limits=server.limits)  # innermost: only authorized bodies are read
    if api_keys:
        app.add_middleware(BearerAuth, api_keys=list(api_keys))
    default_name = server.served_model_names[0]
    app.add_middleware(_ResponseCounter, metrics=server.gateway_metrics, model_name=default_name)
    if tracing.enabled():
        app.add_middleware(tracing.TraceMiddleware)  # outermost
    register_routes(app, models)
    register_responses(app, models)
    if adapters is not None:
        register_adapter_routes(app, models, adapters)
    return app

"""Limits on what one request may ask for, so that hostile input gets a clear 4xx and never a
500, a hang, or a worker that falls over.

Two layers:
- `BodyGuard` (ASGI middleware) reads a request body before anything parses it: more than
  `max_body_bytes` (by Content-Length or, for a chunked body, as it arrives) is a 413; a body that
  is not UTF-8, or whose JSON nests deeper than `max_json_depth`, is a 400.
- `check_request` checks a parsed completion request: n, max_tokens, stop strings, logit_bias,
  stop_token_ids, the number of prompts and lone surrogates, each with the limit in the message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from pagoda.services.gateway.unsupported import refused_field
from pagoda.services.transport.errors import APIError, bad_request


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits (`pagoda serve --max-...`); `max_tokens` None means the context length."""

    max_body_bytes: int = 8 * 2**20
    max_json_depth: int = 32
    max_n: int = 128
    max_tokens: int | None = None
    max_stop: int = 16
    max_stop_chars: int = 1024
    max_logit_bias: int = 1024
    max_stop_token_ids: int = 1024
    max_prompts: int = 256

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_json_depth", "max_n", "max_stop", "max_logit_bias"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens limit must be at least 1, got {self.max_tokens}")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the server's limit of {limit} bytes.")


# ------------------------------------------------------------------------------------ the body

# A JSON string (possessive: linear on hostile input), then everything that is not a bracket.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """How deeply the JSON text `body` nests arrays and objects (0 for a scalar)."""
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def check_body(body: bytes, limits: RequestLimits) -> None:
    """Raise APIError(400) for a body that is not UTF-8 or nests too deeply."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad_request(
            f"The request body is not valid UTF-8 (byte {err.start}: {err.reason}); send UTF-8 JSON."
        ) from None
    if body.count(b"[") + body.count(b"{") > limits.max_json_depth:  # else it cannot nest deeper
        depth = json_depth(body)
        if depth > limits.max_json_depth:
            raise bad_request(
                f"The request body's JSON nests {depth} levels deep; the limit is {limits.max_json_depth}."
            )


class BodyGuard:
    """ASGI middleware: reads each request body (up to the limit), checks it, then hands it on."""

    def __init__(self, app: ASGIApp, limits: RequestLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await too_large(limit).response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before it finished sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(limit).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            check_body(body, self.limits)
        except APIError as err:
            await err.response()(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then the client's later messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --------------------------------------------------------------------------------- the request


def check_unicode(text: str, param: str) -> None:
    """JSON may escape a lone surrogate ("\\ud800") that no tokenizer can take: a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad_request(
            f"{param} is not valid Unicode: a lone surrogate {text[err.start]!a} at position {err.start}.",
            param=param,
        ) from None


def check_request(
    req: ChatCompletionRequest | CompletionRequest, limits: RequestLimits, max_model_len: int
) -> None:
    """Raise APIError(400), naming the field and the limit, for a request over `limits` or a
    field pagoda cannot honour yet."""
    refused = refused_field(req)
    if refused is not None:
        param, why = refused
        raise bad_request(f"{why}; remove {param} from the request.", param=param)
    if req.n > limits.max_n:
        raise bad_request(f"n {req.n} exceeds the server's limit of {limits.max_n}.", param="n")
    max_tokens = req.requested_max_tokens()
    cap = limits.max_tokens if limits.max_tokens is not None else max_model_len
    if max_tokens is not None and max_tokens > cap:
        chat_field = isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None
        name = "max_completion_tokens" if chat_field else "max_tokens"
        raise bad_request(f"{name} {max_tokens} exceeds the server's limit of {cap}.", param=name)
    stops = req.stop_strings
    if len(stops) > limits.max_stop:
        raise bad_request(
            f"stop has {len(stops)} strings; the server's limit is {limits.max_stop}.", param="stop"
        )
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise bad_request(
            f"a stop string is longer than the server's limit of {limits.max_stop_chars} characters.",
            param="stop",
        )
    if req.logit_bias and len(req.logit_bias) > limits.max_logit_bias:
        raise bad_request(
            f"logit_bias has {len(req.logit_bias)} entries; the server's limit is {limits.max_logit_bias}.",
            param="logit_bias",
        )
    if req.stop_token_ids and len(req.stop_token_ids) > limits.max_stop_token_ids:
        raise bad_request(
            f"stop_token_ids has {len(req.stop_token_ids)} entries; the server's limit is "
            f"{limits.max_stop_token_ids}.",
            param="stop_token_ids",
        )
    if isinstance(req, CompletionRequest):
        count = len(req.prompts())
        if count > limits.max_prompts:
            raise bad_request(
                f"prompt is a batch of {count} prompts; the server's limit is {limits.max_prompts}.",
                param="prompt",
            )
    texts: list[tuple[str, str]] = [("stop", t) for t in stops]
    if isinstance(req, CompletionRequest):
        texts += [("prompt", p) for p in req.prompts() if isinstance(p, str)]
    else:
        texts += [("messages", m.text()) for m in req.messages]
    for param, text in texts:
        check_unicode(text, param)

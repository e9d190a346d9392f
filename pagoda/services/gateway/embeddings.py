"""POST /v1/embeddings: OpenAI's request and response, served by a pooling model (`--task embed`).

Each input is one engine request whose prompt is pooled instead of continued (a decoder's last
token, or an encoder's CLS or mean: pagoda/engine/pooling); inputs of one call run as separate
sub-requests through the same path as completions (admission, rate limits, submission, the
client-gone watch), so they share engine steps with everything else in flight. The `openai` SDK
asks for `encoding_format="base64"` unless told otherwise: little-endian float32, base64-coded.
"""

from __future__ import annotations

import array
import base64
import sys
import time
import uuid
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagoda.engine import PoolingParams, SamplingParams
from pagoda.services.transport.errors import bad_request
from pagoda.services.transport.messages import PromptInput

if TYPE_CHECKING:
    from pagoda.services.gateway.calls import Call
    from pagoda.services.gateway.server import OpenAIServer


class EmbeddingRequest(BaseModel):
    """OpenAI's fields, and vLLM's `normalize`, `truncate_prompt_tokens`, `add_special_tokens`
    and `priority`. The ClassVars are what the completion machinery reads of a request."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool | None = None  # None: the model's own (normalized, unless it states otherwise)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # keep the last N (-1: context)
    add_special_tokens: bool = True
    priority: int = 0

    n: ClassVar[int] = 1
    cache_salt: ClassVar[str | None] = None
    skip_special_tokens: ClassVar[bool] = True
    stop_strings: ClassVar[list[str]] = []
    include_stop_str_in_output: ClassVar[bool] = False


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


def new_id() -> str:
    return f"embd-{uuid.uuid4().hex}"


def embedding_prompts(req: EmbeddingRequest, server: OpenAIServer) -> list[PromptInput]:
    """One prompt per input, after the checks that need no tokenizer (400s naming the field)."""
    raw = req.input
    inputs: list[str] | list[list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        inputs = [raw]  # type: ignore[assignment]  # one prompt of token ids
    else:
        inputs = raw  # type: ignore[assignment]
    if not inputs or any(len(x) == 0 for x in inputs):
        raise bad_request("input must not be empty, nor hold an empty string or token list.", "input")
    limit = server.limits.max_prompts
    if len(inputs) > limit:
        raise bad_request(f"input has {len(inputs)} entries; the server's limit is {limit}.", "input")
    keep = req.truncate_prompt_tokens
    return [
        PromptInput(text=x, add_special_tokens=req.add_special_tokens, truncate_prompt_tokens=keep)
        if isinstance(x, str)
        else PromptInput(token_ids=list(x), truncate_prompt_tokens=keep)
        for x in inputs
    ]


def embedding_params(req: EmbeddingRequest, server: OpenAIServer) -> SamplingParams:
    """The engine's params of the call: refused (400) when the model does not pool, or when it
    cannot give the `dimensions` asked for."""
    pooler = server.pooler
    if pooler is None:
        raise bad_request(
            "The model does not support the Embeddings API: it generates text. Start pagoda with "
            "--task embed to serve embeddings from it.",
            "model",
        )
    dims = req.dimensions
    if dims is not None and not pooler.matryoshka:
        raise bad_request(
            "The model does not support matryoshka representation: dimensions cannot be set.", "dimensions"
        )
    if dims is not None and dims < 1:  # above the model's size: the engine's check (it knows it)
        raise bad_request(f"dimensions must be at least 1, got {dims}.", "dimensions")
    return SamplingParams(max_tokens=1, pooling=PoolingParams(dimensions=dims, normalize=req.normalize))


def embedding_response(call: Call, req: EmbeddingRequest) -> EmbeddingResponse:
    """The collected call's vectors, in input order, as floats or base64 (float32, little-endian)."""
    data = []
    for i, sub in enumerate(call.subs):
        vec = sub.choices[0].embedding
        if vec is None:
            raise RuntimeError(f"sub-request {sub.request_id} finished without an embedding")
        data.append(
            EmbeddingData(index=i, embedding=_base64(vec) if req.encoding_format == "base64" else vec)
        )
    prompt = sum(len(s.prompt_ids) for s in call.subs)
    call.log(200)
    usage = EmbeddingUsage(prompt_tokens=prompt, total_tokens=prompt)
    return EmbeddingResponse(id=call.request_id, model=call.model, data=data, usage=usage)


def _base64(vec: list[float]) -> str:
    packed = array.array("f", vec)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")

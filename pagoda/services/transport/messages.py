"""Messages between the services, grouped by the service that receives them.

Every message travels as a versioned JSON envelope `{"v": 1, "type": ..., "body": {...}}`. The bus
moves bytes; `encode`/`decode` are the only place that knows the wire format. A malformed or unknown
message raises `MessageError`, which consumers log and drop: it never kills a service.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator

from pagoda.engine import PoolingParams, RequestOutput, SamplingParams, StructuredOutputsParams, TokenLogprob

WIRE_VERSION = 2  # 2: the tokenizer no longer sends "accepted"; the first "assigned" carries the prompt ids


@dataclass(frozen=True)
class Queues:
    """Queue names of one deployment. Work queues are durable and shared by all instances of a
    tier; the namespace keeps deployments (and test runs) on one broker apart."""

    namespace: str = "pagoda"

    def tokenize(self, model: str) -> str:
        """The tokenizers of one served model share a queue (each knows one model's tokenizer)."""
        return f"{self.namespace}.tokenize.{model}"

    @property
    def schedule(self) -> str:
        return f"{self.namespace}.schedule"

    def worker(self, worker_id: str) -> str:
        return f"{self.namespace}.worker.{worker_id}"

    def reply(self, gateway_id: str) -> str:
        return f"{self.namespace}.reply.{gateway_id}"


class MessageError(ValueError):
    """A message that cannot be decoded; log it and drop it."""


class _Msg(BaseModel):
    # inf/nan as JSON's Infinity/NaN (what json.dumps wrote before), not null
    model_config = ConfigDict(extra="ignore", frozen=True, ser_json_inf_nan="constants")


class SamplingSpec(_Msg):
    """SamplingParams on the wire (logit_bias keys as strings, as JSON wants them)."""

    n: int = 1
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    structured_outputs: dict[str, str] | None = None  # StructuredOutputsParams.to_wire()
    pooling: dict[str, Any] | None = None  # PoolingParams' fields: an embedding request

    @classmethod
    def of(cls, p: SamplingParams) -> SamplingSpec:
        return cls(
            n=p.n, max_tokens=p.max_tokens, min_tokens=p.min_tokens, temperature=p.temperature,
            top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, seed=p.seed,
            repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logit_bias={str(k): v for k, v in p.logit_bias.items()} if p.logit_bias else None,
            logprobs=p.logprobs, stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
            structured_outputs=p.structured_outputs.to_wire() if p.structured_outputs else None,
            pooling=dataclasses.asdict(p.pooling) if p.pooling else None,
        )  # fmt: skip

    def to_params(self) -> SamplingParams:
        data = self.model_dump()
        data["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        data["stop_token_ids"] = tuple(self.stop_token_ids)
        so = self.structured_outputs
        data["structured_outputs"] = StructuredOutputsParams.from_wire(so) if so else None
        data["pooling"] = PoolingParams(**self.pooling) if self.pooling is not None else None
        return SamplingParams(**data)


class PromptInput(_Msg):
    """What the client sent as its prompt: chat messages, text, or token ids (exactly one)."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None  # for a chat template that renders tools itself
    truncate_prompt_tokens: int | None = None  # keep the prompt's last N tokens (-1: max_model_len)


# -- to the tokenizer -------------------------------------------------------------------------
class TokenizeRequest(_Msg):
    type: Literal["tokenize"] = "tokenize"
    request_id: str
    reply_to: str  # the gateway's reply queue
    model: str = ""  # the served model name; the scheduler routes to its workers ("": any worker)
    lora_name: str | None = None  # a LoRA adapter over the model (gateway/adapters.py)
    lora_path: str | None = None  # where its worker loads it from, on first use
    prompt: PromptInput
    sampling: SamplingSpec
    priority: int = 0
    cache_salt: str | None = None
    session_id: str | None = None
    arrival_time: float = 0.0
    queue_timeout_s: float | None = None  # fail it if it has not started this long after arrival


# -- to the scheduler -------------------------------------------------------------------------
class ScheduleRequest(_Msg):
    type: Literal["schedule"] = "schedule"
    request_id: str
    reply_to: str
    model: str = ""  # the served model name: only its workers may run it ("": any worker)
    lora_name: str | None = None  # a LoRA adapter over the model: workers holding it are preferred
    lora_path: str | None = None  # where a worker loads it from, on first use
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    priority: int = 0
    cache_salt: str | None = None
    session_id: str | None = None
    arrival_time: float = 0.0
    queue_timeout_s: float | None = None  # fail it if it has not started this long after arrival
    # Failover: attempt 0 is the client's request; a re-run after a worker was lost (or bounced by a
    # draining worker) counts up, and `resume_from` output tokens are already in `prompt_token_ids`.
    attempt: int = 0
    resume_from: int = 0


# -- to a worker ------------------------------------------------------------------------------
class WorkerRequest(ScheduleRequest):
    type: Literal["run"] = "run"  # type: ignore[assignment]


class AbortRequest(_Msg):
    type: Literal["abort"] = "abort"
    request_ids: list[str]


# -- to a gateway -----------------------------------------------------------------------------
class Assigned(_Msg):
    """The scheduler sent the request (attempt) to this worker; sent before the worker has it, so
    the gateway knows whose heartbeats to watch and which worker's deltas to take. The first
    attempt's also carries the prompt ids the tokenizer made (for echo, usage, detokenization):
    it is the gateway's word that the request was taken, one message fewer than a separate
    "accepted" from the tokenizer."""

    type: Literal["assigned"] = "assigned"
    request_id: str
    worker_id: str
    attempt: int = 0
    resume_from: int = 0
    prompt_token_ids: list[int] | None = None  # attempt 0 only


class WorkerLeaving(_Msg):
    """A drained worker is about to exit; sent down each reply queue after its last deltas, so a
    request of this worker still unfinished when the gateway reads it will get no more tokens."""

    type: Literal["leaving"] = "leaving"
    worker_id: str


class Rejected(_Msg):
    """A request that will not run, with the HTTP status and message the client gets."""

    type: Literal["rejected"] = "rejected"
    request_id: str
    status: int
    message: str
    param: str | None = None
    retry_after_s: int | None = None  # sent to the client as Retry-After


class TokenDelta(_Msg):
    request_id: str
    index: int
    new_token_ids: list[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    # [token_id, logprob, {top id: logprob}] per new token, when asked for
    logprobs: list[tuple[int, float, dict[str, float]]] | None = None
    finished: bool = False
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_token_id: int | None = None
    embedding: list[float] | None = None  # a pooling request's result

    @classmethod
    def of(cls, out: RequestOutput) -> TokenDelta:
        lps = None
        if out.new_logprobs is not None:
            lps = [
                (lp.token_id, lp.logprob, {str(k): v for k, v in lp.top.items()}) for lp in out.new_logprobs
            ]
        return cls(
            request_id=out.request_id, index=out.index, new_token_ids=out.new_token_ids,
            num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
            num_output_tokens=out.num_output_tokens, logprobs=lps, finished=out.finished,
            finish_reason=out.finish_reason, stop_token_id=out.stop_token_id, embedding=out.embedding,
        )  # fmt: skip

    def to_output(self) -> RequestOutput:
        lps = None
        if self.logprobs is not None:
            lps = [TokenLogprob(t, lp, {int(k): v for k, v in top.items()}) for t, lp, top in self.logprobs]
        return RequestOutput(
            request_id=self.request_id, new_token_ids=self.new_token_ids, index=self.index,
            num_prompt_tokens=self.num_prompt_tokens, num_cached_tokens=self.num_cached_tokens,
            num_output_tokens=self.num_output_tokens, new_logprobs=lps, finished=self.finished,
            finish_reason=self.finish_reason, stop_token_id=self.stop_token_id, embedding=self.embedding,
        )  # fmt: skip


class StepOutputs(_Msg):
    """One message per gateway per worker step: the new tokens of all its requests."""

    type: Literal["step"] = "step"
    worker_id: str
    deltas: list[TokenDelta]


# -- through the store: the scheduler and gateways read it -----------------------------------
WorkerStatus = Literal["ready", "draining", "stalled", "stopped"]


class WorkerHeartbeat(_Msg):
    """A worker's state, load and capacity, written every heartbeat by the worker's registry
    (pagoda/services/scheduler/registry.py); schedulers route on it, gateways watch `state`.

    `state`: "ready"; "draining" (finishes its requests, takes no new ones); "stalled" (its step
    loop stopped advancing, or its engine died: its requests move); "stopped" (a drained worker's
    tombstone). It travels through the store, not the bus, as the hash `worker:<id>` with one field
    per figure (`to_fields`/`from_fields`, values as strings; the id is the key's): a TTL on the
    key expires a silent worker, `HGETALL` reads it in redis-cli, and the fields are the ones
    workers wrote before this model existed. A hash that is not a whole heartbeat raises
    MessageError: readers log it and skip that worker, as consumers drop a malformed message."""

    worker_id: str
    state: WorkerStatus
    model: str
    num_running: int = Field(ge=0)
    num_waiting: int = Field(ge=0)  # in the engine's queue or not yet taken in
    kv_usage: float = Field(ge=0.0)  # fraction of KV blocks in use
    kv_live_tokens: int = Field(ge=0)
    kv_live_token_ratio: float = Field(ge=0.0)
    max_num_seqs: int = Field(ge=1)
    block_size: int = Field(ge=1)  # the prefix router hashes prompts in blocks of this size
    num_blocks: int = Field(ge=0)  # 0: no KV cache is modeled (the simulated engine)
    num_free_blocks: int = Field(ge=0)
    steps: int = Field(ge=0)  # engine steps that made progress
    last_seen: float = 0.0  # wall-clock time of the write, stamped by the registry
    loras: tuple[str, ...] = ()  # the LoRA adapters it holds loaded (one field, a name per line)

    @field_validator("loras", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        return tuple(n for n in value.split("\n") if n) if isinstance(value, str) else value

    def to_fields(self) -> dict[str, str]:
        fields = self.model_dump(mode="json", exclude={"worker_id", "loras"})
        return {**{k: str(v) for k, v in fields.items()}, "loras": "\n".join(self.loras)}

    @classmethod
    def from_fields(cls, worker_id: str, fields: dict[str, str]) -> WorkerHeartbeat:
        try:
            return cls.model_validate({**fields, "worker_id": worker_id})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            count = exc.error_count()
            raise MessageError(
                f"bad heartbeat of worker {worker_id}: {count} errors, first: {where}: {first['msg']}"
            ) from None


ServiceMessage = (
    TokenizeRequest
    | ScheduleRequest
    | WorkerRequest
    | AbortRequest
    | Assigned
    | WorkerLeaving
    | Rejected
    | StepOutputs
)
_TYPES: dict[str, type[BaseModel]] = {
    "tokenize": TokenizeRequest,
    "schedule": ScheduleRequest,
    "run": WorkerRequest,
    "abort": AbortRequest,
    "assigned": Assigned,
    "leaving": WorkerLeaving,
    "rejected": Rejected,
    "step": StepOutputs,
}


# What `encode` writes before a message's type: `decode` parses such an envelope straight into
# its model (one pass in pydantic-core, no dicts in between), ~2.4x faster for a StepOutputs.
_PREFIX = b'{"v":%d,"type":"' % WIRE_VERSION


def _envelope(name: str, cls: type[BaseModel]) -> TypeAdapter[Any]:
    fields: dict[str, Any] = {"v": (Literal[WIRE_VERSION], ...), "type": (Literal[name], ...)}
    fields["body"] = (cls, ...)
    return TypeAdapter(create_model(f"{cls.__name__}Envelope", **fields))


_ENVELOPES = {name.encode(): _envelope(name, cls) for name, cls in _TYPES.items()}


def encode(msg: ServiceMessage) -> bytes:
    """The envelope of `msg`. A StepOutputs leaves out its deltas' fields that hold their default
    (no logprobs, not finished, ...): a third fewer bytes per token, the same message decoded."""
    body = msg.model_dump_json(exclude={"type"}, exclude_defaults=isinstance(msg, StepOutputs))
    return b"".join((_PREFIX, msg.type.encode(), b'","body":', body.encode(), b"}"))


def decode(data: bytes) -> ServiceMessage:
    if data.startswith(_PREFIX):  # the usual case: one of ours
        end = data.find(b'"', len(_PREFIX))
        envelope = _ENVELOPES.get(data[len(_PREFIX) : end])
        if envelope is not None:
            try:
                return envelope.validate_json(data).body  # type: ignore[no-any-return]
            except ValidationError:
                pass  # let the checks below say what is wrong (or accept what they accept)
    return _decode_checked(data)


def _decode_checked(data: bytes) -> ServiceMessage:
    try:
        env = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(env, dict):
        raise MessageError("envelope is not an object")
    if env.get("v") != WIRE_VERSION:
        raise MessageError(f"wire version {env.get('v')!r} is not {WIRE_VERSION}")
    cls = _TYPES.get(str(env.get("type")))
    if cls is None:
        raise MessageError(f"unknown message type {env.get('type')!r}")
    body = env.get("body")
    if not isinstance(body, dict):
        raise MessageError("body is not an object")
    try:
        return cls.model_validate(body)  # type: ignore[return-value]
    except ValidationError as exc:
        raise MessageError(
            f"bad {env['type']} message: {exc.error_count()} errors, first: {exc.errors()[0]['msg']}"
        ) from None

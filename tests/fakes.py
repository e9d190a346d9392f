"""Test doubles shared by the unit tests."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from pagoda.engine.core.stats import CoreCounters, EngineCapacity
from pagoda.engine.outputs import RequestOutput, TokenLogprob
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.frontend import LocalFrontend
from pagoda.services.transport.messages import WorkerHeartbeat

if TYPE_CHECKING:
    from pagoda.engine import AsyncEngine

BOS, EOS, EOT = 256, 257, 258
_SPECIAL = {BOS: "<s>", EOS: "</s>", EOT: "<|eot|>"}


@functools.cache
def _byte_backend() -> Tokenizer:
    chars = pre_tokenizers.ByteLevel.alphabet()
    table = {b: c for b, c in zip(range(256), sorted(chars, key=lambda c: _byte_of(c)), strict=True)}
    backend = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([_SPECIAL[i] for i in sorted(_SPECIAL)])
    return backend


def _byte_of(char: str) -> int:
    """The byte GPT-2's byte-level alphabet maps to `char`."""
    n = ord(char)
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    if n in printable:
        return n
    others = [b for b in range(256) if b not in printable]
    return others[n - 256]


class FakeTokenizer:
    """Byte-level: ids 0..255 are bytes; 256-258 are special. Chat template is plain text."""

    vocab_size = 259
    bos_token_id = BOS
    eos_token_ids = (EOS,)
    add_bos_token = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if not (skip_special_tokens and self.is_special(i))]
        return self.convert_tokens_to_string(self.convert_ids_to_tokens(ids))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [_SPECIAL[i] if i in _SPECIAL else f"<0x{i:02X}>" for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        out, buf = [], bytearray()
        for t in tokens:
            if t.startswith("<0x"):
                buf.append(int(t[3:5], 16))
            else:
                out.append(buf.decode("utf-8", errors="replace") + t)
                buf = bytearray()
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def is_special(self, token_id: int) -> bool:
        return token_id in _SPECIAL

    @property
    def backend(self) -> Tokenizer:
        """The same vocabulary as a `tokenizers` byte-level model (what llguidance reads)."""
        return _byte_backend()

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Plain text; `tools` (for a test that sets a `chat_template` naming them) as JSON first."""
        if messages[0]["role"] == "assistant":
            raise ValueError("Conversation must not start with an assistant message")
        text = f"<tools>{json.dumps(tools)}\n" if tools else ""
        text += "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


MODEL = "fake-model"
SCRIPT = "Hello world! Ça va? 🙂 The end. "


class FakeEngine:
    """What LocalFrontend uses of an AsyncEngine. Choice i emits SCRIPT's bytes then EOS, one
    token a step, its first byte replaced by chr(ord('A') + i) when i > 0 (so choices differ).
    Records requests, aborts and early closes."""

    model_name = MODEL
    max_model_len = 256

    def list_loras(self) -> list[str]:
        return []

    def __init__(self, step_delay: float = 0.0, script: str = SCRIPT) -> None:
        self.tokenizer = FakeTokenizer()
        self.default_sampling: dict[str, float] = {}
        self.step_delay = step_delay
        self.script = script
        self.requests: list[tuple[str, list[int], SamplingParams, int, str | None]] = []
        self.aborted: set[str] = set()  # by abort()
        self.closed_early: set[str] = set()  # iterator closed before every choice finished
        self.ready = True
        self.inf_logprobs = False

    def _tokens(self, index: int) -> list[int]:
        data = list(self.script.encode("utf-8"))
        if index:
            data[0] = ord("A") + index
        return [*data, EOS]

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        assert lora_name is None, "the fake engine serves no adapters"
        self.requests.append((request_id, list(prompt_token_ids), params, priority, cache_salt))
        return self._generate(request_id, list(prompt_token_ids), params)

    async def _generate(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        streams = [self._tokens(i) for i in range(params.n)]
        counts = [0] * params.n
        live = set(range(params.n))
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
        cached = 4 if len(prompt) >= 8 else 0
        try:
            while live:
                await asyncio.sleep(self.step_delay)
                for i in sorted(live):
                    if request_id in self.aborted:
                        return
                    tok = streams[i][counts[i] % len(streams[i])]
                    counts[i] += 1
                    lp = None
                    if params.logprobs is not None:
                        top = {(tok + j) % 256: -0.5 * (j + 1) for j in range(params.logprobs)}
                        if self.inf_logprobs and params.logprobs > 1:
                            top[(tok + 1) % 256] = -math.inf  # a token the sampler filtered out
                        lp = [TokenLogprob(tok, -0.5, top)]
                    finish: Any = None
                    if tok in stops and counts[i] > params.min_tokens:
                        finish = "stop"
                    elif params.max_tokens is not None and counts[i] >= params.max_tokens:
                        finish = "length"
                    elif len(prompt) + counts[i] >= self.max_model_len:
                        finish = "length"
                    if finish:
                        live.discard(i)
                    yield RequestOutput(
                        request_id,
                        [tok],
                        i,
                        len(prompt),
                        cached,
                        counts[i],
                        lp,
                        finished=finish is not None,
                        finish_reason=finish,
                        stop_token_id=tok if finish == "stop" else None,
                    )
        finally:
            if live:
                self.closed_early.add(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def is_ready(self) -> bool:
        return self.ready


TICK_S = 0.01


@dataclass
class SlotSeq:
    request_id: str
    max_tokens: int
    done: int = 0


class SlotEngine:
    """What WorkerService needs of an AsyncEngine: `slots` sequences run at once, one token a
    tick each, the rest wait in order. No model, no KV cache. While `paused`, waiting sequences
    still take free slots but none makes progress (a test holds requests in flight without racing
    the clock)."""

    model_name = "fake-model"

    def list_loras(self) -> list[str]:
        return []

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.running: list[SlotSeq] = []
        self.waiting: list[SlotSeq] = []
        self.sink: Callable[[list[RequestOutput], list[bytes], list[bytes]], None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.dead_reason = None
        self.steps = 0
        self.prefilling = 0  # what counters() reports as num_prefilling (a test sets it)
        self.paused = False
        self.capacity = EngineCapacity(max_num_seqs=slots, block_size=16, num_blocks=100)

    def counters(self) -> CoreCounters:
        return CoreCounters(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_usage=0.0,
            prefix_query_tokens=0,
            prefix_hit_tokens=0,
            num_preemptions=0,
            num_prefilling=self.prefilling,
            num_free_blocks=100,
        )

    def cached_block_hashes(self) -> list[bytes]:
        return []

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def set_sink(self, sink: Any, reject: Any = None) -> None:
        self.sink = sink

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def shutdown(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, **_: Any) -> None:
        self.waiting.append(SlotSeq(request_id, params.max_tokens or 16))

    async def abort(self, request_id: str) -> None:
        self.waiting = [s for s in self.waiting if s.request_id != request_id]
        self.running = [s for s in self.running if s.request_id != request_id]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            while self.waiting and len(self.running) < self.slots:
                self.running.append(self.waiting.pop(0))
            if self.paused:
                continue
            outs = []
            for s in list(self.running):
                s.done += 1
                fin = s.done >= s.max_tokens
                outs.append(RequestOutput(s.request_id, [65], 0, 3, 0, s.done, finished=fin,
                                          finish_reason="length" if fin else None))  # fmt: skip
                if fin:
                    self.running.remove(s)
            if outs and self.sink is not None:
                self.steps += 1
                self.sink(outs, [], [])


def local_frontend(engine: FakeEngine) -> LocalFrontend:
    """The server's Frontend over a FakeEngine, which stands in for an AsyncEngine."""
    return LocalFrontend(cast("AsyncEngine", engine))


def heartbeat(worker_id: str, **figures: Any) -> WorkerHeartbeat:
    """An idle, ready worker's heartbeat, with `figures` in place of its defaults."""
    idle: dict[str, Any] = {
        "state": "ready", "model": MODEL, "num_running": 0, "num_waiting": 0, "kv_usage": 0.0,
        "kv_live_tokens": 0, "kv_live_token_ratio": 0.0, "max_num_seqs": 256, "block_size": 16,
        "num_blocks": 100, "num_free_blocks": 100, "steps": 0,
    }  # fmt: skip
    return WorkerHeartbeat(worker_id=worker_id, **{**idle, **figures})

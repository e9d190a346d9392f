"""A simulated engine core: the worker's interface with no model, for measuring the control plane.

`SimCore` is stepped by `AsyncEngine` exactly like `EngineCore`. Each step takes `step_ms` of wall
time (sleeping off what the bookkeeping did not use) and emits one token for every running
sequence, at most `max_batch` of them; the rest wait in arrival order. A request's first token
comes from its first step (prefill is not modeled). Token ids are drawn deterministically (seeded
by the prompt and choice index) from single-token English words of the tokenizer in use, so
streamed text decodes cleanly. A sequence ends on max_tokens, the model's context, a stop token
id, or (unless ignore_eos; never before min_tokens) EOS drawn with probability `eos_prob` per token.
No KV cache is modeled: the KV figures stay at zero, no block is cached, and the capacity it
announces has no blocks (its block size only sets how the cluster scheduler hashes prompts).
"""

from __future__ import annotations

import random
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

from pagoda.engine.core.stats import CoreCounters, EngineCapacity, StepStats
from pagoda.engine.lora.request import LoRARequest
from pagoda.engine.outputs import FinishReason, RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.request import check_prompt_ids
from pagoda.engine.tokenization.tokenizer import Tokenizer

# common English words, one token each with a leading space in the usual BPE vocabularies
_WORDS = (
    "the of and to in is it you that he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their"
).split()


@dataclass(frozen=True)
class SimConfig:
    step_ms: float = 20.0  # wall time of one step
    max_batch: int = 256  # most sequences stepped at once
    eos_prob: float = 0.0  # chance per token of EOS (0: run to max_tokens)
    seed: int = 0
    block_size: int = 16  # announced to the cluster scheduler, which hashes prompts in such blocks

    def __post_init__(self) -> None:
        if self.step_ms < 0:
            raise ValueError(f"--sim-step-ms must be >= 0, got {self.step_ms}")
        if self.max_batch < 1:
            raise ValueError(f"--sim-max-batch must be at least 1, got {self.max_batch}")
        if not 0.0 <= self.eos_prob <= 1.0:
            raise ValueError(f"--sim-eos-prob must be in [0, 1], got {self.eos_prob}")
        if self.block_size < 1:
            raise ValueError(f"SimConfig.block_size must be at least 1, got {self.block_size}")


@dataclass(eq=False)  # compared by identity in the run lists
class _Seq:
    parent_id: str
    index: int
    num_prompt_tokens: int
    params: SamplingParams
    rng: random.Random
    output_ids: list[int] = field(default_factory=list)


def word_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of " word" pieces that are one ordinary token each; a fallback range otherwise."""
    ids: list[int] = []
    for word in _WORDS:
        enc = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(enc) == 1 and not tokenizer.is_special(enc[0]):
            ids.append(enc[0])
    if not ids:
        ids = [i for i in range(min(tokenizer.vocab_size, 1000)) if not tokenizer.is_special(i)]
    return sorted(set(ids))


class SimCore:
    def __init__(
        self,
        tokenizer: Tokenizer,
        model_name: str,
        max_model_len: int,
        sim: SimConfig | None = None,
        default_sampling: dict[str, float] | None = None,
    ) -> None:
        self.sim = sim or SimConfig()
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.default_sampling = dict(default_sampling or {})
        self.capacity = EngineCapacity(self.sim.max_batch, self.sim.block_size, num_blocks=0)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.vocab = word_token_ids(tokenizer)
        self.last_stats = StepStats()
        self.num_steps = 0
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._children: dict[str, list[_Seq]] = {}
        self._loras: dict[str, LoRARequest] = {}

    # -- requests ------------------------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        check_prompt_ids(prompt_token_ids, self.max_model_len, self.tokenizer.vocab_size)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        resume_from: int = 0,
        lora_request: str | None = None,
    ) -> None:
        self.check_prompt(prompt_token_ids, params)
        if lora_request is not None and lora_request not in self._loras:
            raise ValueError(f"unknown LoRA adapter {lora_request!r}; load it first")
        if request_id in self._children:
            raise ValueError(f"request id {request_id!r} is already running")
        digest = zlib.crc32(b",".join(str(t).encode() for t in prompt_token_ids))
        seqs = [
            _Seq(request_id, i, len(prompt_token_ids), params, random.Random(f"{self.sim.seed}:{digest}:{i}"))
            for i in range(params.n)
        ]
        self._children[request_id] = seqs
        self._waiting.extend(seqs)

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        for rid in request_ids:
            for seq in self._children.pop(rid, []):
                if seq in self._running:
                    self._running.remove(seq)
                elif seq in self._waiting:
                    self._waiting.remove(seq)
                outs.append(self._output(seq, [], "abort"))
        return outs

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    # -- LoRA adapters: names only (nothing is computed with them) -----------------------------
    def load_lora(self, name: str, path: str) -> LoRARequest:
        lora = self._loras.setdefault(name, LoRARequest(name, len(self._loras) + 1, path))
        if lora.lora_path != path:
            raise ValueError(f"a LoRA adapter named {name!r} is loaded already; unload it first")
        return lora

    def remove_lora(self, name: str) -> bool:
        return self._loras.pop(name, None) is not None

    def list_loras(self) -> list[str]:
        return sorted(self._loras)

    def counters(self) -> CoreCounters:
        return CoreCounters(len(self._running), len(self._waiting), 0.0, 0, 0, 0)

    def cached_block_hashes(self) -> list[bytes]:
        return []

    def drain_cache_events(self) -> tuple[list[bytes], list[bytes]]:
        return [], []

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        while self._waiting and len(self._running) < self.sim.max_batch:
            self._running.append(self._waiting.popleft())
        outputs: list[RequestOutput] = []
        still: list[_Seq] = []
        for seq in self._running:
            token, reason = self._next_token(seq)
            seq.output_ids.append(token)
            outputs.append(self._output(seq, [token], reason))
            if reason is None:
                still.append(seq)
            else:
                self._forget(seq)
        self._running = still
        self.num_steps += 1
        self.last_stats = StepStats(len(outputs), len(self._running), len(self._waiting), 0.0, 0)
        rest = self.sim.step_ms / 1e3 - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        return outputs

    def _next_token(self, seq: _Seq) -> tuple[int, FinishReason | None]:
        p = seq.params
        n_out = len(seq.output_ids) + 1  # counting this token
        may_stop = n_out > p.min_tokens
        if may_stop and not p.ignore_eos and self.eos_token_ids and seq.rng.random() < self.sim.eos_prob:
            return self.eos_token_ids[0], "stop"
        token = seq.rng.choice(self.vocab)
        if may_stop and token in p.stop_token_ids:
            return token, "stop"
        if (p.max_tokens is not None and n_out >= p.max_tokens) or (
            seq.num_prompt_tokens + n_out >= self.max_model_len
        ):
            return token, "length"
        return token, None

    def _output(self, seq: _Seq, new_ids: list[int], reason: FinishReason | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.parent_id,
            new_token_ids=new_ids,
            index=seq.index,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=0,
            num_output_tokens=len(seq.output_ids),
            finished=reason is not None,
            finish_reason=reason,
            stop_token_id=new_ids[-1] if reason == "stop" and new_ids else None,
        )

    def _forget(self, seq: _Seq) -> None:
        kids = self._children.get(seq.parent_id)
        if kids is not None and seq in kids:
            kids.remove(seq)
            if not kids:
                del self._children[seq.parent_id]

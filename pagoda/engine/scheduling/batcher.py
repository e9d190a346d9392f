"""The batcher, the engine's step scheduler: which requests run this step and how many tokens
each computes (the cluster scheduler role is `pagoda.services.scheduler`).

One token budget per step is shared by decodes (1 token each) and prefill chunks, so prefill is
chunked and mixed with decode. When blocks run out, running requests are preempted by recompute
(their blocks freed, their tokens computed again later): newest first, or lowest priority first.
Contract: `out = schedule(); res = runner.execute(out); update(out, res)`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagoda.engine.config import BatcherConfig
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.outputs import FinishReason, TokenLogprob
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.request import Request, RequestStatus
from pagoda.engine.scheduling.speculation import Speculation

if TYPE_CHECKING:
    from pagoda.engine.lora.request import LoRARequest
    from pagoda.engine.structured.compiler import SequenceGrammar


@dataclass
class NewRequestData:
    """A request the runner has no state for (first schedule, or resumed after preemption)."""

    req_id: str
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    grammar: SequenceGrammar | None = None
    lora_request: LoRARequest | None = None


@dataclass
class CachedRequestData:
    """A running request the runner already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class BatchPlan:
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # batch order: cached requests first, then new ones
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]  # the runner drops these (finished, aborted or preempted)
    num_preempted: int = 0
    # speculative decoding: the draft tokens of the sequences that verify some this step (their
    # last known token, then these, are their num_scheduled_tokens)
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    pooled: dict[str, list[float]] = field(default_factory=dict)  # embeddings of completed prompts
    # sequences that verified drafts: the tokens emitted (accepted drafts, then the sampled one),
    # and their logprobs where asked
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)

    def emitted(self, req_id: str) -> list[int]:
        """The tokens the step emitted for the request, in order (none: it sampled nothing)."""
        spec = self.spec_token_ids.get(req_id)
        if spec is not None:
            return spec
        token = self.sampled_token_ids.get(req_id)
        return [] if token is None else [token]

    def logprobs_of(self, req_id: str, n: int) -> list[TokenLogprob] | None:
        """The logprobs of the request's first `n` emitted tokens; None: not asked."""
        spec = self.spec_logprobs.get(req_id)
        if spec is not None:
            return spec[:n]
        lp = self.logprobs.get(req_id)
        return None if lp is None else [lp][:n]


@dataclass
class _StepPlan:
    """What one `Batcher.schedule` call has decided so far."""

    budget: int  # tokens left this step
    num_scheduled: dict[str, int] = field(default_factory=dict)
    cached: list[CachedRequestData] = field(default_factory=list)
    new: list[NewRequestData] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    speculate: bool = False  # drafts for decoding sequences this step
    spec: dict[str, list[int]] = field(default_factory=dict)
    # pipeline stages' micro-batches: requests of steps still in flight (neither scheduled nor
    # preempted), and how many running requests this step takes at most
    in_flight: Collection[str] = ()
    max_running: int | None = None


class Batcher:
    def __init__(
        self,
        config: BatcherConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        speculation: Speculation | None = None,
    ) -> None:
        """`speculation`: speculative decoding's proposer (None: off)."""
        self.config = config
        self.spec = speculation
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()
        self.num_preemptions = 0
        # running requests without an output token yet (their prefill is in the step in progress,
        # or more of its chunks are to come); set on the step thread, read by the worker's admission
        self.num_prefilling = 0

    # -- requests in and out ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, request.request_id
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], reason: FinishReason) -> list[Request]:
        """Finish (e.g. abort) requests wherever they are; their blocks are freed now."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, reason)
            done.append(req)
        self.num_prefilling = self._count_prefilling()
        return done

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- the step ---------------------------------------------------------------------------
    def schedule(self, in_flight: Collection[str] = (), max_running: int | None = None) -> BatchPlan:
        """This step's plan: running requests first (preempting the lowest ranked when blocks run
        out), then waiting ones while budget, sequence slots and blocks last. Pipeline stages
        (distributed/pipeline_steps.py): `in_flight` requests are in a step not finished yet, and
        at most `max_running` running requests go in this one (the rest in the next micro-batch)."""
        step = _StepPlan(self.config.max_num_batched_tokens, in_flight=in_flight, max_running=max_running)
        step.speculate = self.spec is not None and self.spec.active(len(self.running))
        self._schedule_running(step)
        if not step.preempted:  # new work only when nothing had to be preempted this step
            self._schedule_waiting(step)
        self.num_prefilling = self._count_prefilling()
        finished = self._finished_ids | {r.request_id for r in step.preempted}
        self._finished_ids = set()
        return BatchPlan(
            new_requests=step.new,
            cached_requests=step.cached,
            num_scheduled_tokens=step.num_scheduled,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - step.budget,
            finished_req_ids=finished,
            num_preempted=len(step.preempted),
            spec_token_ids=self.spec.fill(step.spec) if self.spec is not None else step.spec,
        )

    def _schedule_running(self, step: _StepPlan) -> None:
        i = 0
        while i < len(self.running) and step.budget > 0:
            req = self.running[i]
            if req.request_id in step.in_flight or len(step.cached) == step.max_running:
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, step.budget)
            n = min(n, self.max_model_len - req.num_computed_tokens)
            assert n > 0, req
            draft = self.spec.draft(req, step.budget) if self.spec is not None and step.speculate else []
            # drafts only where their slots are free: speculation never preempts
            new_blocks = self.kv.allocate_slots(req, n + len(draft)) if draft else None
            if new_blocks is not None:
                step.spec[req.request_id] = draft
                n += len(draft)
            else:
                new_blocks = self.kv.allocate_slots(req, n)
            while new_blocks is None:
                victim = self._pick_victim(step.in_flight)
                if self.running.index(victim) < i:  # already scheduled this step: undo that
                    step.budget += step.num_scheduled.pop(victim.request_id)
                    step.cached = [c for c in step.cached if c.req_id != victim.request_id]
                    step.spec.pop(victim.request_id, None)
                    i -= 1
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, n)
            if new_blocks is None:  # req itself was preempted
                continue
            step.num_scheduled[req.request_id] = n
            step.cached.append(CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens))
            step.budget -= n
            i += 1

    def _schedule_waiting(self, step: _StepPlan) -> None:
        """Waiting requests in order while budget, sequence slots and blocks last; one whose LoRA
        adapter would be one more than `max_loras` running at once is passed over (it keeps its
        place in the queue)."""
        passed: list[Request] = []
        adapters = {r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
        while self.waiting and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self._peek_waiting()
            lora = req.lora_request
            if lora is not None and self.config.max_loras and lora.lora_int_id not in adapters:
                if len(adapters) >= self.config.max_loras:
                    self._remove_waiting(req)
                    passed.append(req)
                    continue
                adapters.add(lora.lora_int_id)
            # a pooling request computes every row itself (mean and cls pool over the whole prompt)
            fresh = req.num_computed_tokens == 0 and req.params.pooling is None
            hits = self.kv.find_cached_prefix(req) if fresh else []
            num_cached = len(hits) * self.kv.block_size
            remaining = req.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and remaining > step.budget:
                break
            n = min(remaining, step.budget)
            if self.kv.allocate_slots(req, n, hits) is None:
                break
            self._start(req, num_cached)
            step.num_scheduled[req.request_id] = n
            step.new.append(
                NewRequestData(
                    req_id=req.request_id,
                    token_ids=list(req.all_token_ids),
                    num_prompt_tokens=req.num_prompt_tokens,
                    block_ids=list(self.kv.blocks_of(req.request_id)),
                    num_computed_tokens=num_cached,
                    params=req.params,
                    generator=req.generator,
                    grammar=req.grammar,
                    lora_request=req.lora_request,
                )
            )
            step.budget -= n
        self.waiting.extendleft(reversed(passed))

    def _start(self, req: Request, num_cached: int) -> None:
        """Move `req` from waiting to running, its first `num_cached` tokens found in the cache."""
        self._remove_waiting(req)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            req.queue_time_s = time.monotonic() - req.arrival_time
        req.num_computed_tokens = num_cached
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        if self.spec is not None:
            self.spec.start(req)

    def update(self, out: BatchPlan, res: RunnerOutput) -> list[Request]:
        """Advance counters, append sampled tokens, finish requests that stop. Returns the
        requests that got new tokens this step (finished ones included; `num_new_tokens` says
        how many)."""
        changed: list[Request] = []
        stopped: list[Request] = []
        for rid, n in out.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            req.num_new_tokens = 0
            embedding = res.pooled.get(rid)
            if embedding is not None:  # a pooling request ends with its prompt
                req.num_computed_tokens += n
                req.embedding, req.finish_reason = embedding, "stop"
                changed.append(req)
                stopped.append(req)
                continue
            tokens = res.emitted(rid)
            draft = out.spec_token_ids.get(rid)
            if draft is None:
                req.num_computed_tokens += n
            else:  # the rejected drafts' KV is dropped by counter (1 + accepted tokens computed)
                assert tokens, (req, draft)
                req.num_computed_tokens += n - len(draft) + len(tokens) - 1
                self.kv.trim(req)
                if self.spec is not None:
                    self.spec.observe_verification(req, len(draft), len(tokens) - 1)
            if tokens:
                changed.append(req)
            if self._append_tokens(req, tokens):
                stopped.append(req)
        for req in stopped:
            self.running.remove(req)
            self._finish(req, req.finish_reason or "stop")
        self.num_prefilling = self._count_prefilling()
        return changed

    # -- internals --------------------------------------------------------------------------
    def _append_tokens(self, req: Request, tokens: list[int]) -> bool:
        """Append a step's emitted tokens one by one, stopping at the first that finishes the
        request (the rest are dropped). Returns whether it finished."""
        for token in tokens:
            req.append_output(token)
            req.num_new_tokens += 1
            if req.grammar is not None:
                req.grammar.accept(token)
            reason = self._check_stop(req, token)
            if reason is not None:
                req.finish_reason = reason
                return True
        if self.spec is not None and tokens:
            self.spec.verified(req, tokens)
        return False

    def _count_prefilling(self) -> int:
        return sum(1 for r in self.running if r.num_output_tokens == 0)

    def _check_stop(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if req.grammar is not None and req.grammar.done:  # it took EOS or its text is complete
            if token in self.eos_token_ids:
                req.stop_token_id = token
            return "stop"
        if req.num_output_tokens >= p.min_tokens:
            if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                req.stop_token_id = token
                return "stop"
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return "length"
        if req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.status = RequestStatus.FINISHED
        if req.finish_reason is None:
            req.finish_reason = reason
        self.kv.free(req)
        if self.spec is not None:
            self.spec.stop(req)
        self._finished_ids.add(req.request_id)
        del self.requests[req.request_id]

    def _pick_victim(self, in_flight: Collection[str] = ()) -> Request:
        running = [r for r in self.running if r.request_id not in in_flight] if in_flight else self.running
        if self.config.scheduling_policy == "priority":
            return max(running, key=lambda r: (r.priority, r.arrival_time))
        return running[-1]

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        if self.spec is not None:
            self.spec.stop(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _peek_waiting(self) -> Request:
        if self.config.scheduling_policy == "priority":
            return min(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        return self.waiting[0]

    def _remove_waiting(self, req: Request) -> None:
        if self.waiting[0] is req:
            self.waiting.popleft()
        else:
            self.waiting.remove(req)

"""Speculative decoding in the step scheduler, on the CPU with a fake runner whose "model" is a
fixed rule: drafts are scheduled as extra query tokens within the token budget, rollback is a
counter change that gives back only the blocks rejected drafts reached, stop conditions cut the
emitted tokens one by one, and the outputs equal those of the same engine without speculation
(with preemption too); no block leaks."""

from __future__ import annotations

from typing import Any

import pytest

from pagoda.engine.config import BatcherConfig
from pagoda.engine.kv.kv_cache_manager import KVCacheManager, cdiv
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.batcher import Batcher, BatchPlan, RunnerOutput
from pagoda.engine.scheduling.request import Request
from pagoda.engine.scheduling.speculation import Speculation
from pagoda.engine.spec_decode import NgramProposer, SpeculativeConfig

EOS = 0
BLOCK = 4


def rule(tokens: list[int]) -> int:
    """The fake model's greedy next token: mostly the token 4 back (a period n-gram lookup finds),
    broken every 12th position (so some drafts are rejected). Never EOS."""
    if len(tokens) % 12 == 0:
        return tokens[-1] % 5 + 1
    return tokens[-4]


class FakeRunner:
    """Computes what the plan schedules and emits the rule's tokens: for a drafted sequence the
    drafts that match the rule, then the rule's token after them (greedy verification)."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[list[int], int]] = {}  # id -> (verified tokens, computed)
        self.drafted = self.accepted = self.rejected = 0

    def execute(self, out: BatchPlan) -> RunnerOutput:
        for rid in out.finished_req_ids:
            self.state.pop(rid, None)
        for new in out.new_requests:
            self.state[new.req_id] = (list(new.token_ids), new.num_computed_tokens)
        for c in out.cached_requests:  # the batcher's counter agrees with what was computed
            assert self.state[c.req_id][1] == c.num_computed_tokens, (c, self.state[c.req_id])
        res = RunnerOutput()
        for rid, n in out.num_scheduled_tokens.items():
            tokens, computed = self.state[rid]
            draft = out.spec_token_ids.get(rid, [])
            computed += n - len(draft)
            assert computed <= len(tokens), (rid, computed, len(tokens))
            if computed == len(tokens):
                emitted: list[int] = []
                for d in draft:  # accept while the draft is the rule's token
                    if rule(tokens + emitted) != d:
                        break
                    emitted.append(d)
                emitted.append(rule(tokens + emitted))  # the token after the accepted drafts
                self.drafted += len(draft)
                self.accepted += len(emitted) - 1
                self.rejected += len(draft) - (len(emitted) - 1)
                computed += len(emitted) - 1
                tokens = tokens + emitted
                if draft:
                    res.spec_token_ids[rid] = emitted
                else:
                    res.sampled_token_ids[rid] = emitted[0]
            self.state[rid] = (tokens, computed)
        return res


def _batcher(spec: dict[str, Any] | None, num_blocks: int = 64, budget: int = 32) -> Batcher:
    kv = KVCacheManager(num_blocks, block_size=BLOCK)
    speculation = None
    if spec is not None:
        config = SpeculativeConfig.parse(spec)
        speculation = Speculation(config, NgramProposer.from_config(config, 512))
    cfg = BatcherConfig(max_num_batched_tokens=budget, max_num_seqs=8)
    return Batcher(cfg, kv, max_model_len=512, eos_token_ids=[EOS], speculation=speculation)


def _run(
    s: Batcher, prompts: list[list[int]], params: SamplingParams
) -> tuple[dict[str, list[int]], FakeRunner]:
    runner = FakeRunner()
    for i, p in enumerate(prompts):
        s.add_request(Request(f"r{i}", list(p), params))
    reqs = dict(s.requests)
    for _ in range(500):
        if not s.has_unfinished():
            break
        out = s.schedule()
        assert out.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert set(out.spec_token_ids) <= set(out.num_scheduled_tokens)
        s.update(out, runner.execute(out))
        for req in s.running:  # rollback kept exactly the blocks the verified tokens need
            assert len(s.kv.blocks_of(req.request_id)) == cdiv(req.num_computed_tokens, BLOCK), req
            # and the prefix cache holds only blocks of verified, computed tokens
            assert s.kv._num_cached_blocks.get(req.request_id, 0) <= req.num_computed_tokens // BLOCK, req
        assert all(c >= 0 for c in s.kv.pool.ref_cnt)
    assert not s.has_unfinished()
    assert s.kv.pool.num_free_blocks == len(s.kv.pool.ref_cnt)  # no leaked block
    return {rid: r.output_token_ids for rid, r in reqs.items()}, runner


PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8, 2, 8, 1, 8], [1, 4, 1, 4, 2, 1, 3, 5, 6]]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.mark.parametrize("num_blocks", [64, 14], ids=["roomy", "preempting"])
def test_outputs_equal_without_speculation(num_blocks: int) -> None:
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain, _ = _run(_batcher(None, num_blocks), PROMPTS, params)
    s = _batcher(NGRAM, num_blocks)
    spec, runner = _run(s, PROMPTS, params)
    assert spec == plain
    assert all(len(o) == 30 for o in spec.values())
    assert runner.accepted > 0 and runner.rejected > 0
    if num_blocks == 14:
        assert s.num_preemptions > 0


def test_drafts_count_against_the_budget_and_roll_back_by_counter() -> None:
    s = _batcher(NGRAM, budget=3)
    req = Request("a", [5, 6, 7, 8, 5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    s.add_request(req)
    runner = FakeRunner()
    for _ in range(3):  # the prompt in chunks of 3, 3 and 1, which samples 8
        s.update(out := s.schedule(), runner.execute(out))
    assert req.output_token_ids == [8] and req.num_computed_tokens == 7
    out = s.schedule()
    # k is 3, but the budget leaves room for the sequence's own token and 2 drafts: "6 7 8" was
    # followed by "5 6" in the prompt
    assert out.num_scheduled_tokens == {"a": 3} and out.spec_token_ids == {"a": [5, 6]}
    assert len(s.kv.blocks_of("a")) == 3  # slots for positions 7, 8 and 9
    s.update(out, runner.execute(out))
    assert req.output_token_ids == [8, 5, 6, 7]  # both accepted, then the rule's token after them
    assert req.num_computed_tokens == 10 and req.num_new_tokens == 3
    out = s.schedule()  # "8 5 6 7" -> drafts "8 5" (budget); the rule gives 8, then 4 (a break)
    assert out.spec_token_ids == {"a": [8, 5]}
    blocks_before = len(s.kv.blocks_of("a"))
    s.update(out, runner.execute(out))
    assert req.output_token_ids[4:] == [8, 4]  # 8 accepted, 5 rejected: 4 instead
    assert req.num_computed_tokens == 12  # 10 + the sequence's own token + 1 accepted
    assert blocks_before == 4 and len(s.kv.blocks_of("a")) == 3  # the block only 5 reached is freed


def test_stop_token_and_max_tokens_cut_the_emitted_tokens() -> None:
    """A stop token among the accepted drafts ends the request right there; max_tokens is never
    overshot although a step emits several tokens."""
    prompt = [1, 2, 3, 4, 1, 2, 3]  # the rule continues 4, 1, 2, 3, 4, ...
    for params, want in [
        (SamplingParams(max_tokens=30, stop_token_ids=(3,)), [4, 1, 2, 3]),
        (SamplingParams(max_tokens=6, ignore_eos=True), None),
    ]:
        plain, _ = _run(_batcher(None), [prompt], params)
        s = _batcher(NGRAM)
        spec, runner = _run(s, [prompt], params)
        assert spec == plain and runner.accepted > 0
        if want is not None:
            assert spec["r0"] == want
        else:
            assert len(spec["r0"]) == 6


def test_no_drafts_for_grammars_prompts_or_above_disable_by_batch_size() -> None:
    s = _batcher({**NGRAM, "disable_by_batch_size": 2})
    runner = FakeRunner()
    for i, p in enumerate(PROMPTS):
        s.add_request(Request(f"r{i}", list(p), SamplingParams(max_tokens=30, ignore_eos=True)))
    for _ in range(20):  # three running sequences: more than 2, no step speculates
        out = s.schedule()
        assert not out.spec_token_ids
        s.update(out, runner.execute(out))
    s.finish_requests(["r1", "r2"], "abort")
    out = s.schedule()
    assert out.spec_token_ids  # one running: it speculates again
    s.update(out, runner.execute(out))

    s = _batcher(NGRAM)
    req = Request("g", [1, 2, 3, 4, 1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))
    req.grammar = _AnyGrammar()  # type: ignore[assignment]
    s.add_request(req)
    runner = FakeRunner()
    for _ in range(10):
        out = s.schedule()
        assert not out.spec_token_ids
        s.update(out, runner.execute(out))
    assert req.num_output_tokens == 10


class _AnyGrammar:
    """A structured-output grammar that admits anything (what the batcher calls of one)."""

    done = False

    def accept(self, token: int) -> None:
        pass

"""Step scheduler on the CPU with a fake runner: budgets, chunking, preemption, no leaks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.config import BatcherConfig
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.batcher import Batcher, BatchPlan, RunnerOutput
from pagoda.engine.scheduling.request import Request, RequestStatus

EOS = 0


class FakeRunner:
    """Mirrors the real runner's bookkeeping: samples when a request's tokens are all computed."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[list[int], int]] = {}  # id -> (tokens, computed)

    def execute(self, out: BatchPlan) -> RunnerOutput:
        for rid in out.finished_req_ids:
            self.state.pop(rid, None)
        for new in out.new_requests:
            assert new.req_id not in self.state
            self.state[new.req_id] = (list(new.token_ids), new.num_computed_tokens)
        for c in out.cached_requests:
            tokens, computed = self.state[c.req_id]
            assert computed == c.num_computed_tokens, (c.req_id, computed, c.num_computed_tokens)
        res = RunnerOutput()
        for rid, n in out.num_scheduled_tokens.items():
            tokens, computed = self.state[rid]
            computed += n
            assert computed <= len(tokens)
            if computed == len(tokens):
                tok = (sum(tokens) * 31 + len(tokens)) % 50 + 1  # never EOS
                tokens.append(tok)
                res.sampled_token_ids[rid] = tok
            self.state[rid] = (tokens, computed)
        return res


def _make(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, policy: str = "fcfs") -> Batcher:
    kv = KVCacheManager(num_blocks, block_size=4)
    cfg = BatcherConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, scheduling_policy=policy)  # type: ignore[arg-type]
    return Batcher(cfg, kv, max_model_len=512, eos_token_ids=[EOS])


def _check_invariants(s: Batcher, out: BatchPlan) -> None:
    pool = s.kv.pool
    assert all(c >= 0 for c in pool.ref_cnt)
    assert out.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
    assert len(s.running) <= s.config.max_num_seqs
    held: dict[int, int] = {}
    for req in s.running:
        for b in s.kv.blocks_of(req.request_id):
            held[b] = held.get(b, 0) + 1
    for req in s.waiting:
        assert s.kv.blocks_of(req.request_id) == [], req
    for b, c in held.items():
        assert pool.ref_cnt[b] == c, (b, pool.ref_cnt[b], c)
    assert pool.num_free_blocks + len(held) == pool.num_blocks
    assert s.num_prefilling == sum(r.num_output_tokens == 0 for r in s.running)


def _run(s: Batcher, runner: FakeRunner, max_steps: int = 2000) -> int:
    steps = 0
    while s.has_unfinished():
        out = s.schedule()
        _check_invariants(s, out)
        s.update(out, runner.execute(out))
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def test_chunked_prefill_and_decode_share_budget() -> None:
    s = _make(budget=8)
    runner = FakeRunner()
    s.add_request(Request("long", list(range(1, 21)), SamplingParams(max_tokens=3)))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"long": 8}
    assert s.num_prefilling == 1  # the step in progress prefills "long"
    s.update(out, runner.execute(out))
    assert s.num_prefilling == 1  # more chunks to come
    s.add_request(Request("short", [5, 6], SamplingParams(max_tokens=3)))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"long": 8}  # running first, budget spent
    assert s.num_prefilling == 1  # a waiting request is not prefilling
    s.update(out, runner.execute(out))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"long": 4, "short": 2}
    assert s.num_prefilling == 2
    s.update(out, runner.execute(out))
    assert s.num_prefilling == 0  # both have their first token
    out = s.schedule()
    assert out.num_scheduled_tokens == {"long": 1, "short": 1}  # both decode
    assert s.num_prefilling == 0
    _run(s, runner)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks


def test_preemption_by_recompute_newest_first() -> None:
    s = _make(num_blocks=6, budget=64)
    runner = FakeRunner()
    for i in range(3):
        s.add_request(Request(f"r{i}", [i + 1] * 7, SamplingParams(max_tokens=8)))
    _run(s, runner)
    assert s.num_preemptions > 0
    assert s.kv.pool.num_free_blocks == 6


def test_priority_policy_preempts_lowest_priority() -> None:
    s = _make(num_blocks=4, budget=64, policy="priority")
    runner = FakeRunner()
    s.add_request(Request("low", [1] * 7, SamplingParams(max_tokens=8), priority=5))
    s.add_request(Request("high", [2] * 7, SamplingParams(max_tokens=8), priority=0))
    out = s.schedule()
    assert list(out.num_scheduled_tokens) == ["high", "low"]
    s.update(out, runner.execute(out))
    preempted = []
    for _ in range(2000):  # bounded: a batcher that stops making progress fails, not hangs
        if not s.has_unfinished():
            break
        out = s.schedule()
        s.update(out, runner.execute(out))
        preempted += [r for r in out.finished_req_ids if r in s.requests]
    assert not s.has_unfinished(), "no progress in 2000 steps"
    assert preempted and set(preempted) == {"low"}


def test_abort_frees_blocks_in_same_step() -> None:
    s = _make()
    runner = FakeRunner()
    s.add_request(Request("a", list(range(1, 10)), SamplingParams(max_tokens=50)))
    out = s.schedule()
    s.update(out, runner.execute(out))
    assert s.kv.pool.num_free_blocks < s.kv.pool.num_blocks
    s.add_request(Request("b", list(range(1, 10)), SamplingParams(max_tokens=50)))
    s.update(s.schedule(), RunnerOutput())  # "b" prefilled, its token not sampled yet
    assert s.num_prefilling == 1
    assert s.finish_requests(["b"], "abort")[0].finish_reason == "abort"
    assert s.num_prefilling == 0
    done = s.finish_requests(["a"], "abort")
    assert done[0].status is RequestStatus.FINISHED and done[0].finish_reason == "abort"
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_blocks
    assert "a" in s.schedule().finished_req_ids


def test_stop_conditions() -> None:
    s = _make()
    s.add_request(Request("eos", [3, 4], SamplingParams(max_tokens=10)))
    s.add_request(Request("min", [3, 4], SamplingParams(max_tokens=10, min_tokens=2)))
    s.add_request(Request("ign", [3, 4], SamplingParams(max_tokens=2, ignore_eos=True)))
    out = s.schedule()
    res = RunnerOutput(sampled_token_ids={"eos": EOS, "min": EOS, "ign": EOS})
    changed = s.update(out, res)
    status = {r.request_id: r.finish_reason for r in changed}
    assert status == {"eos": "stop", "min": None, "ign": None}
    out = s.schedule()
    changed = s.update(out, RunnerOutput(sampled_token_ids={"min": 9, "ign": 9}))
    assert {r.request_id: r.finish_reason for r in changed} == {"min": None, "ign": "length"}


actions = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(1, 3), st.just(0), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 20), st.just(0), st.just(0)),
    ),
    max_size=50,
)


@settings(max_examples=150, deadline=None)
@given(actions, st.integers(4, 24), st.sampled_from(["fcfs", "priority"]), st.booleans())
def test_random_add_step_abort_never_leaks(
    seq: list[tuple[str, int, int, int]], num_blocks: int, policy: str, caching: bool
) -> None:
    kv = KVCacheManager(num_blocks, block_size=4, enable_prefix_caching=caching)
    cfg = BatcherConfig(max_num_batched_tokens=16, max_num_seqs=4, scheduling_policy=policy)  # type: ignore[arg-type]
    s = Batcher(cfg, kv, max_model_len=num_blocks * 4, eos_token_ids=[EOS])
    runner = FakeRunner()
    added = 0
    for kind, a, b, c in seq:
        if kind == "add":
            prompt_len = min(a, num_blocks * 4 - 1)
            s.add_request(
                Request(f"r{added}", [c + 1] * prompt_len, SamplingParams(max_tokens=b), priority=c)
            )
            added += 1
        elif kind == "abort":
            s.finish_requests([f"r{a}"], "abort")
        else:
            for _ in range(a):
                out = s.schedule()
                _check_invariants(s, out)
                s.update(out, runner.execute(out))
    _run(s, runner)
    assert kv.pool.num_free_blocks == num_blocks
    assert all(c == 0 for c in kv.pool.ref_cnt)

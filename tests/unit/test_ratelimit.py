"""Per-key rate limits: counted in the store (shared by gateways), 429 with Retry-After."""

from __future__ import annotations

import httpx
import pytest

from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.ratelimit import RateLimiter, RateLimits, estimate_tokens
from pagoda.services.gateway.server import build_app
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import PromptInput
from pagoda.services.transport.store import InMemoryStore
from tests.fakes import FakeEngine, local_frontend


class Clock:
    def __init__(self, now: float = 6000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _refused(limiter: RateLimiter, key: str, tokens: int) -> APIError:
    with pytest.raises(APIError) as info:
        await limiter.admit(key, tokens)
    return info.value


async def test_requests_per_minute_shared_by_two_gateways() -> None:
    store, clock = InMemoryStore(), Clock(6010.0)
    a = RateLimiter(store, RateLimits(requests_per_minute=3), clock=clock)
    b = RateLimiter(store, RateLimits(requests_per_minute=3), clock=clock)
    await a.admit("k", 1)
    await b.admit("k", 1)
    await a.admit("k", 1)
    err = await _refused(b, "k", 1)
    assert err.status == 429 and err.headers["Retry-After"] == "50"  # the window ends at 6060
    assert "3 requests per minute" in err.message
    await a.admit("other", 1)  # another key has its own count
    clock.now = 6061.0  # the next window
    await b.admit("k", 1)


async def test_tokens_per_minute_and_refusals_do_not_count() -> None:
    limiter = RateLimiter(
        InMemoryStore(), RateLimits(requests_per_minute=10, tokens_per_minute=100), clock=Clock()
    )
    await limiter.admit("k", 60)
    err = await _refused(limiter, "k", 50)
    assert err.status == 429 and "100 tokens per minute" in err.message
    await limiter.admit("k", 40)  # the refused 50 were taken back
    too_big = await _refused(limiter, "k", 101)
    assert too_big.status == 400 and too_big.param == "max_tokens"
    await limiter.charge("k", 5)  # a call that used more than estimated
    assert (await _refused(limiter, "k", 1)).status == 429


def test_estimate_counts_prompt_and_completion() -> None:
    params = SamplingParams(n=2, max_tokens=10)
    assert estimate_tokens([PromptInput(token_ids=[1, 2, 3])], params, 1000) == 3 + 20
    assert estimate_tokens([PromptInput(text="x" * 40)], params, 1000) == 10 + 20
    chat = PromptInput(messages=[{"role": "user", "content": "y" * 8}])
    assert estimate_tokens([chat], SamplingParams(max_tokens=None), 1000) == 2 + 250


async def test_the_api_answers_429_with_retry_after_per_key() -> None:
    limiter = RateLimiter(InMemoryStore(), RateLimits(requests_per_minute=2))
    app = build_app(local_frontend(FakeEngine()), rate_limiter=limiter)
    body = {"prompt": "x", "max_tokens": 2}
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for _ in range(2):
            assert (await c.post("/v1/completions", json=body, headers=alice)).status_code == 200
        resp = await c.post("/v1/completions", json=body, headers=alice)
        assert resp.status_code == 429
        assert 1 <= int(resp.headers["retry-after"]) <= 60
        assert resp.json()["error"]["type"] == "RateLimitError"
        assert (await c.post("/v1/completions", json=body, headers=bob)).status_code == 200
        stream = await c.post("/v1/completions", json={**body, "stream": True}, headers=alice)
        assert stream.status_code == 429  # refused before the stream starts


async def test_a_store_failure_lets_requests_through() -> None:
    class Down(InMemoryStore):
        async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
            raise ConnectionError("redis went away")

    limiter = RateLimiter(Down(), RateLimits(requests_per_minute=1))
    for _ in range(3):
        await limiter.admit("k", 1)

"""Per-API-key rate limits (requests and tokens per minute), counted in the store so that every
gateway of a deployment shares them (Redis; the in-memory store in one process).

Fixed one-minute windows: the counters of key `k` in window `w` are `rl:<k>:<w>:req` and
`rl:<k>:<w>:tok`, created with a TTL of two windows. A request adds 1 and its token estimate (prompt
plus max_tokens times n); if either goes over the limit the addition is taken back and the request
is refused with 429 and `Retry-After` (seconds to the next window). A request too big for the token
limit on its own is a 400: no wait would let it through. `k` is `auth.key_id`, never the key.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagoda.engine import SamplingParams
from pagoda.services.transport.errors import APIError, bad_request
from pagoda.services.transport.messages import PromptInput
from pagoda.services.transport.store import Store

logger = logging.getLogger("pagoda.ratelimit")


@dataclass(frozen=True)
class RateLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--rate-limit-{name.replace('_', '-')} must be at least 1, got {value}")

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


def rate_limited(message: str, retry_after_s: float) -> APIError:
    seconds = max(1, math.ceil(retry_after_s))
    return APIError(429, f"{message} Retry after {seconds} s.", headers={"Retry-After": str(seconds)})


class RateLimiter:
    def __init__(
        self,
        store: Store,
        limits: RateLimits,
        *,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits
        self.window_s = window_s
        self.clock = clock

    async def admit(self, key: str, tokens: int) -> None:
        """Count one request of about `tokens` tokens for `key`, or raise 429 (400 if it can
        never fit). A store that cannot be reached lets the request through (and says so)."""
        lim = self.limits
        if not lim.enabled:
            return
        if lim.tokens_per_minute is not None and tokens > lim.tokens_per_minute:
            raise bad_request(
                f"This request needs about {tokens} tokens (prompt + max_tokens x n), more than the "
                f"limit of {lim.tokens_per_minute} tokens per minute; ask for fewer max_tokens.",
                param="max_tokens",
            )
        now = self.clock()
        window = int(now // self.window_s)
        retry_after = (window + 1) * self.window_s - now
        base = f"rl:{key}:{window}"
        ttl = 2 * self.window_s
        try:
            if lim.requests_per_minute is not None:
                count = await self.store.incr(f"{base}:req", 1, ttl_s=ttl)
                if count > lim.requests_per_minute:
                    await self.store.incr(f"{base}:req", -1)
                    raise rate_limited(
                        f"Rate limit reached: {lim.requests_per_minute} requests per minute.", retry_after
                    )
            if lim.tokens_per_minute is not None:
                used = await self.store.incr(f"{base}:tok", tokens, ttl_s=ttl)
                if used > lim.tokens_per_minute:
                    await self.store.incr(f"{base}:tok", -tokens)
                    if lim.requests_per_minute is not None:
                        await self.store.incr(f"{base}:req", -1)
                    raise rate_limited(
                        f"Rate limit reached: {lim.tokens_per_minute} tokens per minute.", retry_after
                    )
        except APIError:
            raise
        except Exception as exc:  # the store is down: serving beats refusing everyone
            logger.warning("rate limit not checked, the store failed: %s", exc)

    async def charge(self, key: str, tokens: int) -> None:
        """Add tokens used beyond a request's estimate to the current window (never refuses)."""
        if self.limits.tokens_per_minute is None or tokens <= 0:
            return
        window = int(self.clock() // self.window_s)
        try:
            await self.store.incr(f"rl:{key}:{window}:tok", tokens, ttl_s=2 * self.window_s)
        except Exception as exc:
            logger.warning("rate limit not charged, the store failed: %s", exc)


def estimate_tokens(prompts: list[PromptInput], params: SamplingParams, max_model_len: int) -> int:
    """Tokens a request will use, before it is tokenized: token-id prompts counted, text at about
    four characters a token; plus max_tokens per choice (a quarter of the context when omitted:
    what the call uses beyond that is charged when it ends)."""
    prompt = 0
    for p in prompts:
        if p.token_ids is not None:
            prompt += len(p.token_ids)
        else:
            chars = len(p.text or "") + sum(len(str(m.get("content") or "")) for m in p.messages or ())
            prompt += math.ceil(chars / 4)
    completion = params.max_tokens if params.max_tokens is not None else max(1, max_model_len // 4)
    return prompt + completion * params.n * len(prompts)

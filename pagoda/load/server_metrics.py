"""The KV cache figures of a pagoda server during a `bench serve` run, from its Prometheus /metrics.

A sampler scrapes the given /metrics URLs (the gateway's of `pagoda serve`; workers' --metrics-port
in a cluster) every `interval_s` while the benchmark runs. Each sample sums the engines' gauges:
`pagoda:kv_cache_live_tokens` (tokens stored), `pagoda:kv_cache_used_slots` (blocks in use x block
size) and `vllm:kv_cache_usage_perc` (blocks in use / total, averaged over engines). A server
without these gauges (another vendor) gives no samples and no KV report. The speculative decoding
counters (`vllm:spec_decode_*`) are summed too: the run's acceptance rate is their growth.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

_GAUGES = {
    "pagoda:kv_cache_live_tokens": "live",
    "pagoda:kv_cache_used_slots": "used",
    "vllm:kv_cache_usage_perc": "usage",
}
_SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts_total": "drafts",
    "vllm:spec_decode_num_draft_tokens_total": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens_total": "accepted",
}


@dataclass(frozen=True)
class KvSample:
    live_tokens: float
    used_slots: float
    usage: float  # mean over engines of blocks in use / total
    drafts: float = 0.0  # speculative decoding's counters so far (0: the server does not speculate)
    draft_tokens: float = 0.0
    accepted: float = 0.0

    @property
    def live_ratio(self) -> float:
        return self.live_tokens / self.used_slots if self.used_slots else 0.0


def parse_kv(text: str) -> KvSample | None:
    """One sample from a /metrics text; None when it has no pagoda KV gauges."""
    sums = {"live": 0.0, "used": 0.0, "usage": 0.0, "drafts": 0.0, "draft_tokens": 0.0, "accepted": 0.0}
    counts = dict.fromkeys(sums, 0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = _GAUGES.get(s.name) or _SPEC_COUNTERS.get(s.name)
            if key is not None:
                sums[key] += s.value
                counts[key] += 1
    if not counts["live"]:
        return None
    spec = (sums["drafts"], sums["draft_tokens"], sums["accepted"])
    return KvSample(sums["live"], sums["used"], sums["usage"] / max(counts["usage"], 1), *spec)


def merge(samples: list[KvSample]) -> KvSample:
    """Samples of several servers taken at the same time -> one."""
    return KvSample(
        sum(s.live_tokens for s in samples),
        sum(s.used_slots for s in samples),
        sum(s.usage for s in samples) / len(samples),
        sum(s.drafts for s in samples),
        sum(s.draft_tokens for s in samples),
        sum(s.accepted for s in samples),
    )


def summarize_kv(samples: list[KvSample]) -> dict[str, float] | None:
    """The KV report of a run: peak usage, live-token ratio at the peak and over the run
    (used-slot weighted, idle samples ignored). None without samples."""
    busy = [s for s in samples if s.used_slots > 0]
    if not busy:
        return None if not samples else {"samples": len(samples), "peak_usage": 0.0} | _spec(samples)
    peak = max(busy, key=lambda s: (s.usage, s.used_slots))
    return {
        "samples": len(samples),
        "peak_usage": peak.usage,
        "live_ratio_at_peak": peak.live_ratio,
        "live_ratio_mean": sum(s.live_tokens for s in busy) / sum(s.used_slots for s in busy),
        "min_live_ratio": min(s.live_ratio for s in busy),
    } | _spec(samples)


def _spec(samples: list[KvSample]) -> dict[str, float]:
    """Speculative decoding over the run (the counters' growth from the first sample to the last):
    acceptance rate (accepted / draft tokens) and mean acceptance length (1 + accepted / drafts)."""
    first, last = samples[0], samples[-1]
    drafts, tokens = last.drafts - first.drafts, last.draft_tokens - first.draft_tokens
    if tokens <= 0:
        return {}
    accepted = last.accepted - first.accepted
    return {"spec_acceptance_rate": accepted / tokens, "spec_mean_acceptance_length": 1 + accepted / drafts}


class KvSampler:
    """Scrape `urls` every `interval_s` until `stop()`; `samples` holds one merged sample per round
    in which every URL answered with the gauges."""

    def __init__(self, client: httpx.AsyncClient, urls: list[str], interval_s: float = 0.5) -> None:
        self.client = client
        self.urls = urls
        self.interval_s = interval_s
        self.samples: list[KvSample] = []
        self._task: asyncio.Task[None] | None = None

    async def scrape(self) -> KvSample | None:
        got: list[KvSample] = []
        for url in self.urls:
            try:
                resp = await self.client.get(url, timeout=5.0)
                sample = parse_kv(resp.text) if resp.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                sample = None
            if sample is None:
                return None
            got.append(sample)
        return merge(got) if got else None

    async def _loop(self) -> None:
        while True:
            sample = await self.scrape()
            if sample is not None:
                self.samples.append(sample)
            await asyncio.sleep(self.interval_s)

    async def start(self) -> bool:
        """Start sampling if the servers expose the gauges; False (and nothing started) if not."""
        if await self.scrape() is None:
            return False
        self._task = asyncio.create_task(self._loop())
        return True

    async def stop(self) -> None:
        """Stop sampling, with one last sample (the run's final counters)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            sample = await self.scrape()
            if sample is not None:
                self.samples.append(sample)
            self._task = None

"""Restarts against real processes over a private RabbitMQ node and Redis (conftest.py's
`restart_cluster`: gateway, tokenizer, scheduler, workers w1 and w2 of a tiny model whose steps
take 20 ms more). Every request sent gets a complete answer or a clear error, none hangs, and
greedy outputs that complete equal an undisturbed run.

In order: a rolling restart replaces w1 and w2 by w3 and w4 under a steady load; then the RabbitMQ
node is stopped and started again while requests stream.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from typing import Any

import httpx
import pytest

from tests.faults.client import (
    Outcome,
    Tally,
    figures,
    load,
    mid_stream,
    running,
    stream,
    until,
    until_idle,
    until_served,
)
from tests.faults.conftest import TALLIES, held, log_of, redelivered

pytestmark = pytest.mark.integration

PROMPTS = [f"Restart {i}: the quick brown fox jumps" for i in range(6)]
SHORT, LONG = 48, 300  # output tokens: ~1 s and ~6 s a stream (20 ms a step at least)
BASELINE: dict[tuple[str, int], str] = {}


def _baseline(cluster: dict[str, Any]) -> None:
    """The undisturbed greedy outputs of PROMPTS at both lengths (computed once); then, before
    every test, until the workers' heartbeats show no request running (see test_faults.py)."""
    if not BASELINE:
        outs = asyncio.run(load(cluster, PROMPTS, max_tokens=SHORT))
        outs += asyncio.run(load(cluster, PROMPTS, max_tokens=LONG))
        assert all(o.complete for o in outs), outs
        BASELINE.update({(o.prompt, SHORT if i < len(PROMPTS) else LONG): o.text for i, o in enumerate(outs)})
        assert len({BASELINE[p, SHORT] for p in PROMPTS}) > 1, "the prompts should give different outputs"
    asyncio.run(until_idle(cluster))


def _check_greedy(outs: list[Outcome], max_tokens: int) -> None:
    for out in outs:
        if out.complete:
            assert out.text == BASELINE[out.prompt, max_tokens], (out.prompt, out.text)


def _tally(fault: str) -> Tally:
    tally = Tally(fault)
    TALLIES.append(tally)
    return tally


async def _steady(cluster: dict[str, Any], during: Any, concurrency: int = 4) -> list[Outcome]:
    """`concurrency` clients each send SHORT streams back to back (cycling through PROMPTS) until
    `during()` returns."""
    outs: list[Outcome] = []
    done = asyncio.Event()
    sent = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while not done.is_set():
            prompt = PROMPTS[sent % len(PROMPTS)]
            sent += 1
            outs.append(await stream(client, prompt, SHORT))

    async with httpx.AsyncClient(base_url=cluster["base"], timeout=None) as client:
        loops = [asyncio.create_task(client_loop(client)) for _ in range(concurrency)]
        try:
            await during()
        finally:
            done.set()
            await asyncio.gather(*loops)
    return outs


def test_rolling_restart_of_the_workers_under_load_loses_nothing(restart_cluster: dict[str, Any]) -> None:
    c = restart_cluster
    _baseline(c)
    procs = c["procs"]
    plan = [("w1", "w3"), ("w2", "w4")]  # (old, replacement)

    async def replace(old: str, new: str, after: str | None) -> None:
        """`new` is up; SIGTERM `old` while it runs requests; start `after` (the next replacement)
        while `old` drains; wait for `old` to exit."""
        await until(lambda: figures(c, new).get("state") == "ready", 120, f"{new} to register")
        await until(lambda: running(c, old), 20, f"{old} to run requests")
        procs[old].p.send_signal(signal.SIGTERM)
        if after is not None:
            c["add_worker"](after)
        await until(lambda: not procs[old].alive(), 60, f"{old} to drain and exit")

    async def roll() -> None:
        c["add_worker"](plan[0][1])
        for i, (old, new) in enumerate(plan):
            await replace(old, new, plan[i + 1][1] if i + 1 < len(plan) else None)
        await asyncio.sleep(1.0)  # the replacements alone serve the load for a while

    tally = _tally("rolling restart of 2 workers under load (SIGTERM drain, replacement first)")
    outs = asyncio.run(_steady(c, roll))
    tally.add(outs)
    tally.check()
    assert all(o.complete for o in outs), [o for o in outs if not o.complete]  # no error at all
    _check_greedy(outs, SHORT)
    for old, _ in plan:
        assert procs[old].p.returncode == 0, procs[old].output()[-3000:]
        log = procs[old].output()
        assert "draining" in log and "still running after" not in log, log[-3000:]
        assert "deleted its queue" in log, log[-3000:]  # a replacement has its own: no queue left over
    for _, new in plan:
        served = len(re.findall(r"request \S+ finished", procs[new].output()))
        assert served > 0, f"{new} served nothing"
        assert figures(c, new).get("state") == "ready"
    handed_back = sum(log_of(c, old).count("handed back to the scheduler") for old, _ in plan)
    print(f"rolling restart: {len(outs)} requests, {handed_back} handed back by draining workers")


def test_broker_restart_running_requests_end_cleanly_and_new_ones_succeed(
    restart_cluster: dict[str, Any],
) -> None:
    """The RabbitMQ node stops and starts again while requests stream and while the tokenizer
    holds two in flight (the hold_file failpoint). The streams and the held requests end with
    clean errors (the gateway lost its connection, so their tokens could not reach it) and new
    requests succeed; the held messages, transient, are not delivered again after the start
    (they would run requests nobody waits for)."""
    c = restart_cluster
    _baseline(c)
    rabbit, hold_file, tokenize = c["rabbit"], c["hold_file"], f"{c['ns']}.tokenize.tiny"
    during: list[Outcome] = []
    took: dict[str, float] = {}
    counts: dict[str, int] = {"held": held(c, "tokenizer", tokenize)}

    workers = [w for w, p in c["procs"].items() if w.startswith("w") and p.alive()]

    async def restart() -> None:
        await mid_stream(c, workers[-1], steps=10)
        async with httpx.AsyncClient(base_url=c["base"], timeout=None) as client:
            hold_file.touch()
            kept = [asyncio.create_task(stream(client, p, SHORT, timeout_s=120)) for p in PROMPTS[:2]]
            await until(lambda: held(c, "tokenizer", tokenize) >= counts["held"] + 2, 20, "two held requests")
            counts["redelivered"] = redelivered(c, "tokenizer", tokenize)
            t0 = time.monotonic()
            took["stop"] = await asyncio.to_thread(rabbit.stop)
            sent = [asyncio.create_task(stream(client, p, SHORT, timeout_s=120)) for p in PROMPTS[:3]]
            took["start"] = await asyncio.to_thread(rabbit.start)
            hold_file.unlink()
            during.extend(await asyncio.gather(*sent, *kept))
            counts["kept_errors"] = sum(o.clean_error for o in during[len(sent) :])
        took["t0"] = t0

    tally = _tally("RabbitMQ node stopped and started again")
    try:
        outs = asyncio.run(load(c, PROMPTS, restart, max_tokens=LONG, timeout_s=120))
    finally:
        hold_file.unlink(missing_ok=True)
    tally.add(outs + during)
    tally.check()
    # the node's shutdown closed the gateway's connection: the streams it carried end with a 503
    assert any(o.clean_error for o in outs), "the restart should have ended the running streams"
    assert all("broker" in (o.error or "broker") for o in outs), outs
    _check_greedy(outs, LONG)
    _check_greedy(during, SHORT)
    # new requests succeed once every service has reconnected
    until_served(c, PROMPTS[0], SHORT, 60, tally)
    recovered = time.monotonic() - took["t0"]
    final = asyncio.run(load(c, PROMPTS, max_tokens=SHORT))
    tally.add(final)
    assert all(o.complete for o in final), final
    _check_greedy(final, SHORT)
    assert counts["kept_errors"] == 2, (counts, during)  # the held requests: the gateway ended them
    # the held messages died with the node: the tokenizer was never handed them again
    assert redelivered(c, "tokenizer", tokenize) == counts["redelivered"], log_of(c, "tokenizer")[-3000:]
    assert all(c["procs"][w].alive() for w in ["gateway", "tokenizer", "scheduler", *workers])
    print(
        f"broker restart: node started in {c['rabbit_start_s']:.1f}s, stopped in {took['stop']:.1f}s, "
        f"started again in {took['start']:.1f}s; first request served {recovered:.1f}s after the stop; "
        f"{tally.row}"
    )

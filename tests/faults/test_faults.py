"""Faults against real processes, RabbitMQ and Redis: every request sent gets a complete answer
or a clear error, and none hangs. Greedy outputs that complete must equal an undisturbed run.

The tests share one cluster (conftest.py) and run in this order, each leaving it as the next
expects: w1 is SIGKILLed; a scheduler and a tokenizer are SIGKILLed holding requests; Redis
restarts; the broker connection is cut and restored; w2 stalls (and recovers); w3 drains on
SIGTERM; w2, the last worker, is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from typing import Any

import httpx
import pytest

from tests.faults.client import (
    Outcome,
    Tally,
    figures,
    load,
    mid_stream,
    stream,
    until,
    until_idle,
    until_served,
    until_streaming,
)
from tests.faults.conftest import TALLIES, held, log_of, redelivered
from tests.polling import block_until

pytestmark = pytest.mark.integration

PROMPTS = [f"Fault {i}: the quick brown fox jumps" for i in range(6)]
MAX_TOKENS = 160
BASELINE: dict[str, str] = {}


def _tally(fault: str) -> Tally:
    tally = Tally(fault)
    TALLIES.append(tally)
    return tally


def _baseline(cluster: dict[str, Any]) -> None:
    """The undisturbed greedy outputs of PROMPTS (computed once); then, before every test, until
    the workers' heartbeats show the last test's requests gone. The least-load router reads those
    figures: stale ones once sent none of a test's requests to the worker it breaks (w1 killed,
    w2 stalled), and made the drain test signal w3 before any of its requests ran there."""
    if not BASELINE:
        base = asyncio.run(load(cluster, PROMPTS))
        assert all(o.complete for o in base), base
        BASELINE.update({o.prompt: o.text for o in base})
        assert len(set(BASELINE.values())) > 1, "the prompts should give different outputs"
    asyncio.run(until_idle(cluster))


def _check_greedy(outs: list[Outcome]) -> None:
    for out in outs:
        if out.complete:
            assert out.text == BASELINE[out.prompt], (out.prompt, out.text, BASELINE[out.prompt])


def test_worker_sigkill_midstream_continues_identically(fault_cluster: dict[str, Any]) -> None:
    c = fault_cluster
    _baseline(c)

    async def kill_w1() -> None:
        await mid_stream(c, "w1")
        # the worker has stepped; wait until its tokens have reached the clients too
        await until_streaming(c["live"], none_finished=False)
        c["procs"]["w1"].p.send_signal(signal.SIGKILL)

    tally = _tally("worker SIGKILL mid-stream")
    outs = asyncio.run(load(c, PROMPTS * 2, kill_w1))
    tally.add(outs)
    tally.check()
    assert all(o.complete for o in outs), [o for o in outs if not o.complete]
    _check_greedy(outs)
    moved = [
        int(n)
        for n in re.findall(r"worker w1 stopped sending heartbeats after (\d+) tokens", log_of(c, "gateway"))
    ]
    assert moved, "no request was on the killed worker"
    assert max(moved) > 0, f"w1 was killed before it streamed anything: {moved}"
    print(f"{len(moved)} requests moved off w1, after {moved} tokens")


def test_scheduler_and_tokenizer_sigkill_lose_nothing(fault_cluster: dict[str, Any]) -> None:
    """tokenizer1 and scheduler1 are SIGKILLed while each holds requests in flight (the hold_file
    failpoint: handed to the handler, not acked); the broker redelivers every one of them to the
    other tokenizer and scheduler, and every request completes as an undisturbed run does."""
    c = fault_cluster
    _baseline(c)
    queues = {"tokenizer": f"{c['ns']}.tokenize.tiny", "scheduler": f"{c['ns']}.schedule"}
    before = {f"{role}2": redelivered(c, f"{role}2", queue) for role, queue in queues.items()}
    holding: dict[str, int] = {}

    async def kill() -> None:
        victims = {f"{role}1": queue for role, queue in queues.items()}
        await until(lambda: all(held(c, v, q) for v, q in victims.items()), 20, "the victims to hold some")
        for victim, queue in victims.items():
            c["procs"][victim].p.send_signal(signal.SIGKILL)
            c["procs"][victim].p.wait(10)
            holding[victim] = held(c, victim, queue)  # its log is final

    tally = _tally("scheduler + tokenizer SIGKILL, requests in flight")
    c["hold_file"].touch()
    try:
        outs = asyncio.run(load(c, PROMPTS * 4, kill, max_tokens=MAX_TOKENS))
    finally:
        c["hold_file"].unlink()
    tally.add(outs)
    tally.check()
    assert all(o.complete for o in outs), [o for o in outs if not o.complete]
    _check_greedy(outs)  # no duplicate or missing token in any stream
    for role, queue in queues.items():
        victim, survivor = f"{role}1", f"{role}2"
        again = redelivered(c, survivor, queue) - before[survivor]
        assert again >= holding[victim] > 0, f"{victim} held {holding[victim]}, {survivor} got {again} again"
    print(f"held when killed: {holding}")


REPUBLISHED = "published its prefix index"


def _rebuilt(c: dict[str, Any], live: list[str], published: dict[str, int]) -> bool:
    r, ns = c["redis"], c["ns"]
    if r.scard(f"{ns}:workers") < len(live):
        return False
    if not all(log_of(c, w).count(REPUBLISHED) > published[w] for w in live):
        return False
    owners: set[str] = set()
    for key in r.scan_iter(f"{ns}:blk:*"):
        owners |= {m.decode() for m in r.smembers(key)}
    return set(live) <= owners


def test_redis_restart_running_requests_finish(fault_cluster: dict[str, Any]) -> None:
    c = fault_cluster
    _baseline(c)
    during_outage: list[Outcome] = []
    live = [w for w in ("w1", "w2", "w3") if c["procs"][w].alive()]
    published = {w: log_of(c, w).count(REPUBLISHED) for w in live}  # at registration, so far

    async def restart_redis() -> None:
        await asyncio.sleep(0.3)
        c["store"].kill()
        async with httpx.AsyncClient(base_url=c["base"], timeout=None) as client:
            during_outage.extend(await asyncio.gather(*(stream(client, p, 16) for p in PROMPTS[:3])))
        c["store"].start()

    tally = _tally("Redis restart (down ~1 s, data lost)")
    outs = asyncio.run(load(c, PROMPTS, restart_redis))
    tally.add(outs + during_outage)
    tally.check()
    assert all(o.complete for o in outs + during_outage), [o for o in outs + during_outage if not o.complete]
    _check_greedy(outs)
    assert all(BASELINE[o.prompt].startswith(o.text) for o in during_outage), (
        "routed by load during the outage"
    )
    # the registry and the prefix index come back from the workers' next heartbeats: each live
    # worker republishes its whole index, and the new Redis has blocks of each
    block_until(lambda: _rebuilt(c, live, published), 5, "the registry and prefix index to be rebuilt")
    after = asyncio.run(load(c, PROMPTS[:2]))
    tally.add(after)
    assert all(o.complete for o in after), after


def test_broker_connection_cut_then_restored(fault_cluster: dict[str, Any]) -> None:
    c = fault_cluster
    _baseline(c)
    during_cut: list[Outcome] = []

    async def cut() -> None:
        # once every stream has tokens (a fixed 0.3 s wait was most of a 160-token stream on a
        # fast machine, whose steps took 2.4 ms)
        await until_streaming(c["live"])
        c["proxy"].cut()
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient(base_url=c["base"], timeout=None) as client:
            sent = [asyncio.create_task(stream(client, p, 16)) for p in PROMPTS[:3]]
            await asyncio.sleep(1.0)
            c["proxy"].start()
            during_cut.extend(await asyncio.gather(*sent))

    tally = _tally("RabbitMQ connection cut ~1.5 s")
    outs = asyncio.run(load(c, PROMPTS, cut))
    tally.add(outs + during_cut)
    tally.check()
    # sent while the broker is away: the gateway's publish retries until the connection is back
    # (then they run) or gives up with a 503
    assert all(o.complete or o.clean_error for o in during_cut), during_cut
    assert any(o.clean_error for o in outs), "the cut should have ended some running requests"
    _check_greedy(outs)
    # new requests succeed once every service has reconnected
    until_served(c, PROMPTS[0], 8, 30, tally)
    final = asyncio.run(load(c, PROMPTS))
    tally.add(final)
    assert all(o.complete for o in final), final
    _check_greedy(final)


def test_stalled_worker_loses_its_traffic(fault_cluster: dict[str, Any]) -> None:
    c = fault_cluster
    _baseline(c)
    stall_file = c["stall_file"]
    stall_file.touch()
    try:
        tally = _tally("worker step loop stalls")

        async def watch() -> None:
            await until(lambda: figures(c, "w2").get("state") == "stalled", 20, "w2 to report stalled")
            async with httpx.AsyncClient(base_url=c["base"]) as client:
                assert (await client.get("/health/ready")).status_code == 200  # w3 still serves

        outs = asyncio.run(load(c, PROMPTS, watch))
        tally.add(outs)
        tally.check()
        assert all(o.complete for o in outs), outs
        _check_greedy(outs)
        assert "reporting stalled" in log_of(c, "w2")
        # while w2 is stalled, new requests all go to w3
        more = asyncio.run(load(c, PROMPTS, max_tokens=8))
        tally.add(more)
        assert all(o.complete for o in more), more
    finally:
        os.unlink(stall_file)
    block_until(lambda: figures(c, "w2").get("state") == "ready", 10, "w2 to recover")


def test_sigterm_drains_a_worker_underload(fault_cluster: dict[str, Any]) -> None:
    c = fault_cluster
    _baseline(c)
    w3 = c["procs"]["w3"]
    late: list[Outcome] = []

    async def drain_w3() -> None:
        await mid_stream(c, "w3", steps=10)
        w3.p.send_signal(signal.SIGTERM)
        async with httpx.AsyncClient(base_url=c["base"], timeout=None) as client:
            late.extend(await asyncio.gather(*(stream(client, p, MAX_TOKENS) for p in PROMPTS)))

    tally = _tally("worker SIGTERM drain under load")
    outs = asyncio.run(load(c, PROMPTS * 2, drain_w3))
    tally.add(outs + late)
    tally.check()
    assert all(o.complete for o in outs + late), [o for o in outs + late if not o.complete]
    _check_greedy(outs + late)
    assert w3.p.wait(30) == 0, w3.output()[-3000:]
    log = w3.output()
    draining = re.search(r"worker w3 draining: (\d+) requests running\n(.*)", log, re.S)
    assert draining is not None and "still running after" not in log, log[-3000:]
    running, after = int(draining[1]), draining[2]
    assert running > 0, "w3 was signalled after its streams had ended: nothing was drained"
    assert after.count("finished (length)") == running, after  # each finished on w3 itself
    assert "engine: 1 intra-op threads (--threads 1)" in log  # as the cluster asked


def test_last_worker_killed_ends_streams_with_an_error(fault_cluster: dict[str, Any]) -> None:
    c = fault_cluster
    _baseline(c)

    async def kill_w2() -> None:
        # w2 is the only worker left: every stream's tokens at the client come from it. Kill it once
        # each has tokens and none has finished (a heartbeat-based wait once saw a fast machine
        # finish all six streams before the kill)
        await until_streaming(c["live"])
        c["procs"]["w2"].p.send_signal(signal.SIGKILL)

    tally = _tally("last worker SIGKILL (no worker left)")
    outs = asyncio.run(load(c, PROMPTS, kill_w2, max_tokens=400))
    tally.add(outs)
    tally.check()
    errors = [o for o in outs if o.clean_error]
    assert errors, "the streams running on the last worker should end with an error"
    assert all("worker" in (o.error or "") for o in errors), errors
    (after,) = asyncio.run(load(c, PROMPTS[:1], max_tokens=8))
    tally.add([after])
    assert after.clean_error and (after.status == 503 or "worker" in (after.error or "")), after

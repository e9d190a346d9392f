"""A streaming client that classifies each request's outcome: complete, a clean error, or hung."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.polling import until


@dataclass
class Outcome:
    prompt: str
    text: str = ""
    chunks: int = 0  # content chunks received
    finish_reason: str | None = None
    error: str | None = None  # the error event's (or error response's) message
    status: int = 0
    hung: bool = False
    done: bool = False  # saw [DONE]

    @property
    def complete(self) -> bool:
        return self.finish_reason is not None and self.error is None and self.done

    @property
    def clean_error(self) -> bool:
        """An error the client was told about: an error body (HTTP error, or an error event followed
        by [DONE]) with a message."""
        return bool(self.error) and (self.status >= 400 or self.done)


@dataclass
class Tally:
    fault: str
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outs: list[Outcome]) -> None:
        self.outcomes += outs

    @property
    def row(self) -> dict[str, Any]:
        o = self.outcomes
        return {
            "fault": self.fault, "sent": len(o), "completed": sum(x.complete for x in o),
            "clean_errors": sum(x.clean_error for x in o), "hung": sum(x.hung for x in o),
        }  # fmt: skip

    def check(self) -> None:
        row = self.row
        bad = [x for x in self.outcomes if not (x.complete or x.clean_error)]
        assert not bad, f"{self.fault}: requests with neither a complete answer nor a clean error: {bad}"
        assert row["completed"] + row["clean_errors"] == row["sent"] and row["hung"] == 0, row


async def stream(
    client: httpx.AsyncClient,
    prompt: str,
    max_tokens: int,
    timeout_s: float = 60.0,
    out: Outcome | None = None,
    **extra: Any,
) -> Outcome:
    """One streamed completion, its outcome filled in `out` (to watch it while it streams)."""
    out = Outcome(prompt) if out is None else out
    body = {
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, **extra,
    }  # fmt: skip

    async def run() -> None:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                out.error = json.loads(await resp.aread())["error"]["message"]
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    out.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    out.error = event["error"]["message"] or "(empty message)"
                    continue
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        out.text += choice["text"]
                        out.chunks += 1
                    if choice.get("finish_reason"):
                        out.finish_reason = choice["finish_reason"]

    try:
        await asyncio.wait_for(run(), timeout_s)
    except TimeoutError:
        out.hung = True
    except httpx.HTTPError as exc:  # the connection broke: the client got no clean answer
        out.error, out.status = None, -1
        out.text += f"<transport error {exc!r}>"
    return out


# -- against a cluster: {"base": gateway URL, "redis": its store, "ns": namespace} -------------
def figures(cluster: dict[str, Any], wid: str) -> dict[str, str]:
    """A worker's last heartbeat figures in the registry ({} when it has none)."""
    raw = cluster["redis"].hgetall(f"{cluster['ns']}:worker:{wid}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def running(cluster: dict[str, Any], wid: str) -> bool:
    return int(figures(cluster, wid).get("num_running", 0) or 0) > 0


async def until_idle(cluster: dict[str, Any], timeout_s: float = 10.0) -> None:
    """Until every live worker's heartbeat shows no request running: right after a load, the
    figures still count its requests for up to a heartbeat, and the least-load router would send
    the next requests around workers that only seem busy."""
    workers = [w for w, p in cluster["procs"].items() if w.startswith("w") and p.alive()]
    await until(lambda: not any(running(cluster, w) for w in workers), timeout_s, "the workers to go idle")


async def until_streaming(outs: list[Outcome], none_finished: bool = True) -> None:
    """Until every stream in `outs` has tokens at the client; with `none_finished`, fail if one
    has finished already (the fault the test brings must hit running streams)."""
    await until(lambda: all(o.chunks > 0 for o in outs), 20, "every stream's first tokens")
    assert not (none_finished and any(o.finish_reason for o in outs)), "a stream finished before the fault"


async def mid_stream(cluster: dict[str, Any], wid: str, steps: int = 20) -> None:
    """Until `wid` runs requests and has stepped `steps` times since: tokens have streamed."""
    await until(lambda: running(cluster, wid), 20, f"{wid} to run requests")
    start = int(figures(cluster, wid)["steps"])
    await until(lambda: int(figures(cluster, wid).get("steps", 0)) >= start + steps, 20, f"{wid} to step")


async def load(
    cluster: dict[str, Any],
    prompts: list[str],
    during: Callable[[], Awaitable[Any]] | None = None,
    max_tokens: int = 160,
    timeout_s: float = 60.0,
) -> list[Outcome]:
    """Streams all prompts at once; runs `during()` while they stream (their Outcomes, filled in
    as they stream, are in cluster["live"])."""
    # made here, not by the streams: a task appends nothing before it first runs, and a test
    # waiting for "every stream has tokens" saw all() of an empty list, true at once
    live = [Outcome(p) for p in prompts]
    cluster["live"] = live
    async with httpx.AsyncClient(base_url=cluster["base"], timeout=None) as client:
        tasks = [asyncio.create_task(stream(client, o.prompt, max_tokens, timeout_s, o)) for o in live]
        if during is not None:
            await during()
        return list(await asyncio.gather(*tasks))


def until_served(
    cluster: dict[str, Any], prompt: str, max_tokens: int, timeout_s: float, tally: Tally
) -> None:
    """Sends `prompt` every 0.5 s until it completes (the services have reconnected); until then
    each answer must be a clean error. Every try is counted in `tally`."""
    deadline = time.monotonic() + timeout_s
    while True:
        (after,) = asyncio.run(load(cluster, [prompt], max_tokens=max_tokens))
        tally.add([after])
        if after.complete:
            return
        assert after.clean_error and time.monotonic() < deadline, after
        time.sleep(0.5)

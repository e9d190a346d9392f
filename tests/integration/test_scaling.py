"""`pagoda serve` over the real RabbitMQ and Redis, a worker joining it at run time, and session
affinity by the `x-session-id` header and the `user` field."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import openai
import pytest
import redis

from tests.integration.conftest import ENGINE
from tests.polling import block_until
from tests.processes import AMQP, REDIS, Proc, free_port, wait_ready

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


def test_joining_worker_takes_traffic_and_sessions_stick() -> None:
    ns = f"pagoda-test-{uuid.uuid4().hex[:8]}"
    common = ["--bus", AMQP, "--store", REDIS, "--namespace", ns, "--heartbeat-interval", "0.3"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = Proc("serve", *ENGINE, *common, "--port", str(port))
    procs = [serve]
    r = redis.Redis.from_url(REDIS)
    try:
        wait_ready(base, procs)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        ask = {"model": MODEL, "max_tokens": 4, "temperature": 0}
        assert client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **ask).choices
        joiner = Proc("worker", *ENGINE, *common, "--worker-id", "joiner")
        procs.append(joiner)
        block_until(
            lambda: r.scard(f"{ns}:workers") >= 2 or not joiner.alive(), 120, "the joiner to register"
        )
        assert joiner.alive(), joiner.output()
        time.sleep(0.3)  # one heartbeat

        async def burst() -> None:
            aclient = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
            # distinct prompts with no shared prefix: routed by load, so spread over both workers
            prompts = [f"{i} {w} and" for i, w in enumerate(["cats", "dogs", "fish", "owls"] * 2)]
            await asyncio.gather(*(aclient.completions.create(prompt=p, **ask) for p in prompts))
            await aclient.close()

        asyncio.run(burst())
        assert "finished" in joiner.output(), "the joining worker got no traffic"

        for i in range(4):
            client.chat.completions.create(
                messages=[{"role": "user", "content": f"Question {i} about owls"}],
                extra_headers={"x-session-id": "owl-fan"}, **ask,
            )  # fmt: skip
            client.chat.completions.create(
                messages=[{"role": "user", "content": f"Question {i} about ants"}], user="ant-fan", **ask
            )
        routes = re.findall(r"-> worker (\S+) \((\w[\w-]*)", serve.output())
        assert routes, serve.output()[-2000:]
        last8 = routes[-8:]
        owl, ant = last8[0::2], last8[1::2]
        assert len({w for w, _ in owl}) == 1 and len({w for w, _ in ant}) == 1, last8
        assert all(reason == "session" for _, reason in owl[1:] + ant[1:]), last8
    finally:
        codes = [p.stop() for p in procs]
        for key in r.scan_iter(f"{ns}:*"):
            r.delete(key)
        assert codes == [0] * len(procs), "\n".join(p.output()[-2000:] for p in procs)

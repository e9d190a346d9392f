"""Session-wide stacks for the integration tests: the distributed cluster (separate processes
over the real RabbitMQ and Redis) and the embedded server, each started once."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from tests.polling import block_until
from tests.processes import AMQP, REDIS, Proc, free_port, wait_ready

ENGINE = ["--dtype", "float32", "--kv-cache-memory", "512MiB", "--max-model-len", "2048"]
# adaptive off: w2 drafts up to k every step, so the few copying streams it gets are sure to draft
SPEC = (
    '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,'
    ' "adaptive": false}'
)


def _name(proc: Proc) -> str:
    args = proc.args
    return f"{args[0]} {args[args.index('--worker-id') + 1]}" if "--worker-id" in args else args[0]


@pytest.fixture(scope="session")
def cluster() -> Iterator[dict[str, Any]]:
    ns = f"pagoda-test-{uuid.uuid4().hex[:8]}"
    common = ["--bus", AMQP, "--store", REDIS, "--namespace", ns, "--heartbeat-interval", "0.3"]
    port = free_port()
    # every process writes its finished spans here (tests/integration/test_observability.py)
    spans = Path(tempfile.gettempdir()) / f"{ns}-spans.jsonl"
    env = {"PAGODA_TRACE_FILE": str(spans)}
    metrics = {name: free_port() for name in ("w1", "w2", "scheduler")}
    procs = [
        Proc("worker", *ENGINE, *common, "--worker-id", "w1", "--metrics-port", str(metrics["w1"]), env=env),
        # w2 speculates (n-gram): greedy streams it serves must equal w1's and the embedded server's
        Proc(
            "worker",
            *ENGINE,
            *common,
            "--worker-id",
            "w2",
            "--metrics-port",
            str(metrics["w2"]),
            "--speculative-config",
            SPEC,
            env=env,
        ),
        Proc("scheduler", *common, "--metrics-port", str(metrics["scheduler"]), env=env),
        Proc("tokenizer", *ENGINE, *common, env=env),
        Proc("gateway", *ENGINE, *common, "--port", str(port), env=env),
    ]
    r = redis.Redis.from_url(REDIS)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, procs, timeout=300)  # five processes load on a shared 2-core box
        block_until(lambda: r.scard(f"{ns}:workers") >= 2, 60, "both workers to register")
        yield {"base": base, "ns": ns, "redis": r, "procs": procs, "spans": spans, "metrics_ports": metrics}
    finally:
        codes = {_name(p): p.stop() for p in procs}
        for key in r.scan_iter(f"{ns}:*"):
            r.delete(key)
        outputs = "\n".join(p.output()[-2000:] for p in procs)
        assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n{outputs}"
        assert "Traceback" not in outputs, outputs
        spans.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def embedded() -> Iterator[str]:
    port = free_port()
    proc = Proc("serve", *ENGINE, "--port", str(port))
    try:
        wait_ready(f"http://127.0.0.1:{port}", [proc])
        yield f"http://127.0.0.1:{port}"
    finally:
        assert proc.stop() == 0, proc.output()


@pytest.fixture(params=["embedded", "cluster"])
def sdk(request: pytest.FixtureRequest) -> openai.OpenAI:
    """The official openai client of each stack, unchanged (no retries: a failure shows)."""
    stack = request.getfixturevalue(request.param)
    base = stack if isinstance(stack, str) else str(stack["base"])
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)

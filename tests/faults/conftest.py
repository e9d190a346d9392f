"""One cluster for all the fault tests, started once: gateway, two tokenizers, two schedulers and
three workers of a tiny random model, as real processes, over a private Redis (restartable) and
the shared RabbitMQ behind a TCP proxy (cuttable). The tests run in file order and each leaves
the cluster as the next expects (see test_faults.py)."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults.client import Tally
from tests.faults.infra import PrivateRedis, TcpProxy
from tests.processes import Proc, free_port, wait_ready

TALLIES: list[Tally] = []


@pytest.fixture(scope="session")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tests.tiny_models import make_tiny_model, save_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("faults")
    model = tmp / "tiny-llama"
    model.mkdir()
    make_tiny_model("llama", model)
    save_tiny_tokenizer(model)
    store = PrivateRedis(free_port())
    store.start()
    proxy = TcpProxy(free_port(), ("127.0.0.1", 5672))
    proxy.start()
    ns = f"pagoda-faults-{uuid.uuid4().hex[:8]}"
    bus = f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=0.5"
    common = ["--bus", bus, "--store", store.url, "--namespace", ns, "--heartbeat-interval", "0.3"]
    common += ["--router", "least-load"]  # spread requests over every worker: each victim runs some
    engine = ["--model", str(model), "--served-model-name", "tiny", "--dtype", "float32"]
    engine += ["--kv-cache-memory", "16MiB", "--max-num-batched-tokens", "512"]
    stall_file = tmp / "stall-w2"
    port = free_port()
    worker = ["--stall-timeout", "1.0", "--shutdown-timeout", "20"]
    procs = {
        "gateway": Proc("gateway", *engine, *common, "--port", str(port), "--shutdown-timeout", "5"),
        "tokenizer1": Proc("tokenizer", *engine, *common),
        "tokenizer2": Proc("tokenizer", *engine, *common),
        "scheduler1": Proc("scheduler", *common),
        "scheduler2": Proc("scheduler", *common),
        "w1": Proc("worker", *engine, *common, *worker, "--worker-id", "w1"),
        "w2": Proc(
            "worker",
            *engine,
            *common,
            *worker,
            "--worker-id",
            "w2",
            env={"PAGODA_FAILPOINTS": f"stall_file={stall_file}"},
        ),
        "w3": Proc("worker", *engine, *common, *worker, "--worker-id", "w3"),
    }
    r = redis.Redis.from_url(store.url)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, list(procs.values()), timeout=180)
        deadline = time.monotonic() + 60
        while r.scard(f"{ns}:workers") < 3:
            assert time.monotonic() < deadline, "the workers did not register"
            time.sleep(0.1)
        time.sleep(1.0)  # the schedulers read the registry again
        yield {
            "base": base, "ns": ns, "redis": r, "procs": procs, "store": store, "proxy": proxy,
            "stall_file": stall_file,
        }  # fmt: skip
    finally:
        running = {name: p for name, p in procs.items() if p.alive()}
        for p in running.values():  # all at once: exits are slow on a loaded machine
            p.p.send_signal(signal.SIGTERM)
        codes: dict[str, int | str] = {}
        for name, p in running.items():
            try:
                codes[name] = p.p.wait(60)
            except subprocess.TimeoutExpired:
                p.p.kill()
                p.p.wait()
                codes[name] = "killed: no exit within 60s of SIGTERM"
        for name, p in procs.items():  # kept with the test's temporary files, for post-mortems
            (tmp / f"{name}.log").write_text(p.output())
        print(f"fault cluster logs in {tmp}")
        proxy.close()
        store.kill()
        assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n" + "\n".join(
            p.output()[-2000:] for p in procs.values()
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TALLIES:
        return
    terminalreporter.section("fault table")
    terminalreporter.write_line("| fault | requests sent | completed | clean errors | hung |")
    terminalreporter.write_line("|---|---|---|---|---|")
    for tally in TALLIES:
        row = tally.row
        terminalreporter.write_line(
            f"| {row['fault']} | {row['sent']} | {row['completed']} | {row['clean_errors']} | {row['hung']} |"
        )


def log_of(cluster: dict[str, Any], name: str) -> str:
    proc: Proc = cluster["procs"][name]
    return proc.output()


def path_of(cluster: dict[str, Any], key: str) -> Path:
    return Path(cluster[key])

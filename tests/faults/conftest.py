"""The clusters the fault tests break, as real processes with a tiny random model.

`fault_cluster` (test_faults.py): gateway, two tokenizers, two schedulers and three workers over a
private Redis (restartable) and the shared RabbitMQ behind a TCP proxy (cuttable); tokenizer1 and
scheduler1 hold their messages in flight while cluster["hold_file"] exists (the hold_file failpoint).
`restart_cluster` (test_restarts.py): gateway, tokenizer, scheduler and two workers (more are added
by a rolling restart) over a private Redis and a private RabbitMQ node (restartable); the tokenizer
holds its messages in flight while cluster["hold_file"] exists.
In each module the tests run in file order and each leaves the cluster as the next expects."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.faults.client import Tally
from tests.faults.infra import PrivateRabbit, PrivateRedis, TcpProxy
from tests.polling import block_until
from tests.processes import Proc, free_port, wait_ready

TALLIES: list[Tally] = []
# Each worker steps with one intra-op thread. The cluster's workers share the machine's cores with
# one another and with its other processes; with torch's default (a thread per core, each spinning
# at every barrier) a tiny model's 160-token stream took 6-9 s while another worker stepped, against
# 0.3-0.9 s with one thread (2 cores), and a SIGTERM drain outlasted --shutdown-timeout in CI.
ONE_THREAD = ["--threads", "1"]


def _tiny_model(tmp: Path) -> Path:
    from tests.tiny_models import make_tiny_model, save_tiny_tokenizer

    model = tmp / "tiny-llama"
    model.mkdir()
    make_tiny_model("llama", model)
    save_tiny_tokenizer(model)
    return model


def _stop_all(procs: dict[str, Proc], tmp: Path) -> None:
    """SIGTERM every running process, all at once (exits are slow on a loaded machine); keeps the
    logs with the test's temporary files; asserts that each exited 0."""
    running = {name: p for name, p in procs.items() if p.alive()}
    for p in running.values():
        p.p.send_signal(signal.SIGTERM)
    codes: dict[str, int | str] = {}
    for name, p in running.items():
        try:
            codes[name] = p.p.wait(60)
        except subprocess.TimeoutExpired:
            p.p.kill()
            p.p.wait()
            codes[name] = "killed: no exit within 60s of SIGTERM"
    for name, p in procs.items():  # for post-mortems
        (tmp / f"{name}.log").write_text(p.output())
    print(f"cluster logs in {tmp}")
    assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n" + "\n".join(
        p.output()[-2000:] for p in procs.values()
    )


# module scope: each module's cluster is gone before the next module starts its own
@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("faults")
    model = _tiny_model(tmp)
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
    hold_file = tmp / "hold"  # while it exists, tokenizer1 and scheduler1 hold what they are given
    hold = {"PAGODA_FAILPOINTS": f"hold_file={hold_file}"}
    port = free_port()
    worker = ["--stall-timeout", "1.0", "--shutdown-timeout", "20", *ONE_THREAD]

    def slow(stall: Path | None = None) -> dict[str, str]:
        """Steps 10 ms slower: a test's streams still run when it breaks a worker (a 160-token
        stream took 0.5 s without, and a test waits a heartbeat or two to see a worker step);
        with `stall`, the worker's steps block while that file exists."""
        points = "step_delay_s=0.01" + (f",stall_file={stall}" if stall is not None else "")
        return {"PAGODA_FAILPOINTS": points}

    procs = {
        "gateway": Proc("gateway", *engine, *common, "--port", str(port), "--shutdown-timeout", "5"),
        "tokenizer1": Proc("tokenizer", *engine, *common, env=hold),
        "tokenizer2": Proc("tokenizer", *engine, *common),
        "scheduler1": Proc("scheduler", *common, env=hold),
        "scheduler2": Proc("scheduler", *common),
        "w1": Proc("worker", *engine, *common, *worker, "--worker-id", "w1", env=slow()),
        "w2": Proc("worker", *engine, *common, *worker, "--worker-id", "w2", env=slow(stall_file)),
        "w3": Proc("worker", *engine, *common, *worker, "--worker-id", "w3", env=slow()),
    }
    r = redis.Redis.from_url(store.url)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, list(procs.values()), timeout=180)
        _wait_registered(r, ns, 3)
        yield {
            "base": base, "ns": ns, "redis": r, "procs": procs, "store": store, "proxy": proxy,
            "stall_file": stall_file, "hold_file": hold_file,
        }  # fmt: skip
    finally:
        try:
            _stop_all(procs, tmp)
        finally:
            proxy.close()
            store.kill()


@pytest.fixture(scope="module")
def restart_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("restarts")
    rabbit = PrivateRabbit(free_port(), free_port())
    store = PrivateRedis(free_port())
    procs: dict[str, Proc] = {}
    try:
        with ThreadPoolExecutor(1) as pool:
            starting = pool.submit(rabbit.start)  # 5-30 s: build the model meanwhile
            model = _tiny_model(tmp)
            store.start()
            rabbit_start_s = starting.result()
        ns = f"pagoda-restarts-{uuid.uuid4().hex[:8]}"
        common = ["--bus", f"{rabbit.url}?reconnect_interval=0.5", "--store", store.url, "--namespace", ns]
        common += ["--heartbeat-interval", "0.3", "--router", "least-load"]
        engine = ["--model", str(model), "--served-model-name", "tiny", "--dtype", "float32"]
        engine += ["--kv-cache-memory", "16MiB", "--max-num-batched-tokens", "512"]
        # slower steps (a tiny model is too quick): streams still run when a test breaks something
        slow = {"PAGODA_FAILPOINTS": "step_delay_s=0.02"}

        def add_worker(wid: str) -> Proc:
            procs[wid] = Proc(
                "worker",
                *engine,
                *common,
                *ONE_THREAD,
                "--shutdown-timeout",
                "30",
                "--worker-id",
                wid,
                env=slow,
            )
            return procs[wid]

        port = free_port()
        procs["gateway"] = Proc("gateway", *engine, *common, "--port", str(port), "--shutdown-timeout", "5")
        hold_file = tmp / "hold"  # while it exists, the tokenizer holds what it is given
        hold = {"PAGODA_FAILPOINTS": f"hold_file={hold_file}"}
        procs["tokenizer"] = Proc("tokenizer", *engine, *common, env=hold)
        procs["scheduler"] = Proc("scheduler", *common)
        for wid in ("w1", "w2"):
            add_worker(wid)
        r = redis.Redis.from_url(store.url)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, list(procs.values()), timeout=180)
        _wait_registered(r, ns, 2)
        add: Callable[[str], Proc] = add_worker
        yield {
            "base": base, "ns": ns, "redis": r, "procs": procs, "store": store, "rabbit": rabbit,
            "add_worker": add, "rabbit_start_s": rabbit_start_s, "hold_file": hold_file,
        }  # fmt: skip
    finally:
        try:
            _stop_all(procs, tmp)
        finally:
            rabbit.stop(timeout_s=30)
            rabbit.kill()
            rabbit.remove()
            store.kill()


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


def held(cluster: dict[str, Any], name: str, queue: str) -> int:
    """Messages from `queue` that process `name` has held in flight (the hold_file failpoint)."""
    return log_of(cluster, name).count(f"failpoint: holding a message from {queue} while")


def redelivered(cluster: dict[str, Any], name: str, queue: str) -> int:
    """Redelivered messages from `queue` that process `name` was handed (the bus logs each)."""
    return log_of(cluster, name).count(f"queue {queue}: handling a redelivered message")


def path_of(cluster: dict[str, Any], key: str) -> Path:
    return Path(cluster[key])


def _wait_registered(r: redis.Redis, ns: str, workers: int) -> None:
    """Until `workers` workers are in the registry, then a moment for the schedulers to read it."""
    block_until(lambda: r.scard(f"{ns}:workers") >= workers, 60, f"{workers} workers to register")
    time.sleep(1.0)  # the schedulers read the registry again

"""Manual check of a real RabbitMQ restart, which CI replaces by a connection cut (a private node
takes ~16 s to start on the 2-core machines). Starts a private RabbitMQ node and Redis on free
ports, a gateway, tokenizer, scheduler and two workers of a tiny model against them, streams
requests, stops and restarts the node, and prints the fault-table row.

    PYTHONPATH=$PWD python -m tests.faults.broker_restart
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.faults.client import Outcome, Tally, stream
from tests.faults.infra import PrivateRedis
from tests.processes import Proc, free_port, wait_ready
from tests.tiny_models import make_tiny_model, save_tiny_tokenizer


class PrivateRabbit:
    def __init__(self, tmp: Path) -> None:
        self.port, self.dist = free_port(), free_port()
        self.node = f"pagoda-fault-{self.port}@localhost"
        tmp.parent.chmod(0o755)  # mkdtemp's 0700 would keep the rabbitmq user out
        for d in ("mnesia", "log"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
            (tmp / d).chmod(0o777)  # the server runs as the rabbitmq user
        tmp.chmod(0o777)
        (tmp / "plugins").write_text("")
        (tmp / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        for f in ("plugins", "rabbitmq.conf"):
            (tmp / f).chmod(0o644)
        self.env = dict(
            os.environ, RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist), RABBITMQ_MNESIA_BASE=str(tmp / "mnesia"),
            RABBITMQ_LOG_BASE=str(tmp / "log"), RABBITMQ_PID_FILE=str(tmp / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(tmp / "plugins"),
            RABBITMQ_CONFIG_FILE=str(tmp / "rabbitmq.conf"),
        )  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return time.monotonic() - t0
            except OSError:
                assert time.monotonic() - t0 < 90, "the private RabbitMQ node did not start"
                time.sleep(0.2)

    def stop(self) -> None:
        subprocess.run(["rabbitmqctl", "-n", self.node, "stop"], check=False, capture_output=True)
        if self.proc is not None:
            self.proc.wait(30)


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pagoda-broker-restart-"))
    model = tmp / "tiny"
    model.mkdir()
    make_tiny_model("llama", model)
    save_tiny_tokenizer(model)
    rabbit, store = PrivateRabbit(tmp / "rabbit"), PrivateRedis(free_port())
    print(f"rabbitmq node started in {rabbit.start():.1f}s")
    store.start()
    bus = f"amqp://guest:guest@127.0.0.1:{rabbit.port}/?reconnect_interval=0.5"
    common = [
        "--bus",
        bus,
        "--store",
        store.url,
        "--namespace",
        "pagoda-restart",
        "--heartbeat-interval",
        "0.3",
    ]
    engine = [
        "--model",
        str(model),
        "--served-model-name",
        "tiny",
        "--dtype",
        "float32",
        "--kv-cache-memory",
        "16MiB",
    ]
    port = free_port()
    procs = [
        Proc("gateway", *engine, *common, "--port", str(port), "--shutdown-timeout", "5"),
        Proc("tokenizer", *engine, *common),
        Proc("scheduler", *common),
        Proc("worker", *engine, *common, "--worker-id", "w1"),
        Proc("worker", *engine, *common, "--worker-id", "w2"),
    ]
    base = f"http://127.0.0.1:{port}"
    tally = Tally("RabbitMQ node restart (real)")
    try:
        wait_ready(base, procs, timeout=180)
        time.sleep(2)
        prompts = [f"Restart {i}: the quick brown fox" for i in range(6)]
        async with httpx.AsyncClient(base_url=base, timeout=None) as client:
            baseline = {
                o.prompt: o.text for o in await asyncio.gather(*(stream(client, p, 160) for p in prompts))
            }
            # long streams (440 tokens), so that they are still running when the node stops
            long = {
                o.prompt: o.text for o in await asyncio.gather(*(stream(client, p, 440) for p in prompts))
            }
            running = [asyncio.create_task(stream(client, p, 440, timeout_s=120)) for p in prompts]
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await asyncio.to_thread(rabbit.stop)
            print(f"node stopped in {time.monotonic() - t0:.1f}s")
            during = [asyncio.create_task(stream(client, p, 16, timeout_s=120)) for p in prompts[:3]]
            print(f"node restarted in {await asyncio.to_thread(rabbit.start):.1f}s")
            outs: list[Outcome] = list(await asyncio.gather(*running, *during))
            tally.add(outs)
            deadline = time.monotonic() + 60
            while True:
                after = await stream(client, prompts[0], 160)
                tally.add([after])
                if after.complete or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            final = list(await asyncio.gather(*(stream(client, p, 160) for p in prompts)))
            tally.add(final)
        tally.check()
        assert all(o.complete for o in final), final
        assert all(o.text == long[o.prompt] for o in outs[:6] if o.complete), "greedy text differs"
        assert all(o.text == baseline[o.prompt] for o in final), "greedy text differs"
        print(f"recovered {time.monotonic() - t0:.1f}s after the stop")
        row = tally.row
        print(
            f"| {row['fault']} | {row['sent']} | {row['completed']} | {row['clean_errors']} | {row['hung']} |"
        )
    finally:
        for p in procs:
            if p.alive():
                p.stop()
        for p in procs:
            (tmp / f"{p.args[0]}-{p.p.pid}.log").write_text(p.output())
        rabbit.stop()
        store.kill()
        print(f"logs in {tmp}")
        if os.environ.get("KEEP") is None:
            shutil.rmtree(tmp / "rabbit", ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())

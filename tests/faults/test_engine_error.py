"""An engine that stops on an error (a failing step: a CUDA error, say) in a real `pagoda serve`
process: the running stream ends with a clear error, none hangs, and the process exits 1 so that
its supervisor restarts it, instead of living on with `/health` answering 200 while it can serve
nothing. (With other workers, the requests continue there: tests/unit/test_failover_inprocess.py.)"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.faults.client import Outcome, stream, until_streaming
from tests.processes import Proc, free_port, wait_ready

pytestmark = pytest.mark.integration


def test_an_engine_error_ends_the_streams_clearly_and_the_process_exits_1(tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_model, save_tiny_tokenizer

    model = tmp_path / "tiny-llama"
    model.mkdir()
    make_tiny_model("llama", model)
    save_tiny_tokenizer(model)
    error_file = tmp_path / "step-error"
    port = free_port()
    proc = Proc(
        "serve", "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
        "--kv-cache-memory", "16MiB", "--port", str(port), "--heartbeat-interval", "0.3",
        env={"PAGODA_FAILPOINTS": f"step_error_file={error_file},step_delay_s=0.01"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [proc], timeout=120)

        async def run() -> list[Outcome]:
            outs = [Outcome(f"Engine error {i}: the quick brown fox") for i in range(3)]
            async with httpx.AsyncClient(base_url=base, timeout=None) as client:
                tasks = [asyncio.create_task(stream(client, o.prompt, 400, 30.0, o)) for o in outs]
                await until_streaming(outs)
                error_file.touch()
                return list(await asyncio.gather(*tasks))

        outs = asyncio.run(run())
        assert all(o.clean_error and not o.hung for o in outs), outs
        assert proc.p.wait(30) == 1, proc.output()[-3000:]
    except subprocess.TimeoutExpired:
        tail = proc.output()[-3000:]
        raise AssertionError(f"the process lives on after its engine stopped:\n{tail}") from None
    finally:
        if proc.alive():
            proc.p.kill()
            proc.p.wait()
    log = proc.output()
    assert "engine step failed" in log and "failpoint: step error" in log, log[-3000:]
    assert "failed for good; stopping with exit code 1" in log, log[-3000:]

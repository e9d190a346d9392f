"""`pagoda serve` as users run it: a real process on a free port, the official openai SDK,
sensible text from the demo model, clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve", "--port", str(port), "--kv-cache-memory", "512MiB"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("pagoda serve did not become ready in 120 s")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("pagoda serve did not exit within 30 s of SIGTERM")
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
        assert "status=200" in out  # one log line per request


def test_chat_answers_sensibly(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    text = resp.choices[0].message.content or ""
    assert "Paris" in text, text
    assert resp.usage is not None and resp.usage.completion_tokens > 0


def test_streaming_and_errors(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none")
    stream = client.completions.create(
        model="SmolLM2-135M-Instruct",
        prompt="One, two, three,",
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="x " * 9000, max_tokens=4)
    assert "maximum context length is 8192" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    r = httpx.post(
        f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"

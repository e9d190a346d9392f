"""API keys: several, from flags, a file or the environment; compared in constant time; never logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from pagoda.services.gateway.auth import key_id, load_api_keys
from pagoda.services.gateway.server import build_app
from tests.fakes import FakeEngine, local_frontend


def test_keys_from_flags_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nfile-1\n\n  file-2  \nflag-1\n")
    env = {"PAGODA_API_KEYS": "env-1, env-2,,", "PAGODA_API_KEY": "env-3"}
    keys = load_api_keys(["flag-1"], str(path), env)
    assert keys == ["flag-1", "file-1", "file-2", "env-1", "env-2", "env-3"]
    assert load_api_keys(None, None, {}) == []


def test_a_bad_key_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read it"):
        load_api_keys(None, str(tmp_path / "missing"), {})
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(None, str(empty), {})


def test_key_id_hides_the_key() -> None:
    kid = key_id("Bearer sekret-123")
    assert kid == key_id(b"bearer sekret-123") and "sekret" not in kid and len(kid) == 16
    assert key_id("Bearer other") != kid
    assert key_id(None) == key_id("Basic sekret-123") == "anonymous"


async def test_every_key_works_and_none_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    keys = ["alpha-key-0001", "bravo-key-0002", "charlie-key-03"]
    app = build_app(local_frontend(FakeEngine()), api_keys=keys)
    caplog.set_level(logging.DEBUG)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for key in keys:
            headers = {"Authorization": f"Bearer {key}"}
            resp = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers)
            assert resp.status_code == 200, resp.text
        for bad in ("alpha-key-000", "alpha-key-00011", "", keys[0].upper()):
            resp = await c.get("/v1/models", headers={"Authorization": f"Bearer {bad}"})
            assert resp.status_code == 401
            assert resp.headers["www-authenticate"] == "Bearer"
            assert bad == "" or bad not in resp.text
    assert caplog.records, "the requests were logged"
    for key in keys:
        assert key not in caplog.text


def test_launch_logs_the_count_not_the_keys(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pagoda.services.cli.config import ROLES, launch_config
    from pagoda.services.cli.launch import gateway_app
    from pagoda.services.cli.parser import build_parser
    from pagoda.services.gateway.server import ModelEndpoint
    from pagoda.services.ops.metrics import Metrics
    from pagoda.services.transport.store import InMemoryStore

    monkeypatch.delenv("PAGODA_API_KEYS", raising=False)
    monkeypatch.delenv("PAGODA_API_KEY", raising=False)
    path = tmp_path / "keys"
    path.write_text("file-secret-1\n")
    args = build_parser().parse_args(["serve", "--api-key", "flag-secret-2", "--api-key-file", str(path)])
    caplog.set_level(logging.DEBUG)
    gateway = launch_config(args, ROLES).gateway
    assert gateway is not None and gateway.api_keys == ("flag-secret-2", "file-secret-1")
    endpoint = ModelEndpoint(cast(Any, local_frontend(FakeEngine())))
    gateway_app(gateway, [endpoint], Metrics(), InMemoryStore())
    assert "2 configured" in caplog.text and "secret" not in caplog.text

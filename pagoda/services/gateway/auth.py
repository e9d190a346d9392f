"""API keys: where they come from, how a request's key is checked, and the name it is known by.

Keys come from `--api-key` (repeatable), `--api-key-file` (one key a line; blank lines and `#`
comments skipped) and the environment (`PAGODA_API_KEYS`, comma separated, and `PAGODA_API_KEY`).
A request's bearer token is compared with every key in constant time (`hmac.compare_digest`, no
early exit). A key is never logged or stored: logs, metrics and rate-limit counters use `key_id`,
a short hash of it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from pagoda.services.transport.errors import unauthorized

ENV_KEYS = "PAGODA_API_KEYS"
ENV_KEY = "PAGODA_API_KEY"
OPEN_PATHS = frozenset({"/health", "/health/ready", "/version", "/metrics"})


def load_api_keys(
    keys: Iterable[str] | None = None, key_file: str | None = None, env: Mapping[str, str] | None = None
) -> list[str]:
    """All configured keys, deduplicated in order. Raises ValueError naming the fix for an
    unreadable or empty key file."""
    env = os.environ if env is None else env
    found = [k.strip() for k in keys or ()]
    if key_file:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--api-key-file {key_file}: cannot read it ({exc})") from None
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not from_file:
            raise ValueError(f"--api-key-file {key_file} holds no key; write one key a line")
        found += from_file
    found += [k.strip() for k in env.get(ENV_KEYS, "").split(",")]
    found.append(env.get(ENV_KEY, "").strip())
    return list(dict.fromkeys(k for k in found if k))


def bearer_token(authorization: bytes | str | None) -> bytes:
    """The token of an `Authorization: Bearer <token>` header (b"" for any other scheme)."""
    if not authorization:
        return b""
    raw = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
    scheme, _, token = raw.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


def key_id(authorization: bytes | str | None) -> str:
    """What a caller is known by in counters and logs: a hash of its bearer token, never the token."""
    token = bearer_token(authorization)
    return hashlib.sha256(token).hexdigest()[:16] if token else "anonymous"


class BearerAuth:
    """ASGI middleware: every path but health/version/metrics needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self._keys = [k.encode() for k in api_keys]

    def authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
        token = bearer_token(header)
        ok = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(token, key)
        return ok and bool(token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] not in OPEN_PATHS
            and scope.get("method") != "OPTIONS"
            and not self.authorized(scope)
        ):
            await unauthorized().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

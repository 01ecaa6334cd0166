"""What every request passes before any route sees it: the Host check, the API key, HEAD as GET.

They are ASGI middleware rather than route dependencies so that they run before the body is
read or parsed (a wrong key gets 401 even with a broken body) and cover every path, FastAPI's own
/docs and /openapi.json included.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PUBLIC_PATHS = {"/health", "/v1/health", "/"}
PUBLIC_PREFIXES = ("/ui/",)  # the web page's files: the page itself asks for the key

ErrorResponder = Callable[[str, int, str], ASGIApp]  # (path, status, message) -> response


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: "[::1]:8008" -> "::1", "Localhost.:80" -> "localhost"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def host_allowed(name: str, allowed: frozenset[str]) -> bool:
    """Loopback names, IP literals (a rebinding attack needs a DNS name) and the names given."""
    if "*" in allowed or name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Refuse requests whose Host header names a host this server was not told it is.

    A web page can point a name it controls at 127.0.0.1 (DNS rebinding); the browser then sends
    that name as Host, which is how such requests are told apart from the user's own.
    """

    def __init__(self, app: ASGIApp, allowed: frozenset[str], respond: ErrorResponder) -> None:
        self.app = app
        self.allowed = frozenset(host_name(h) for h in allowed)
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        value = header(scope, b"host") if scope["type"] == "http" else None
        if value is not None and not host_allowed(host_name(value), self.allowed):
            message = (f"Host {value!r} is not a name this server answers to (a guard against DNS rebinding); "
                       f"start it with --allowed-host {host_name(value)} to accept it")
            return await self.respond(scope["path"], 403, message)(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKeyCheck:
    """With a key set, every path but the public ones needs `Authorization: Bearer <key>` (or X-Api-Key)."""

    def __init__(self, app: ASGIApp, key: str | None, respond: ErrorResponder) -> None:
        self.app = app
        self.key = key.encode() if key else None
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.key is None or scope["type"] != "http" or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        authorization = header(scope, b"authorization") or ""
        given = authorization[7:].strip() if authorization.lower().startswith("bearer ") else header(scope, b"x-api-key") or ""
        if not secrets.compare_digest(given.encode("latin-1"), self.key):
            message = "missing or wrong API key; send it as 'Authorization: Bearer <key>'"
            return await self.respond(path, 401, message)(scope, receive, send)
        await self.app(scope, receive, send)


class HeadAsGet:
    """Answer HEAD like GET without the body (HTTP requires it; FastAPI's GET routes answer 405)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)

"""Lenient request bodies, as in the servers the clients were written against.

llama.cpp's server ignores fields it does not know, and its clients (llama.vim, llama.vscode)
add new ones faster than any list of fields could follow; they call OpenAI's routes with
llama.cpp's extensions too. So those routes accept unknown fields, and name them: once in the
log (per route and name) and in every response's `X-Midfill-Ignored-Fields` header. Values
are still checked: a known field with a wrong or unsupported value is a 400.
"""

from __future__ import annotations

import logging
import re

from fastapi import Request
from pydantic import BaseModel, ConfigDict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("midfill.server")
IGNORED_HEADER = "X-Midfill-Ignored-Fields"
MAX_HEADER_BYTES = 1024  # clients refuse a long response head (h11's limit is 16 KiB in all)
MAX_LOGGED_NAMES = 1000  # a client inventing field names must not grow the server's memory


class LenientModel(BaseModel):
    """A request body that ignores fields it does not know (see `unknown_fields`)."""

    model_config = ConfigDict(extra="allow")


def unknown_fields(body: BaseModel, path: str = "") -> list[str]:
    """Dotted names of every field in `body` (and the models inside it) that no model declares."""
    names = [f"{path}{name}" for name in (body.model_extra or {})]
    for name in type(body).model_fields:
        value = getattr(body, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                inner = f"{path}{name}[{i}]." if isinstance(value, list) else f"{path}{name}."
                names += unknown_fields(item, inner)
    return names


def note_unknown_fields(http: Request, body: BaseModel, logged: set[tuple[str, str]]) -> None:
    """Remember the request's ignored fields for the response header, and log each new one once."""
    names = sorted({re.sub(r"\[\d+\]", "", name) for name in unknown_fields(body)})  # messages[2].x -> messages.x
    if not names:
        return
    http.scope.setdefault("state", {})["ignored_fields"] = names
    for name in names:
        if (http.url.path, name) not in logged and len(logged) < MAX_LOGGED_NAMES:
            logged.add((http.url.path, name))
            log.info("%s: ignoring field %r, which midfill does not use", http.url.path, name)


def header_value(names: list[str]) -> bytes:
    """The names as a header value: escaped to printable ASCII (a JSON key may hold any character,
    CR, LF and NUL included, which h11 refuses to send) and cut short past MAX_HEADER_BYTES."""
    value = ", ".join(names).encode("unicode_escape")
    if len(value) > MAX_HEADER_BYTES:
        value = value[: MAX_HEADER_BYTES - 5].rsplit(b", ", 1)[0] + b", ..."
    return value


class NameIgnoredFields:
    """Add the ignored fields a route noted to its response's headers (JSON and streams alike)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_names(message: Message) -> None:
            names = scope.get("state", {}).get("ignored_fields")
            if message["type"] == "http.response.start" and names:
                message = {**message, "headers": [*message.get("headers", []), (IGNORED_HEADER.lower().encode(), header_value(names))]}
            await send(message)

        await self.app(scope, receive, send_with_names)

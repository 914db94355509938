"""Who may talk to the server, how much they may send, and which files they may name.

The server answers the loopback address without a token; any other client, or any client
when the server was started with a token (always, when it binds another host), must send
it: `Authorization: Bearer T`, an `X-Workbench-Token` header, a `wb_token` cookie, or once
as `?token=T` on a page, which sets the cookie. Loopback servers also check the Host header
(a web page elsewhere cannot reach them by DNS rebinding); a request that changes something
and comes from a page of another origin (its `Origin` header) is refused, and every POST with
a body must be JSON, which a form elsewhere cannot send.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, urlsplit

from workbench.errors import WorkbenchError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "wb_token"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")  # what pages elsewhere can send
MAX_BODY_BYTES = 1 << 20
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; False for anything else, unparsable included."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_required(bind_host: str, token: str | None) -> str | None:
    """The token a server on `bind_host` uses: the one given, else none on loopback, else a new one."""
    if token is not None:
        if len(token) < 8:
            raise WorkbenchError(f"--token is {len(token)} characters; give at least 8 (or omit it to get a random one)")
        return token
    return None if is_loopback(bind_host) else new_token()


def _host_name(header: str) -> str:
    """The Host header without its port (`[::1]:8000` -> `[::1]`)."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0]


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _presented_token(scope: Scope, headers: dict[str, str]) -> tuple[str | None, bool]:
    """The token the request carries and whether it came in the query string (then a cookie is set)."""
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    if "x-workbench-token" in headers:
        return headers["x-workbench-token"].strip(), False
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0], True
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie header is no token
        return None, False
    return (cookie[COOKIE].value if COOKIE in cookie else None), False


async def _reply(send: Send, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Refuses requests without the token, from unexpected Host names, with non-JSON POSTs or oversized bodies."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the app has no websockets; none is let through unchecked
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        client = scope.get("client")
        client_host = client[0] if client else None
        set_cookie: list[tuple[bytes, bytes]] = []
        if self.token is None:
            if not is_loopback(client_host):
                await _reply(send, 403, f"this server answers only its own machine (client {client_host}); start it "
                                        "with --host and a --token to serve other machines")
                return
            host = _host_name(headers.get("host", ""))
            if host and host not in LOOPBACK_HOSTS and not is_loopback(host):
                await _reply(send, 403, f"Host {headers.get('host')!r} is not this machine; open the page at "
                                        "http://127.0.0.1:PORT/")
                return
        else:
            given, from_query = _presented_token(scope, headers)
            if not given:
                await _reply(send, 401, "this server needs its token: open the page with ?token=TOKEN (printed when "
                                        "the server started) or send 'Authorization: Bearer TOKEN'",
                             [(b"www-authenticate", b"Bearer")])
                return
            if not hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8")):
                await _reply(send, 403, "wrong token; use the one printed when the server started")
                return
            if from_query:
                set_cookie = [(b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode())]
        method = scope.get("method", "GET")
        origin = headers.get("origin")
        if origin is not None and method not in ("GET", "HEAD") and urlsplit(origin).netloc != headers.get("host"):
            await _reply(send, 403, f"cross-site request from {origin} refused; use the page this server serves")
            return
        if method in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            length = headers.get("content-length")
            has_body = length not in (None, "0") or "transfer-encoding" in headers
            if ctype in FORM_TYPES or (ctype != "application/json" and has_body):
                await _reply(send, 415, f"request bodies must be JSON (Content-Type: application/json), not "
                                        f"{ctype or 'none'!r}")
                return
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await _reply(send, 413, f"request body is {int(length)} bytes; the limit is {self.max_body}")
                return
        receive = self._limited(receive)
        if set_cookie:
            send = _with_headers(send, set_cookie)
        try:
            await self.app(scope, receive, send)
        except _TooLarge:
            await _reply(send, 413, f"request body exceeds the limit of {self.max_body} bytes")

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        return wrapped


class _TooLarge(Exception):
    """A body (sent without a length, or lying about it) grew past the limit while being read."""


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message.get("type") == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return wrapped


def inside(root: Path, relative: str, *, what: str = "path") -> Path:
    """`root / relative`, refused unless it stays inside `root` (no absolute paths, `..` or escaping symlinks)."""
    if not isinstance(relative, str) or not relative.strip():
        raise WorkbenchError(f"{what} is empty; give a folder inside the workspace, e.g. models/my-gpt2")
    text = relative.strip()
    pure = PurePosixPath(text.replace("\\", "/"))
    if pure.is_absolute() or text.startswith("~") or ".." in pure.parts or "\0" in text:
        raise WorkbenchError(f"{what} {relative!r} must be a relative path inside the workspace, without '..'")
    base = root.resolve()
    path = (base / Path(*pure.parts)).resolve()
    if path != base and base not in path.parents:
        raise WorkbenchError(f"{what} {relative!r} leads outside the workspace (through a link); give a folder inside it")
    return path


def relative_to_workspace(root: Path, path: Path) -> str:
    return os.path.relpath(path, root.resolve()).replace(os.sep, "/")

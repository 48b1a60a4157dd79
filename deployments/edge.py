"""The HTTP edge's guards: API keys and scopes, the Host header, and JSON-only request bodies.

- **Keys.** ``serve.auth.keys`` (:class:`schemas.settings.AuthConfig`): a request names its key as
  ``Authorization: Bearer KEY`` (what OpenAI clients send as their ``api_key``) or ``X-API-Key:
  KEY``. No key, or one we do not know: 401 ``unauthorized``. A key without the route's scope:
  403 ``forbidden``. Routes declare their scope with :func:`require` (and so in the OpenAPI schema);
  ``/healthz`` needs none, ``/metrics`` needs ``read`` unless ``serve.auth.metrics`` is ``open``.
  A request with a body and a missing or unknown key is refused 401 before its body is read
  (:class:`EdgeGuard`; the route still checks the scope): no client without a key gets its body
  parsed, and it gets 401 whatever the body holds.
  No keys configured: every route is open (``riverbed serve`` allows that only on loopback).
  Keys are compared as SHA-256 digests, so neither a key nor its length leaks through timing, and
  no error or log line names a key.
- **Host.** A request whose Host header is not one of :func:`schemas.settings.trusted_hosts`
  gets 400 ``invalid_host``: a web page cannot reach a loopback app through a DNS name it rebound
  to 127.0.0.1.
- **JSON bodies.** A POST, PUT or PATCH with a body must say ``Content-Type: application/json``
  (or ``+json``); anything else is 415 ``unsupported_media_type``. A browser sends a JSON body
  cross-site only after a CORS preflight, which this app never grants, so a web page cannot post
  documents to a local app (no CSRF).

The replica calls :func:`configure` with its settings (one ingress per process).
"""

# No ``from __future__ import annotations``: FastAPI reads the dependencies' annotations at run
# time, and Serve ships this module's functions by value (string annotations would not resolve).
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from deployments.http_errors import ApiError, ASGIApp, Receive, Scope, Send, send_error
from schemas.settings import Scope as KeyScope
from schemas.settings import ServeConfig, trusted_hosts

_BEARER = HTTPBearer(auto_error=False, description="an API key from serve.auth.keys")
_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from serve.auth.keys")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
HeaderKey = Annotated[str | None, Depends(_HEADER)]
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="riverbed"'}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Keyring:
    """The configured keys as digests, each with its scopes (and a label for logs)."""

    scopes: dict[bytes, frozenset[str]]
    labels: dict[bytes, str]
    metrics_open: bool = False

    @classmethod
    def from_config(cls, serve: ServeConfig) -> "Keyring":
        scopes: dict[bytes, frozenset[str]] = {}
        labels: dict[bytes, str] = {}
        for i, key in enumerate(serve.auth.keys):
            digest = _digest(key.key.get_secret_value())
            scopes[digest] = frozenset(key.scopes)
            labels[digest] = key.name or f"keys[{i}]"
        return cls(scopes, labels, serve.auth.metrics == "open")

    @property
    def enabled(self) -> bool:
        return bool(self.scopes)

    def check(self, presented: str | None, scope: KeyScope) -> str | None:
        """The key's label when it may use ``scope``; None when no keys are configured. Raises
        :class:`ApiError` 401 for a missing or unknown key, 403 for one without ``scope``."""
        match = self.identify(presented)
        if match is None:
            return None
        if scope not in self.scopes[match]:
            have = ", ".join(sorted(self.scopes[match]))
            raise ApiError(403, "forbidden", f"this key has scope {have}; this route needs {scope}")
        return self.labels[match]

    def identify(self, presented: str | None) -> bytes | None:
        """The digest of the configured key ``presented`` is; None when no keys are configured.
        Raises :class:`ApiError` 401 for a missing or unknown key."""
        if not self.enabled:
            return None
        if not presented:
            raise ApiError(
                401,
                "unauthorized",
                "an API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                headers=_CHALLENGE,
            )
        digest = _digest(presented)
        match = next((d for d in self.scopes if hmac.compare_digest(d, digest)), None)
        if match is None:
            raise ApiError(401, "unauthorized", "the API key is not valid", headers=_CHALLENGE)
        return match


_keyring = Keyring({}, {})
_hosts: list[str] = ["*"]


def configure(serve: ServeConfig) -> None:
    """Sets this process's keys and trusted hosts (the ingress replica calls it at start)."""
    global _keyring, _hosts
    _keyring = Keyring.from_config(serve)
    _hosts = trusted_hosts(serve)


def keyring() -> Keyring:
    return _keyring


def require(scope: KeyScope) -> Callable[..., Awaitable[None]]:
    """A route dependency: the request's key must hold ``scope`` (see the module's doc).

    Serve pickles this closure by value with the app, and a function pickled by value takes a copy
    of the globals it names: it reads the keys through :func:`keyring` (pickled by reference), so
    it sees what :func:`configure` set in the replica, not the keys of the process that built it."""

    async def check(
        request: Request,
        bearer: Bearer,
        header: HeaderKey,
    ) -> None:
        presented = bearer.credentials if bearer is not None else header
        label = keyring().check(presented, scope)
        if label is not None:
            request.state.api_key = label

    check.__name__ = f"require_{scope}"
    return check


async def require_metrics(
    request: Request,
    bearer: Bearer,
    header: HeaderKey,
) -> None:
    """``/metrics``: the read scope, unless ``serve.auth.metrics`` is ``open``."""
    if not _keyring.metrics_open:
        _keyring.check(bearer.credentials if bearer is not None else header, "read")


_JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _host_allowed(host: str, allowed: list[str]) -> bool:
    if "*" in allowed:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host  # drop the port
    if host.startswith("[") and "]:" in host:
        name = host[: host.index("]") + 1]
    name = name.lower()
    for pattern in allowed:
        pattern = pattern.lower()
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class EdgeGuard:
    """ASGI middleware: 400 for an untrusted Host header, 415 for a body that is not JSON, and 401
    for a body sent without a known key (every route that takes a body needs one), so that no
    request without a key gets its body read and parsed; the route's scope is its dependency's."""

    def __init__(self, app: ASGIApp, hosts: Callable[[], list[str]] = lambda: _hosts) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in (scope.get("headers") or [])}
        host = headers.get(b"host", b"").decode("latin-1")
        if not _host_allowed(host, self.hosts()):
            message = f"the Host header {host!r} is not one this app serves (serve.allowed_hosts)"
            await send_error(send, 400, "invalid_host", message)
            return
        if scope.get("method") in _JSON_METHODS and _has_body(headers):
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if not _is_json(content_type):
                got = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
                message = f"send the body as application/json (got {got})"
                await send_error(send, 415, "unsupported_media_type", message)
                return
            try:
                keyring().identify(_presented_key(headers))
            except ApiError as exc:
                await send_error(send, exc.status, exc.code, exc.message, exc.headers)
                return
        await self.app(scope, receive, send)


def _presented_key(headers: dict[bytes, bytes]) -> str | None:
    """The key as :func:`require` reads it: ``Authorization: Bearer KEY``, else ``X-API-Key``."""
    scheme, _, credentials = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return headers.get(b"x-api-key", b"").decode("latin-1") or None


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    if length is not None:
        return length.strip() not in (b"", b"0")
    return b"transfer-encoding" in headers

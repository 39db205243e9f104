"""The HTTP server's front gate: what every request passes before a route sees it.

`Gate` is a plain ASGI middleware around the FastAPI app:
- Host: the Host header must name one of `allowed_hosts` (localhost names by default), so a web page on another
  site cannot reach a local server through DNS rebinding (its requests carry the attacker's host name).
- Origin: a browser request from another site (an Origin header) is refused unless `cors_origins` allows it;
  allowed origins get CORS headers and their preflight (OPTIONS) is answered here. The server's own page (an
  Origin naming the Host the request came to) is not another site.
- API key: when set, `Authorization: Bearer <key>` on every route (compared in constant time), except the web
  page's own files (GET / and /static/...), which a browser fetches without it and which hold no secret.
- Content-Type: a request with a body must be application/json (a cross-site `text/plain` form POST, which
  browsers send without a preflight, never reaches a route).
- Body: a Content-Length over the limit is refused before a byte is read; a body without one (chunked) is
  counted as it streams and cut off at the limit; a body that stalls for `read_timeout` seconds (or takes
  longer than `body_deadline` in all) gets a 408.

`timed_h11(header_timeout)` is uvicorn's h11 protocol with a deadline for the request line and headers, which
uvicorn does not have: a client that sends half a request and waits is disconnected instead of holding a
connection open indefinitely.

Refusals use OpenAI's error body, as the routes' errors do.
"""

import asyncio
import dataclasses
import json
import secrets
from typing import Optional, Sequence

from omni_jax.serve.protocol import ServeError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclasses.dataclass(frozen=True)
class GateConfig:
  """python -m omni_jax.serve --allowed_hosts / --cors_origins / --api_key / --read_timeout."""
  allowed_hosts: Sequence[str] = LOCAL_HOSTS  # "*" allows any host
  cors_origins: Sequence[str] = ()  # "*" allows any origin
  api_key: Optional[str] = None
  read_timeout: float = 30.0  # seconds a request's headers, or the next piece of its body, may take
  body_deadline: float = 300.0  # seconds a whole body may take

  def __post_init__(self):
    if self.api_key is not None and not self.api_key.strip():
      raise ValueError("--api_key: an empty key would let every request in; leave it unset for no key")
    if self.read_timeout <= 0 or self.body_deadline <= 0:
      raise ValueError(f"--read_timeout ({self.read_timeout}) and the body deadline must be > 0")


def _refused(status: int, message: str, code: str, type_: str = "invalid_request_error") -> ServeError:
  return ServeError(status, message, type=type_, code=code)


def host_name(value: str) -> str:
  """The host of a Host header value, without its port ("[::1]:8000" -> "::1")."""
  value = value.strip().lower()
  if value.startswith("["):
    return value[1:value.index("]")] if "]" in value else value
  return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _headers(scope) -> dict[str, str]:
  out = {}
  for k, v in scope.get("headers", ()):
    out[k.decode("latin-1").lower()] = v.decode("latin-1")
  return out


class Gate:
  """ASGI middleware: checks every HTTP request (see the module doc) before `app` sees it."""

  def __init__(self, app, config: GateConfig, max_body_bytes: int):
    self.app, self.config, self.max_body_bytes = app, config, max_body_bytes
    self.hosts = {h.strip().lower().strip("[]") for h in config.allowed_hosts}
    self.origins = {o.strip().rstrip("/") for o in config.cors_origins}

  def _origin_allowed(self, origin: str, host: str = "") -> bool:
    return "*" in self.origins or origin.rstrip("/") in self.origins or same_origin(origin, host)

  def _cors_headers(self, origin: Optional[str]) -> list[tuple[bytes, bytes]]:
    if not origin:
      return []
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

  def _check(self, scope, headers: dict) -> None:
    """Host, Origin, API key and Content-Type, or a ServeError."""
    if "*" not in self.hosts and host_name(headers.get("host", "")) not in self.hosts:
      raise _refused(400, f"the Host header {headers.get('host', '')!r} is not one this server answers to "
                     "(--allowed_hosts)", "invalid_host")
    origin = headers.get("origin")
    if origin is not None and not self._origin_allowed(origin, headers.get("host", "")):
      raise _refused(403, f"cross-origin requests from {origin!r} are not allowed (--cors_origins)",
                     "origin_not_allowed", "permission_error")
    if self.config.api_key is not None and not _public(scope):
      auth = headers.get("authorization", "")
      scheme, _, token = auth.partition(" ")
      if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                 self.config.api_key.encode()):
        raise _refused(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                       "invalid_api_key", "authentication_error")
    if scope["method"] in ("POST", "PUT", "PATCH"):
      ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
      if ctype != "application/json":
        raise _refused(415, f"the request body must be JSON (Content-Type: application/json), got "
                       f"{ctype or 'none'!r}", "unsupported_media_type")
      length = headers.get("content-length")
      if length is not None:
        if not length.strip().isdigit():
          raise _refused(400, f"bad Content-Length {length!r}", "invalid_request")
        if int(length) > self.max_body_bytes:
          raise _refused(413, f"the request body is {int(length)} bytes; this server takes at most "
                         f"{self.max_body_bytes}", "request_too_large")

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = _headers(scope)
    origin = headers.get("origin")
    cors = self._cors_headers(origin if origin is not None and self._origin_allowed(origin, headers.get("host", ""))
                              else None)
    if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
      return await self._preflight(scope, headers, send, cors)
    try:
      self._check(scope, headers)
    except ServeError as e:
      return await _refuse(send, e, cors)
    started = False

    async def send_with_cors(message):
      nonlocal started
      if message["type"] == "http.response.start":
        started = True
        if cors:
          message = dict(message, headers=list(message.get("headers", [])) + cors)
      await send(message)

    try:
      await self.app(scope, self._bounded(receive), send_with_cors)
    except ServeError as e:
      if not started:
        await _refuse(send, e, cors)

  async def _preflight(self, scope, headers, send, cors) -> None:
    if not cors:
      return await _refuse(send, _refused(403, f"cross-origin requests from {headers['origin']!r} are not "
                                               "allowed (--cors_origins)", "origin_not_allowed",
                                          "permission_error"), [])
    if "*" not in self.hosts and host_name(headers.get("host", "")) not in self.hosts:
      return await _refuse(send, _refused(400, "the Host header is not one this server answers to", "invalid_host"),
                           cors)
    allow = cors + [(b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-max-age", b"600")]
    await send({"type": "http.response.start", "status": 204, "headers": allow})
    await send({"type": "http.response.body", "body": b""})

  def _bounded(self, receive):
    """receive() with the body cap and the read timeouts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + self.config.body_deadline
    state = {"bytes": 0, "body_done": False}

    async def bounded():
      if state["body_done"]:  # after the body, receive() waits for a disconnect: no timeout
        return await receive()
      left = deadline - loop.time()
      try:
        message = await asyncio.wait_for(receive(), timeout=max(0.0, min(self.config.read_timeout, left)))
      except asyncio.TimeoutError:
        raise _refused(408, f"the request body did not arrive in time (read timeout {self.config.read_timeout:g} s)",
                       "request_timeout") from None
      if message["type"] == "http.request":
        state["body_done"] = not message.get("more_body", False)
        state["bytes"] += len(message.get("body", b""))
        if state["bytes"] > self.max_body_bytes:
          raise _refused(413, f"the request body is over {self.max_body_bytes} bytes; this server takes at "
                         f"most {self.max_body_bytes}", "request_too_large")
      return message

    return bounded


def same_origin(origin: str, host: str) -> bool:
  """Whether an Origin header names the host (and port) the request was sent to: the server's own page."""
  scheme, sep, rest = origin.strip().rstrip("/").lower().partition("://")
  return bool(sep) and scheme in ("http", "https") and bool(host) and rest == host.strip().lower()


def _public(scope) -> bool:
  """The web page's files: fetched by a browser, which cannot add the API key to a navigation."""
  path = scope.get("path", "")
  return scope.get("method") in ("GET", "HEAD") and (path == "/" or path.startswith("/static/"))


async def _refuse(send, e: ServeError, extra_headers) -> None:
  body = json.dumps(e.body()).encode()
  headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
             (b"connection", b"close")] + list(extra_headers)
  await send({"type": "http.response.start", "status": e.status, "headers": headers})
  await send({"type": "http.response.body", "body": body})


def timed_h11(header_timeout: float):
  """uvicorn's h11 protocol class, closing a connection whose request line and headers take longer than
  header_timeout seconds (from the connection, or from the end of the previous response)."""
  import h11  # noqa: PLC0415 - the serve extra
  from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: PLC0415

  class TimedH11(H11Protocol):

    def _arm(self) -> None:
      self._disarm()
      self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

    def _disarm(self) -> None:
      timer = getattr(self, "_header_timer", None)
      if timer is not None:
        timer.cancel()
      self._header_timer = None

    def _headers_late(self) -> None:
      self._header_timer = None
      if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
        self.transport.close()

    def connection_made(self, transport):
      super().connection_made(transport)
      self._arm()

    def connection_lost(self, exc):
      self._disarm()
      super().connection_lost(exc)

    def handle_events(self):
      super().handle_events()
      if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has its own timeouts
        self._disarm()

    def on_response_complete(self):
      super().on_response_complete()
      if self.conn.their_state is h11.SEND_BODY:  # answered before its body was read (413, 408): not reusable
        self.transport.close()
      elif not self.transport.is_closing():
        self._arm()

  return TimedH11

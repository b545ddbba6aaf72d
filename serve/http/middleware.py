"""One ASGI middleware in front of every route: API key, body size limit, and the request metrics.

Written as plain ASGI (not Starlette's BaseHTTPMiddleware) so that streamed responses pass through untouched, a
client's disconnect still reaches the route, and the per-request cost stays in microseconds.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from serve.http.errors import APIError, error_bytes
from serve.http.metrics import Metrics

OPEN_PATHS = ("/v2/health/",)  # health probes (Kubernetes, load balancers) never need the key
DEMO_PATH = "/demo"  # the Gradio demo has its own login (a browser cannot send a Bearer header)


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over this server's limit of {limit:,} bytes; send fewer or "
                         "smaller inputs (or raise --max-body-bytes)", code="request_too_large")


class ServerMiddleware:
    """Refuses a request without the API key (401) or with a body over `max_body_bytes` (413, from Content-Length,
    or while a chunked body is read), then records requests, errors and latency per model and route."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        start = time.perf_counter()
        status = 500
        headers = dict(scope["headers"])

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected and not path.startswith(OPEN_PATHS) and not path.startswith(DEMO_PATH):
                given = headers.get(b"authorization")
                if given is None or not hmac.compare_digest(given, self.expected):
                    raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'" if given is None
                                   else "wrong API key in the Authorization header", type="invalid_request_error",
                                   code="invalid_api_key")
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)
            await self.app(scope, self._limited(receive), send_status)
        except APIError as err:  # refused before the app ran: answer here
            status = err.status
            await respond(send, path, err)
        finally:
            if not path.startswith(DEMO_PATH):
                route = scope.get("route")
                model = (scope.get("state") or {}).get("model", "")
                self.metrics.observe_request(model, getattr(route, "path", "unmatched"), status,
                                             time.perf_counter() - start)

    def _limited(self, receive: Any) -> Any:
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        return limited


async def respond(send: Any, path: str, error: APIError) -> None:
    """Send `error` as a complete JSON response (from plain ASGI)."""
    body = error_bytes(path, error)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

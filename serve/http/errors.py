"""HTTP errors: one exception type, written in the shape each API's clients parse.

/v2 routes (Open Inference Protocol): `{"error": "message"}`, as Triton and KServe answer.
Every other route: OpenAI's `{"error": {"message", "type", "param", "code"}}` (the openai client reads it).
"""

from __future__ import annotations

import json
from typing import Any

OIP_PREFIX = "/v2"


class APIError(Exception):
    """A request the server refuses: `status` (4xx, or 503 when overloaded), a message naming the problem and what to
    send instead, and OpenAI's `type` / `param` / `code` fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(name: str, known: list[str]) -> APIError:
    return APIError(404, f"model {name!r} is not served here; served models: {', '.join(known) or 'none'}",
                     param="model", code="model_not_found")


def overloaded(model: str, retry_after_s: int) -> APIError:
    return APIError(503, f"model {model!r} has too many requests waiting; retry after {retry_after_s} s",
                    type="server_overloaded", code="queue_full", headers={"Retry-After": str(retry_after_s)})


def error_body(path: str, error: APIError) -> dict[str, Any]:
    """The JSON body of `error` for a request to `path`."""
    if path.startswith(OIP_PREFIX):
        return {"error": error.message}
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_bytes(path: str, error: APIError) -> bytes:
    return json.dumps(error_body(path, error)).encode()


def json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 saying why not."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data

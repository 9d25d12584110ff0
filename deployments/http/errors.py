"""One error type for every route, and the shapes each API answers it in.

An `ApiError` holds the HTTP status, headers and the OpenAI error body
(`{"error": {"message", "type", "param", "code"}}`); the Anthropic routes answer the same error
as `{"type": "error", "error": {"type", "message"}}` (`anthropic_error_body`).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered with `status_code`; `body` is its OpenAI shape."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}

    @classmethod
    def from_item(cls, item: dict, retry_after_s: int = 1) -> ApiError:
        """From an error item of the model deployment (`hop.ErrorItem`: an engine error, flattened)."""
        err, status = item["error"], int(item.get("status_code", 500))
        headers = (
            {"Retry-After": str(max(1, round(item.get("retry_after_s") or retry_after_s)))} if status == 503 else None
        )
        return cls(
            status,
            err.get("message", "error"),
            type=err.get("type", "server_error"),
            param=err.get("param"),
            code=err.get("code"),
            headers=headers,
        )


def openai_error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)


# --- Anthropic's shape ---------------------------------------------------------------------

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_FROM_OPENAI_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "overloaded_error": "overloaded_error",
    "timeout_error": "timeout_error",
}


def anthropic_error_type(status: int | None, openai_type: str | None) -> str:
    """The Anthropic error type of an error: by status (503 is ours for "busy or loading, retry",
    which Anthropic calls overloaded), else by the OpenAI type (a mid-stream error has no status)."""
    if status in ANTHROPIC_TYPES:
        return ANTHROPIC_TYPES[status]
    if status is not None:
        return "invalid_request_error" if 400 <= status < 500 else "api_error"
    return _FROM_OPENAI_TYPE.get(openai_type or "", "api_error")


def anthropic_error_body(openai_body: dict[str, Any], status: int | None = None) -> dict[str, Any]:
    err = openai_body.get("error") or {}
    return {
        "type": "error",
        "error": {"type": anthropic_error_type(status, err.get("type")), "message": err.get("message", "error")},
    }


def anthropic_error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(
        anthropic_error_body(exc.body, exc.status_code), status_code=exc.status_code, headers=exc.headers
    )

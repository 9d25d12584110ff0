"""The API key check: `Authorization: Bearer <key>`, and on the Anthropic routes `x-api-key: <key>`
too. Keys are compared in constant time; with no key configured every request passes."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError


def _matches(presented: str, key: str) -> bool:
    return hmac.compare_digest(presented.strip().encode(), key.encode())


def has_key(request: Request, key: str, *, x_api_key: bool = False) -> bool:
    """Whether the request presents `key` (as a bearer token, or with `x_api_key` in that header)."""
    header = request.headers.get("x-api-key") if x_api_key else None
    if header is not None and _matches(header, key):
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and _matches(token, key)


def check_api_key(request: Request, key: str | None, *, x_api_key: bool = False) -> None:
    """Raises a 401 unless the request presents the key (None: no key configured)."""
    if not key or has_key(request, key, x_api_key=x_api_key):
        return
    where = "x-api-key: <key> or Authorization: Bearer <key>" if x_api_key else "Authorization: Bearer <key>"
    raise ApiError(401, f"invalid or missing API key ({where})", type="authentication_error", code="invalid_api_key")

"""The request-size limit: a body larger than the router's `max_request_body_bytes` is a 413,
refused by its declared length before it is read, or as soon as what arrives passes the limit."""

from __future__ import annotations

from fastapi import Request

from .errors import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    return bytes(body)

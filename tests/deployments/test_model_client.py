"""The router's side of the hop (deployments.model_client): Ray failures as API errors, and a
request resent when its replica is lost before its first token."""

from __future__ import annotations

import time

import pytest

from deployments.config import RouterConfig
from deployments.hop import GenerateRequest
from deployments.http.errors import ApiError
from engine.request import PromptInput
from tests.fakes import run


def test_ray_queue_limits_become_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    from deployments.model_client import ray_error

    err = ray_error("m1", BackPressureError(num_queued_requests=64, max_queued_requests=64), retry_after_s=3)
    assert err.status_code == 503 and err.headers == {"Retry-After": "3"}
    assert err.body["error"]["code"] == "overloaded"
    assert ray_error("m1", RuntimeError("boom")).status_code == 500


class _Stream:
    """What a streaming handle call returns: an async iterator with cancel(); it fails first
    with `error` when given one."""

    def __init__(self, items=(), error: BaseException | None = None):
        self.items, self.error, self.cancelled = list(items), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.error is not None:
            raise self.error
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class _Handle:
    def __init__(self, streams):
        self.streams, self.sent, self.request_ids = list(streams), 0, []

    def options(self, **_):
        return self

    def remote(self, payload):
        self.sent += 1
        self.request_ids.append(payload.request_id)
        return self.streams.pop(0)


CHUNK = {
    "text": "hi",
    "n_tokens": 1,
    "finish_reason": "stop",
    "usage": {"completion_tokens": 1},
    "request_id": "r",
    "prompt_tokens": 3,
}


def test_a_request_whose_replica_is_lost_before_its_first_token_is_sent_again():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from deployments.model_client import RayModelClient

    def start(streams):
        handle = _Handle(streams)
        client = RayModelClient("m1", handle, RouterConfig())
        now = time.monotonic()
        return handle, run(
            client.start(GenerateRequest(PromptInput(text="hi"), request_id="chatcmpl-1"), now, now + 30)
        )

    lost = [_Stream(error=ActorUnavailableError("node gone", None)), _Stream(error=ActorDiedError())]
    handle, call = start(lost + [_Stream([CHUNK])])
    assert handle.sent == 3 and call._first == CHUNK and all(s.cancelled for s in lost)
    assert len(set(handle.request_ids)) == 3  # each resend under its own engine id (a live replica keeps the first)
    with pytest.raises(ApiError) as refused:  # the request's own error is never resent
        start(
            [
                _Stream(
                    [
                        {
                            "error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None},
                            "status_code": 400,
                            "retry_after_s": None,
                        }
                    ]
                ),
                _Stream([CHUNK]),
            ]
        )
    assert refused.value.status_code == 400
    handle = _Handle([_Stream(error=ActorDiedError()) for _ in range(3)] + [_Stream([CHUNK])])
    with pytest.raises(ApiError) as gone:  # every attempt lost: a clean 503, not a hang
        now = time.monotonic()
        run(RayModelClient("m1", handle, RouterConfig()).start(GenerateRequest(PromptInput(text="hi")), now, now + 30))
    assert gone.value.status_code == 503 and handle.sent == 3

"""What crosses the router → replica hop: chunks merged one way, engine errors flattened into
error items in the shape the router answers."""

from __future__ import annotations

from deployments.hop import error_item, merge_chunks
from engine.errors import InvalidRequestError, OverloadedError
from tests.fakes import USAGE, chunk


def test_chunks_merge_text_tokens_and_logprobs_and_keep_the_last_finish():
    lp = [{"id": 1, "token": "a", "logprob": -1.0, "top": []}]
    merged = merge_chunks([{**chunk("a"), "logprobs": lp}, chunk("bc", 2), chunk("", 0, "stop", USAGE)])
    assert merged == {
        "text": "abc",
        "n_tokens": 3,
        "finish_reason": "stop",
        "usage": USAGE,
        "request_id": "r",
        "prompt_tokens": 3,
        "logprobs": lp,
    }
    assert "logprobs" not in merge_chunks([chunk("a"), chunk("b")])


def test_engine_errors_become_items_with_their_status_and_retry_after():
    bad = error_item(InvalidRequestError("temperature: too hot", param="temperature"))
    assert bad == {
        "error": {
            "message": "temperature: too hot",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        },
        "status_code": 400,
        "retry_after_s": None,
    }
    busy = error_item(OverloadedError("queue full", retry_after_s=2.0))
    assert busy["status_code"] == 503 and busy["retry_after_s"] == 2.0 and busy["error"]["code"] == "overloaded"


def test_merged_chunks_keep_the_last_chunk_s_stop_sequence():
    merged = merge_chunks([chunk("a"), {**chunk("", 0, "stop", USAGE), "stop_sequence": "###"}])
    assert merged["stop_sequence"] == "###"
    assert "stop_sequence" not in merge_chunks([chunk("a"), chunk("b", 1, "stop", USAGE)])

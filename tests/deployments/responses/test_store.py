"""Stored responses (deployments.responses.store): bounded by count and bytes, least recently
used evicted first, and the router's client over any backend."""

from __future__ import annotations

import pytest

from deployments.http.errors import ApiError
from deployments.responses.store import LogBackend, ResponseLog, StoreClient


def test_the_least_recently_used_goes_first_when_the_count_is_full():
    log = ResponseLog(max_responses=2, max_bytes=1000)
    log.put("a", b"1")
    log.put("b", b"2")
    assert log.get("a") == b"1"  # a read is a use: b is now the oldest
    log.put("c", b"3")
    assert (log.get("a"), log.get("b"), log.get("c")) == (b"1", None, b"3")
    assert log.stats() == {"responses": 2, "bytes": 2, "evicted": 1}


def test_bytes_are_bounded_and_a_record_over_the_bound_is_not_kept():
    log = ResponseLog(max_responses=10, max_bytes=10)
    log.put("a", b"aaaa")
    log.put("b", b"bbbb")
    log.put("c", b"cccc")  # 12 bytes: a goes
    assert log.get("a") is None and log.bytes == 8
    assert not log.put("big", b"x" * 11) and log.get("big") is None and len(log) == 2
    log.put("b", b"bb")  # replacing counts the new size only
    assert log.bytes == 6


def test_delete_says_whether_it_had_the_record():
    log = ResponseLog(4, 100)
    log.put("a", b"1")
    assert log.delete("a") and not log.delete("a") and log.bytes == 0


class Broken:
    async def put(self, response_id, record=None):
        raise ConnectionError("store replica is gone")

    get = delete = put


async def test_the_client_keeps_records_as_json_and_survives_a_store_that_fails():
    client = StoreClient(LogBackend(4, 10_000))
    assert await client.put({"id": "resp_1", "output": []}, [{"type": "message", "role": "user", "content": "hi"}])
    record = await client.get("resp_1")
    assert record == {
        "response": {"id": "resp_1", "output": []},
        "items": [{"type": "message", "role": "user", "content": "hi"}],
    }
    assert await client.delete("resp_1") and await client.get("resp_1") is None
    assert not await StoreClient(Broken()).put({"id": "resp_2"}, [])  # logged, not raised


async def test_a_store_that_cannot_be_reached_is_a_503_to_retry():
    for call in (StoreClient(Broken()).get, StoreClient(Broken()).delete):
        with pytest.raises(ApiError) as info:
            await call("resp_1")
        assert info.value.status_code == 503 and info.value.body["error"]["code"] == "store_unavailable"

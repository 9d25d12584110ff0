"""benchmarks.client's model-list helpers over a mock transport: cards by id, states, not-up-yet."""

from __future__ import annotations

import httpx
import pytest

from benchmarks import client

CARDS = {"data": [{"id": "a", "state": "loaded"}, {"id": "b", "state": "unloaded"}]}


def serve(monkeypatch, handler) -> None:
    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(client.httpx, "get", lambda url, timeout: httpx.Client(transport=transport).get(url))
    monkeypatch.setattr(client.time, "sleep", lambda s: None)


def test_cards_and_states_by_model_id(monkeypatch):
    serve(monkeypatch, lambda request: httpx.Response(200, json=CARDS))
    assert list(client.model_cards()) == ["a", "b"]
    assert client.model_states() == {"a": "loaded", "b": "unloaded"}
    client.wait_for_state("b", "unloaded", timeout_s=1)


def test_a_server_not_up_yet_has_no_states_and_waiting_gives_up(monkeypatch):
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    serve(monkeypatch, refuse)
    assert client.model_states() == {}
    with pytest.raises(SystemExit, match="a not loaded"):
        client.wait_for_state("a", "loaded", timeout_s=0)

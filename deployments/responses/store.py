"""Stored responses: what `previous_response_id`, `GET` and `DELETE /v1/responses/{id}` read.

A record is one finished response and the conversation it answered (its input items, the
earlier turns' included), as JSON bytes. `ResponseLog` keeps records in memory, bounded by
count and bytes, least recently used evicted first (a read counts as a use); an id it never had
or evicted reads as None, which the API answers with a 404.

The log lives in one `ResponseStore` replica, a Ray Serve deployment of the application, and
every router replica reaches it through its deployment handle (`StoreClient`). Why a deployment
and not a named actor: Serve creates it with the application and removes it with it, restarts it
if its process dies, health-checks it, and hands the routers its handle through `bind()` (no
global name to collide with another application, no blocking `ray.get`: handle calls are
awaited on the router's event loop); a named actor would need its own lifetime (detached: it
outlives the application; owned by one router replica: it dies with it). Its methods are async
and never await, so each runs whole on the replica's event loop: no locks. It must stay one
replica (the records are not shared between replicas); a restarted replica starts empty, and
the ids it had answer 404.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Protocol

from ray import serve

from ..http.errors import ApiError

log = logging.getLogger("ray.serve")


class ResponseLog:
    """Records by response id, at most `max_responses` of them and `max_bytes` in all."""

    def __init__(self, max_responses: int, max_bytes: int):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self._records: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._records)

    def put(self, response_id: str, record: bytes) -> bool:
        """Keeps a record (replacing one of the same id), evicting the least recently used ones
        until both bounds hold; a record larger than `max_bytes` alone is not kept (False)."""
        self.delete(response_id)
        if len(record) > self.max_bytes:
            return False
        self._records[response_id] = record
        self.bytes += len(record)
        while len(self._records) > self.max_responses or self.bytes > self.max_bytes:
            _, old = self._records.popitem(last=False)
            self.bytes -= len(old)
            self.evicted += 1
        return True

    def get(self, response_id: str) -> bytes | None:
        record = self._records.get(response_id)
        if record is not None:
            self._records.move_to_end(response_id)
        return record

    def delete(self, response_id: str) -> bool:
        record = self._records.pop(response_id, None)
        if record is not None:
            self.bytes -= len(record)
        return record is not None

    def stats(self) -> dict[str, int]:
        return {"responses": len(self._records), "bytes": self.bytes, "evicted": self.evicted}


class LogBackend:
    """A ResponseLog behind async methods: the body of the ResponseStore deployment, and on its
    own the backend of a router that runs alone (the tests' `create_app`)."""

    def __init__(self, max_responses: int, max_bytes: int):
        self.log = ResponseLog(max_responses, max_bytes)

    async def put(self, response_id: str, record: bytes) -> bool:
        return self.log.put(response_id, record)

    async def get(self, response_id: str) -> bytes | None:
        return self.log.get(response_id)

    async def delete(self, response_id: str) -> bool:
        return self.log.delete(response_id)

    async def stats(self) -> dict[str, int]:
        return self.log.stats()


# The one replica that holds the application's ResponseLog (see the module's docstring).
ResponseStore = serve.deployment(
    name="ResponseStore", num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}
)(LogBackend)


class Backend(Protocol):
    """What a StoreClient calls: a LogBackend, or a ResponseStore handle's methods."""

    async def put(self, response_id: str, record: bytes) -> bool: ...

    async def get(self, response_id: str) -> bytes | None: ...

    async def delete(self, response_id: str) -> bool: ...


class HandleBackend:
    """A ResponseStore's deployment handle as a Backend."""

    def __init__(self, handle):
        self.handle = handle

    async def put(self, response_id: str, record: bytes) -> bool:
        return await self.handle.put.remote(response_id, record)

    async def get(self, response_id: str) -> bytes | None:
        return await self.handle.get.remote(response_id)

    async def delete(self, response_id: str) -> bool:
        return await self.handle.delete.remote(response_id)


class StoreClient:
    """The router's side of the store: records as dicts, `{"response": ..., "items": [...]}`."""

    def __init__(self, backend: Backend):
        self.backend = backend

    async def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> bool:
        """Keeps a finished response; a store that cannot (gone, or the record too large) is
        logged, and the response is still answered (reading it later is a 404)."""
        record = json.dumps({"response": response, "items": items}, separators=(",", ":")).encode()
        try:
            kept = await self.backend.put(response["id"], record)
        except Exception as exc:  # noqa: BLE001 - the answer does not depend on keeping it
            log.warning("response %s was not stored: %s", response["id"], exc)
            return False
        if not kept:
            log.warning("response %s was not stored: %d bytes is over the store's limit", response["id"], len(record))
        return kept

    async def get(self, response_id: str) -> dict[str, Any] | None:
        record = await self._reach(self.backend.get(response_id))
        return json.loads(record) if record is not None else None

    async def delete(self, response_id: str) -> bool:
        return await self._reach(self.backend.delete(response_id))

    async def _reach(self, call):
        """A store that cannot be reached (its replica restarting) is a 503 to retry, not a 500."""
        try:
            return await call
        except Exception as exc:  # noqa: BLE001 - Ray's errors for an unreachable replica vary
            log.warning("the response store is unavailable: %s", exc)
            raise ApiError(
                503, "the response store is unavailable; retry", type="server_error", code="store_unavailable"
            ) from exc

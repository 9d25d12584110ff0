"""Status reads (GET /metrics, /health, a model's cache card) straight from the replica actors.

A call through a model's deployment handle is a request to Ray Serve: the handle counts it in the
deployment's `total_num_requests`, the demand the memory governor reads. A scrape would then make
every loaded model look used a moment ago; a Prometheus scrape or a /health poll more often than
`keep_alive` would keep every model resident, and the LRU order between loaded models would be
chance. So status reads take the way Ray's controller takes for its own health checks and routing
stats: the replica actor's `check_health` and `record_routing_stats`, which run the deployment's
hooks of the same names (ModelServer's routing stats carry its engine stats under "engine") and
count as no request.

The running replicas' actor names come from the router's ModelDirectory (Ray's serve details).
A replica gone since its last poll raises ReplicaGone; the router (RouterCore.model_stats and
.model_health) then polls again and reads once more, and reports a model that has meanwhile
unloaded by its state. Only a model whose actor names the directory does not have (no governor)
is read through the handle."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import ray

SERVE_NAMESPACE = "serve"  # ray.serve._private.constants.SERVE_NAMESPACE
MAX_ACTORS = 256  # handles kept (LRU): every load starts a replica of a new name


class ReplicaGone(Exception):
    """None of the actor names still names a live replica."""


class ReplicaStatus:
    """Actor handles by name (a lookup asks the GCS, once per replica; the latest MAX_ACTORS kept)."""

    def __init__(self):
        self._actors: OrderedDict[str, Any] = OrderedDict()

    async def _actor(self, name: str):
        actor = self._actors.get(name)
        if actor is None:
            try:
                actor = await asyncio.to_thread(ray.get_actor, name, SERVE_NAMESPACE)
            except ValueError:  # replaced since the directory's last poll
                return None
            self._actors[name] = actor
            while len(self._actors) > MAX_ACTORS:
                self._actors.popitem(last=False)
        self._actors.move_to_end(name)
        return actor

    async def _call(self, name: str, method: str, timeout_s: float):
        actor = await self._actor(name)
        if actor is None:
            raise ReplicaGone(name)
        try:
            return await asyncio.wait_for(getattr(actor, method).remote(), timeout_s)
        except ray.exceptions.RayActorError:
            self._actors.pop(name, None)
            raise ReplicaGone(name) from None

    async def stats(self, actors: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        """The first live replica's engine stats (ModelServer.record_routing_stats' "engine")."""
        for name in actors:
            try:
                report = await self._call(name, "record_routing_stats", timeout_s)
            except ReplicaGone:
                continue
            if isinstance(report.get("engine"), dict):
                return report["engine"]
        raise ReplicaGone(", ".join(actors))

    async def health(self, actors: tuple[str, ...], timeout_s: float) -> None:
        """Every replica's health check (raises the first failure); ReplicaGone when none is left."""
        checked = 0
        for name in actors:
            try:
                await self._call(name, "check_health", timeout_s)
            except ReplicaGone:
                continue
            checked += 1
        if not checked:
            raise ReplicaGone(", ".join(actors))

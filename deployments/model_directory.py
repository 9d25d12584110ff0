"""What the router knows of every configured model: loaded, loading, unloading or unloaded.

The governor (deployments.governor) decides; Ray Serve starts and stops the replicas; this
module watches. It polls Ray Serve's own status (what `serve.status()` reports, replicas per
state per deployment, read from the controller's details: `_serve_status`) twice a second while
something may change (a model loading or unloading, for ACTIVE_S after a request for a model that
is not loaded or a load/unload call) and every IDLE_POLL_S otherwise, since each poll costs the
router and Ray's controller CPU that the models' compute threads would rather have; it turns
transitions into the figures operators read: state, loads, unloads, cold-start seconds, bytes. It
never calls an unloaded model (a call would queue a request and so load it), and calls a loaded
one only once per replica, for its measured footprint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from .settings import ModelFacts

log = logging.getLogger("ray.serve")

POLL_S = 0.5  # while a model is changing state, or may be about to
IDLE_POLL_S = 5.0  # otherwise
ACTIVE_S = 10.0  # how long after a request for an unloaded model (or a load/unload call) polling stays fast
LOADED, LOADING, UNLOADING, UNLOADED = "loaded", "loading", "unloading", "unloaded"
_STARTING = ("STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION")


def model_state(replica_states: dict[str, int]) -> str:
    """One deployment's replica counts (by Ray's ReplicaState name) as a model state."""
    count = {str(getattr(k, "value", k)): v for k, v in replica_states.items() if v}
    if count.get("RUNNING"):
        return LOADED
    if any(count.get(s) for s in _STARTING):
        return LOADING
    if count.get("STOPPING"):
        return UNLOADING
    return UNLOADED


@dataclass
class ModelRecord:
    name: str
    facts: ModelFacts  # from the builder
    state: str = UNLOADED
    replica: dict | None = None  # the loaded replica's own info: pid, loaded_at, cold_start_s, footprint
    last_used: float | None = None  # wall time of the last request this router sent it
    loads: int = 0
    unloads: int = 0
    cold_starts: list = field(default_factory=list)  # seconds from replica start to ready, per load
    seen_replicas: set = field(default_factory=set)
    load_error: str | None = None  # Ray's message while the deployment fails to start its replicas
    actors: tuple[str, ...] = ()  # the running replicas' actor names, for status reads (replica_status)

    @property
    def footprint_bytes(self) -> int:
        measured = (self.replica or {}).get("footprint", {}).get("total")
        return int(measured or self.facts.footprint_bytes)

    def card(self) -> dict[str, Any]:
        keep_alive = self.facts.keep_alive_s
        return {
            "state": self.state,
            "load": self.facts.load,
            "keep_alive": "forever" if keep_alive is None else keep_alive,
            "footprint_bytes": self.footprint_bytes,
            "footprint": (self.replica or {}).get("footprint")
            or {"total": self.facts.footprint_bytes, "measured": False},
            "last_used": self.last_used,
            "loads": self.loads,
            "unloads": self.unloads,
            "pid": (self.replica or {}).get("pid") if self.state == LOADED else None,
            **({"load_error": self.load_error} if self.load_error else {}),
        }


class ModelDirectory:
    """Polls Ray Serve's status for the app's model deployments (`read_status`, replaceable in
    tests) and keeps one ModelRecord per model; the router's metrics read the records."""

    def __init__(
        self,
        facts: dict[str, dict | ModelFacts],
        budget_bytes: int,
        fetch_info: Callable[[str], Awaitable[dict]],
        app_name: str | None = None,
        read_status: Callable[[], Any] | None = None,
    ):
        self.models = {name: ModelRecord(name, ModelFacts.model_validate(f)) for name, f in facts.items()}
        self.budget_bytes = budget_bytes
        self._fetch_info = fetch_info
        self._app_name = app_name
        self._read_status = read_status or _serve_status
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._active_until = 0.0
        self._refreshing = asyncio.Lock()  # the watch loop's poll and a load call's: one at a time
        self.polled_at = 0.0

    def start(self) -> None:
        """Start watching (idempotent; needs the router's event loop)."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, name: str) -> ModelRecord:
        return self.models[name]

    def touch(self, name: str) -> None:
        """A request for this model: a model that is not loaded starts loading now (and the
        governor may unload others for it), so poll fast; requests to loaded models change nothing."""
        rec = self.models[name]
        rec.last_used = time.time()
        if rec.state != LOADED:
            self.expect_change()

    def expect_change(self) -> None:
        """Poll fast for the next ACTIVE_S: a request or a load/unload call may start a transition."""
        was_idle = time.monotonic() >= self._active_until
        self._active_until = time.monotonic() + ACTIVE_S
        if was_idle and self._wake is not None:
            self._wake.set()

    def _poll_interval(self) -> float:
        changing = any(r.state in (LOADING, UNLOADING) for r in self.models.values())
        return POLL_S if changing or time.monotonic() < self._active_until else IDLE_POLL_S

    def used_bytes(self) -> int:
        """Bytes reserved by the models that are loaded or on their way (as the governor counts them)."""
        return sum(
            r.footprint_bytes * r.facts.replicas
            for r in self.models.values()
            if r.state in (LOADED, LOADING, UNLOADING)
        )

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep watching; the next poll may work
                log.debug("reading Ray Serve status failed", exc_info=True)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_interval())
            except TimeoutError:
                pass

    async def refresh(self) -> None:
        async with self._refreshing:
            await self._refresh()

    async def _refresh(self) -> None:
        status = await asyncio.to_thread(self._read_status)
        apps = getattr(status, "applications", {}) or {}
        app = apps.get(self._app_name) if self._app_name else next(iter(apps.values()), None)
        if app is None:
            return
        deployments = getattr(app, "deployments", {}) or {}
        for rec in self.models.values():
            dep = deployments.get(rec.facts.deployment)
            await self._update(rec, model_state(dep.replica_states) if dep is not None else UNLOADED)
            rec.actors = tuple(getattr(dep, "running_actors", ())) if rec.state == LOADED else ()
            rec.load_error = _load_error(dep) if rec.state != LOADED else None
        self.polled_at = time.monotonic()

    async def _update(self, rec: ModelRecord, state: str) -> None:
        """Take one poll's state. A model turns LOADED only with its new replica's info in hand,
        so that no reader sees it loaded with the info of the replica before."""
        before = rec.state
        fetch = state == LOADED and (rec.replica is None or before != LOADED)
        if fetch:
            try:
                rec.replica = await asyncio.wait_for(self._fetch_info(rec.name), 10.0)
            except Exception:  # noqa: BLE001 - try again at the next poll
                rec.state = before if before != LOADED else LOADING
                return
        rec.state = state
        if fetch:
            key = (rec.replica.get("pid"), rec.replica.get("loaded_at"))
            if key not in rec.seen_replicas:
                rec.seen_replicas.add(key)
                rec.loads += 1
                rec.cold_starts.append(rec.replica.get("cold_start_s"))
        if before in (LOADED, UNLOADING) and state == UNLOADED:
            rec.unloads += 1
        if before != rec.state:
            log.info("model %s: %s -> %s", rec.name, before, rec.state)


FAILED = ("UNHEALTHY", "DEPLOY_FAILED")


def _load_error(dep) -> str | None:
    """Ray's message when the deployment's replicas fail to start (a load that fails)."""
    status = str(getattr(getattr(dep, "status", None), "value", getattr(dep, "status", "")))
    if status not in FAILED:
        return None
    message = str(getattr(dep, "message", "") or status)
    last = [line.strip() for line in message.splitlines() if line.strip()]
    return last[-1][:500] if last else status


def _serve_status():
    """Ray Serve's status as `serve.status()` gives it, read from the controller's details dict.

    `serve.status()` parses that dict into pydantic models, and parsing a deployment's request-router
    config cloudpickles the router class by value (Ray 2.60), walking every module loaded: on a
    busy 2-core host, a quarter of all the GIL the router held (the lab notebook); the same dict
    read as it is costs almost nothing. Ray pinned (pyproject); a Ray without this client method
    gets `serve.status()`.
    """
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return SimpleNamespace(applications={})
    if not hasattr(client, "get_serve_details"):
        from ray import serve

        return serve.status()
    return status_view(client.get_serve_details())


def status_view(details: dict) -> SimpleNamespace:
    """What `serve.status()` reports, from the controller's details: per application and deployment,
    the replica count per state, the deployment's status and its message; and (not in
    `serve.status()`) the running replicas' actor names."""
    apps = {}
    for app_name, app in (details.get("applications") or {}).items():
        deployments = {}
        for name, dep in (app.get("deployments") or {}).items():
            replicas = dep.get("replicas") or ()
            states = Counter(_value(r.get("state")) for r in replicas)
            deployments[name] = SimpleNamespace(
                replica_states=dict(states),
                status=_value(dep.get("status")),
                message=dep.get("message") or "",
                running_actors=[
                    r["actor_name"] for r in replicas if _value(r.get("state")) == "RUNNING" and r.get("actor_name")
                ],
            )
        apps[app_name] = SimpleNamespace(deployments=deployments)
    return SimpleNamespace(applications=apps)


def _value(enum_or_str) -> str:
    return str(getattr(enum_or_str, "value", enum_or_str))

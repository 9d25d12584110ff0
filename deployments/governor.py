"""The memory governor: which models are loaded, under one host budget.

Every model is a Ray Serve deployment that autoscales between 0 replicas (unloaded: its process
is gone, and all its memory with it) and its `num_replicas` (loaded). Ray Serve does the work:
requests for a model with no replica wait in the handle's queue while one starts, and one
replica means one load however many requests wait. What it does not know is the budget, so the
application's `autoscaling_policy` is `governor_policy` below: every control-loop tick (0.1 s)
Ray hands it one AutoscalingContext per model and it answers how many replicas each should
have. The decision is `plan()`, a pure function of what every model costs, uses and waits for:

1. A loaded model idle for its keep_alive, or one an operator asked to unload, unloads. When
   the loaded models no longer fit (the budget shrank, or, with `memory.per_node`, a node left
   and its replicas find no node with room), idle models unload, least recently used first.
2. Cold models with waiting requests are taken first come, first served. One that fits in what
   is free loads (per node: each of its replicas finds a live node with room, next to the
   replicas already placed there; see `Room`). One that does not makes room: the least
   recently used idle, unpinned loaded models unload until it fits (ranked once each has
   reported from after its first request, or after FRESH_REPORT_WAIT_S), and it loads once
   their memory is really returned (their replicas are gone). While nothing can be freed (the others
   are busy or pinned) it waits, and so do the cold models behind it; its requests get 503 at
   the router after load_timeout_s.
3. A model that is serving (requests running or queued) is never unloaded.
4. A load that no request has waited for in load_timeout_s (its replica keeps failing to start,
   and the requests that wanted it got 503) is given up, so that it stops holding budget. A slow
   load lives as long as requests keep coming for it (a client retrying after its 503 too).

Omitting a model from the answer leaves it as it is: that is how a cold model waits (Ray's own
cold-start path would otherwise start any deployment with queued requests at once).

Inputs per model come from Ray: running/target replicas and queued + running requests; from
the model's replicas, as custom autoscaling metrics (ModelServer.record_autoscaling_stats): the
measured footprint, seconds idle and an operator's unload request; and from the builder, in the
deployment's `autoscaling_config.policy.policy_kwargs`: the budget, keep_alive and the estimated
footprint (used until a replica has measured it). A model's idle time is the less of its
replicas' latest report (aged to now) and the time since this policy last saw it had requests:
reports come in batches and can predate the model's latest request. Each replica also reports
the node it runs on (a metric named NODE_METRIC + node id). When a model asks for node
resources (`memory.per_node`, `deployment.resources` such as an `apple_gpu` per Mac, or
`deployment.max_replicas_per_node`), the live nodes' resources come from Ray every 5 s
(ClusterNodes), and every replica must find what it needs free on one node.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .settings import KEEP_ALIVE_S, LOAD_TIMEOUT_S, PolicyKwargs

log = logging.getLogger("ray.serve")

POLICY_PATH = "deployments.governor:governor_policy"
# Ray counts a stopping replica as gone at once, but its process frees its memory only when it
# exits (graceful shutdown, then the actor is killed): an unloaded model's footprint stays
# counted this long after its target went to 0 (an idle replica stops in ~0.6 s here).
RELEASE_S = 2.0
# An eviction waits up to this long for every idle candidate to report from after the cold model's
# first request: a report from before it may miss that candidate's latest use (reports come every
# 0.5 s, in batches), and the governor would evict a model used a moment ago (CI caught it).
FRESH_REPORT_WAIT_S = 2.0
FALLBACK_POLICY_PATH = "deployments.governor:keep_alive_policy"
NODE_METRIC = "on_node:"  # + node id: the custom autoscaling metric naming a replica's node


@dataclass(frozen=True)
class ModelUsage:
    """What the governor knows of one model at one instant."""

    name: str
    footprint: int  # bytes per replica: weights + KV pool + working memory
    full: int  # replicas when loaded
    replicas: int = 0  # running now
    target: int = 0  # what Ray is converging to (0: unloaded or unloading)
    demand: float = 0.0  # requests running or queued at the handles
    idle_s: float = 0.0  # seconds since it last served a request
    keep_alive_s: float | None = KEEP_ALIVE_S  # None: pinned
    unload_requested: bool = False
    waiting_since: float | None = None  # when requests started waiting for it while unloaded
    releasing: bool = False  # unloaded a moment ago: its process may still be exiting
    loading_s: float = 0.0  # how long it has had a target but no running replica, and no request
    load_timeout_s: float = LOAD_TIMEOUT_S
    reserve: int = 0  # bytes of a node's `memory` each replica reserves (memory.per_node; 0: footprint)
    nodes: tuple[str, ...] = ()  # the node of each running replica
    resources: tuple[tuple[str, float], ...] = ()  # Ray custom resources each replica holds
    max_per_node: int | None = None  # deployment.max_replicas_per_node
    reported_at: float | None = None  # wall time of the stalest replica's latest idle report

    @property
    def held_count(self) -> int:
        """Replicas it holds or is about to hold (a stopping replica still holds its memory)."""
        return max(self.replicas, self.target, self.full if self.releasing else 0, len(self.nodes))

    @property
    def holds(self) -> int:
        """Bytes it holds or is about to hold."""
        return self.footprint * self.held_count

    @property
    def placements(self) -> list[str | None]:
        """The node of each replica it holds or will hold (None: not placed yet)."""
        return [*self.nodes, *[None] * (self.held_count - len(self.nodes))]

    @property
    def need(self) -> dict[str, float]:
        """What each replica holds on its node: `memory` (its reservation) and custom resources."""
        return {"memory": self.reserve or self.footprint, **dict(self.resources)}

    @property
    def busy(self) -> bool:
        return self.demand > 0

    @property
    def loaded(self) -> bool:
        return self.target > 0

    @property
    def evictable(self) -> bool:
        return self.loaded and not self.busy and self.keep_alive_s is not None and self.replicas >= self.target


@dataclass
class Plan:
    targets: dict[str, int] = field(default_factory=dict)  # models to change; absent: leave as is
    reasons: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, replicas: int, reason: str) -> None:
        self.targets[name] = replicas
        self.reasons[name] = reason


def plan(
    models: list[ModelUsage],
    budget: int,
    nodes: dict[str, dict[str, float]] | None = None,
    now: float | None = None,
) -> Plan:
    """The governor's decision: replica targets for the models that must change. `nodes`: each
    live node's resources that replicas hold (see Room), where every replica must also find room.
    `now` (wall time): an eviction waits for reports newer than the cold model's first request
    (see `_reports_behind`); without it, the reports are taken as they are."""
    out, room = Plan(), Room(budget, nodes)
    for m in models:
        if m.loaded and m.replicas == 0 and not m.busy and m.loading_s > m.load_timeout_s:
            out.set(m.name, 0, f"gave up a load that no request has waited for in {m.loading_s:.0f}s")
        elif m.loaded and not m.busy and m.keep_alive_s is not None:
            if m.unload_requested:
                out.set(m.name, 0, "unload requested")
            elif m.idle_s >= m.keep_alive_s:
                out.set(m.name, 0, f"idle {m.idle_s:.0f}s >= keep_alive {m.keep_alive_s:.0f}s")
    held = list(models)
    if not room.fits(held):  # over budget (a node left, or footprints measured larger): idle models yield
        staying = [m for m in models if m.name not in out.targets]
        for v in _lru_victims(models, out, staying, room, partial=True):
            out.set(
                v.name,
                0,
                f"evicted (least recently used, idle {v.idle_s:.0f}s): the loaded models do not "
                f"fit {room} (it shrank, or footprints measured larger than estimated)",
            )
    cold = sorted((m for m in models if not m.loaded and m.busy), key=lambda m: (m.waiting_since or 0.0, m.name))
    for m in cold:
        wanted = replace(m, target=m.full)
        if room.fits([*held, wanted]):
            out.set(m.name, m.full, f"load: needs {m.footprint * m.full >> 20} MiB, which fits {room}")
            held.append(wanted)
            continue
        staying = [x for x in held if x.loaded and out.targets.get(x.name) != 0]  # what is released: back
        if now is not None and _reports_behind(models, out, m, now):
            break  # rank the candidates once each has reported from after m's first request
        victims = _lru_victims(models, out, [*staying, wanted], room)
        if victims is None:
            break  # nothing can make room now: it (and everything queued behind it) waits
        kept = ", ".join(_standing(x) for x in staying if x.name not in {v.name for v in victims})
        for v in victims:
            out.set(v.name, 0, f"evicted (least recently used, idle {v.idle_s:.0f}s) to load {m.name}; kept: {kept}")
        break  # it loads once the memory is really returned
    return out


class Room:
    """Where replicas can go: a byte budget for their footprints, and the live nodes' resources
    (`nodes`: {node id: {resource: amount}}) for what each replica holds on its node: its
    `memory` reservation (with memory.per_node: `memory` is then in the node's dict) and the
    custom resources it asks for (e.g. one `apple_gpu` per Mac), at most max_replicas_per_node
    of a model on one node. A placed replica holds its share of its node (on a node that left,
    nothing); the unplaced ones (pending, or about to start) must each find a node with all of
    it free, largest first, on the fullest node that has it (best fit, as a scheduler would
    place them: Ray never splits a replica across nodes). Resources that the nodes do not list
    are not checked: without memory.per_node, a replica's memory is only the budget's."""

    def __init__(self, budget: int, nodes: dict[str, dict[str, float]] | None = None):
        self.budget, self.nodes = budget, {n: dict(r) for n, r in (nodes or {}).items()}
        self._checked = {k for r in self.nodes.values() for k in r}

    def fits(self, models: list[ModelUsage]) -> bool:
        if sum(m.holds for m in models) > self.budget:
            return False
        if not self.nodes:
            return True
        free, count, unplaced = {n: dict(r) for n, r in self.nodes.items()}, Counter(), []
        for m in models:
            need = {k: v for k, v in m.need.items() if k in self._checked}
            for node in m.placements:
                if node in free:
                    _take(free[node], need)
                    count[m.name, node] += 1
                else:
                    unplaced.append((m, need))
        for m, need in sorted(unplaced, key=lambda u: -u[1].get("memory", 0)):
            fitting = [
                n
                for n, f in free.items()
                if all(f.get(k, 0) >= v for k, v in need.items())
                and (m.max_per_node is None or count[m.name, n] < m.max_per_node)
            ]
            if not fitting:
                return False
            node = min(fitting, key=lambda n: free[n].get("memory", 0))
            _take(free[node], need)
            count[m.name, node] += 1
        return all(v >= 0 for f in free.values() for v in f.values())

    def __str__(self) -> str:
        text = f"the budget of {self.budget >> 20} MiB"
        if self.nodes:
            text += f" and {len(self.nodes)} node(s)"
            if "memory" in self._checked:
                text += f" of {'/'.join(str(int(r.get('memory', 0)) >> 20) for r in self.nodes.values())} MiB"
        return text


def _take(free: dict[str, float], need: dict[str, float]) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0) - v


def _reports_behind(models: list[ModelUsage], out: Plan, cold: ModelUsage, now: float) -> bool:
    """Whether some idle candidate's latest report predates the cold model's first request (it may
    have served a request since), while that request has waited less than FRESH_REPORT_WAIT_S."""
    since = cold.waiting_since
    if since is None or now - since >= FRESH_REPORT_WAIT_S:
        return False
    candidates = (x for x in models if x.evictable and x.name not in out.targets)
    return any(x.reported_at is not None and x.reported_at < since for x in candidates)


def _standing(m: ModelUsage) -> str:
    """Why a loaded model was kept, for the eviction's log line."""
    if m.busy:
        return f"{m.name} (busy)"
    return f"{m.name} (idle {m.idle_s:.1f}s)" if m.evictable else f"{m.name} (pinned or starting)"


def _lru_victims(
    models: list[ModelUsage], out: Plan, staying: list[ModelUsage], room: Room, partial: bool = False
) -> list[ModelUsage] | None:
    """Idle unpinned models to unload, longest idle first, until `staying` fits the room; [] when
    it already does (memory being released is enough); None when no victims make it fit
    (`partial`: then every idle model, as much as can be freed)."""
    picked = []
    for v in sorted((x for x in models if x.evictable and x.name not in out.targets), key=lambda x: -x.idle_s):
        if room.fits(staying):
            return picked
        picked.append(v)
        staying = [x for x in staying if x.name != v.name]
    return picked if partial or room.fits(staying) else None


# --- the Ray Serve glue --------------------------------------------------------------------


def governor_kwargs(**kwargs: Any) -> dict[str, Any]:
    """What the builder puts in a model deployment's autoscaling_config.policy.policy_kwargs
    (`PolicyKwargs`' fields, checked here; Ray carries them as a dict)."""
    return PolicyKwargs(**kwargs).model_dump()


_NOT_CUSTOM = {"CPU", "GPU", "memory", "object_store_memory"}  # Ray's own resources (and "node:…")


class ClusterNodes:
    """Each live node's resources that model replicas hold, by node id: its custom resources
    (`apple_gpu`…) and, with `memory` (memory.per_node), its `memory`. Read from Ray at most
    every `every_s` (the policy runs ten times a second)."""

    def __init__(self, every_s: float = 5.0, nodes: Callable[[], list[dict]] | None = None):
        self.every_s, self._nodes = every_s, nodes
        self._at, self._resources = float("-inf"), None

    def __call__(self, now: float, memory: bool = True) -> dict[str, dict[str, float]] | None:
        if now - self._at >= self.every_s:
            self._at = now
            try:
                nodes = self._nodes() if self._nodes else _ray_nodes()
                self._resources = {
                    n["NodeID"]: _held_resources(n.get("Resources") or {}) for n in nodes if n.get("Alive")
                }
            except Exception:  # noqa: BLE001 - keep the last figure; the configured budget still holds
                log.warning("governor: could not read the cluster's nodes", exc_info=True)
        if not self._resources:
            return None
        return {n: {k: v for k, v in r.items() if memory or k != "memory"} for n, r in self._resources.items()}


def _held_resources(resources: dict[str, float]) -> dict[str, float]:
    return {
        k: (int(v) if k == "memory" else v)
        for k, v in resources.items()
        if k == "memory" or (k not in _NOT_CUSTOM and ":" not in k)
    }


def _ray_nodes() -> list[dict]:
    import ray

    return ray.nodes()


CLUSTER_NODES = ClusterNodes()


def _replica_nodes(metrics: dict) -> tuple[str, ...]:
    """The node of each running replica, from the NODE_METRIC each one reports."""
    return tuple(
        metric[len(NODE_METRIC) :]
        for metric, replicas in metrics.items()
        if metric.startswith(NODE_METRIC)
        for _ in replicas
    )


def _latest_idle(ctx, now: float) -> tuple[float | None, float | None]:
    """Seconds idle now by each replica's latest report, the largest over replicas, and when the
    stalest of those reports was made (None, None before any). Not the look-back window's mean
    (`aggregated_metrics`), which lags: a model used one second ago could read as idler than one
    used two seconds ago, and be kept while the other is evicted. Each report aged to now: a replica
    idle at its report has been idle since, and one busy then has not been busy since unless
    requests show it (demand); a replica's reports reach the controller in batches, so its latest
    one can be seconds old (an eviction waits for newer ones: `_reports_behind`)."""
    series = (getattr(ctx, "raw_metrics", None) or {}).get("idle_s") or {}
    latest = [max(points, key=lambda p: p.timestamp) for points in series.values() if points]
    if not latest:
        return None, None
    return max(p.value + max(0.0, now - p.timestamp) for p in latest), min(p.timestamp for p in latest)


def _usage(ctx, now: float) -> tuple[ModelUsage | None, dict]:
    """One deployment's ModelUsage, and the policy state to keep for it."""
    raw = getattr(getattr(ctx.config, "policy", None), "policy_kwargs", None) or {}
    if "model" not in raw:
        return None, {}
    kwargs = PolicyKwargs.model_validate(raw)
    state = {k: v for k, v in ctx.policy_state.items() if not k.startswith("__")}
    metrics = ctx.aggregated_metrics or {}

    def largest(metric: str) -> float | None:
        values = list((metrics.get(metric) or {}).values())
        return max(values) if values else None

    demand = float(ctx.total_num_requests or 0.0)
    state.setdefault("first_seen", now)
    if demand > 0:
        state["last_busy"] = now
    seen = state.get("last_busy")  # requests seen here bound the idle time, whatever reports say
    idle = now - (seen if seen is not None else state["first_seen"])
    reported_idle, reported_at = _latest_idle(ctx, now)
    if reported_idle is None:
        reported_idle = largest("idle_s")
    if reported_idle is not None and ctx.current_num_replicas > 0:
        idle = reported_idle if seen is None else min(idle, reported_idle)
    measured = largest("footprint_bytes")
    if measured:
        state["footprint"] = int(measured)
    cold = ctx.target_num_replicas == 0 and demand > 0
    state["waiting_since"] = (state.get("waiting_since") or now) if cold else None
    if ctx.target_num_replicas == 0 and state.get("target", 0) > 0:
        state["released_at"] = now
    state["target"] = ctx.target_num_replicas
    releasing = now - state.get("released_at", float("-inf")) < RELEASE_S
    starting = ctx.target_num_replicas > 0 and ctx.current_num_replicas == 0
    state["loading_since"] = (state.get("loading_since") or now) if starting else None
    usage = ModelUsage(
        name=kwargs.model,
        footprint=int(state.get("footprint") or kwargs.footprint_bytes),
        full=kwargs.full,
        replicas=ctx.current_num_replicas,
        target=ctx.target_num_replicas,
        demand=demand,
        idle_s=max(0.0, idle),
        keep_alive_s=kwargs.keep_alive_s,
        unload_requested=bool(largest("unload_requested")),
        waiting_since=state["waiting_since"],
        releasing=releasing,
        loading_s=now - max(state["loading_since"], state.get("last_busy") or 0.0) if starting else 0.0,
        load_timeout_s=kwargs.load_timeout_s,
        reserve=kwargs.footprint_bytes,
        nodes=_replica_nodes(metrics),
        resources=tuple(sorted(kwargs.resources.items())),
        max_per_node=kwargs.max_replicas_per_node,
        reported_at=reported_at,
    )
    placed = bool(kwargs.per_node or usage.resources or usage.max_per_node)
    return usage, {
        **state,
        "budget_bytes": kwargs.budget_bytes,
        "per_node": kwargs.per_node,
        "placed": placed,
    }


def governor_policy(contexts: dict) -> tuple[dict, dict]:
    """Ray Serve's application-level autoscaling policy (set in serve_config.yaml):
    `autoscaling_policy: {policy_function: deployments.governor:governor_policy}`."""
    now = time.time()
    usages, states, ids = [], {}, {}
    for dep_id, ctx in contexts.items():
        usage, state = _usage(ctx, now)
        if usage is None:
            continue
        usages.append(usage)
        states[dep_id], ids[usage.name] = state, dep_id
    if not usages:
        return {}, {}
    budget = min(states[ids[u.name]]["budget_bytes"] for u in usages)
    placed = any(states[ids[u.name]].get("placed") for u in usages)  # on nodes: memory, resources or a cap
    per_node = any(states[ids[u.name]]["per_node"] for u in usages)
    nodes = CLUSTER_NODES(now, memory=per_node) if placed else None
    decision = plan(usages, budget, nodes, now)  # a lost node takes what it had out of the room
    for name, reason in decision.reasons.items():
        state, target = states[ids[name]], contexts[ids[name]].target_num_replicas
        change = (target, decision.targets[name])
        if target != change[1] and state.get("logged") != change:  # once: Ray may not apply it at once
            log.info("governor: %s -> %d replica(s): %s", name, change[1], reason)
            state["logged"] = change
    return {ids[n]: r for n, r in decision.targets.items()}, states


def keep_alive_policy(ctx) -> tuple[int, dict]:
    """Deployment-level fallback when the application sets no `autoscaling_policy`: keep_alive
    and on-demand loading still work, but nothing enforces the shared budget."""
    usage, state = _usage(ctx, time.time())
    if usage is None:
        return ctx.target_num_replicas, {}
    if not state.get("warned"):
        log.warning(
            "model %s: the application has no autoscaling_policy %s: the memory budget is not "
            "enforced (see serve_config.yaml)",
            usage.name,
            POLICY_PATH,
        )
        state["warned"] = True
    decision = plan([usage], budget=1 << 62)
    return decision.targets.get(usage.name, ctx.target_num_replicas), state

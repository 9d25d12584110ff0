"""Prefix-affinity routing for model deployments: a Ray Serve `RequestRouter` of ours.

Set per model in the YAML (`deployment.request_router: prefix_affinity`); the builder passes it
to Ray Serve as the deployment's `request_router_config`, so every handle to the model (the
OrchardRouter's) routes with it. Power-of-two stays the default.

Each replica's paged KV cache keeps the blocks of the prompts it computed, keyed by chained
block hashes of tokens. The router has text, not tokens, so it keeps the same structure over
characters: a prompt is cut into blocks of `block_chars`, each block's hash chains its parent's.
Per replica it knows (LRU, bounded) two things: what this handle sent there, and what the
replica last reported its cache really holds. Every `report_period_s` each replica maps the
token blocks still in its cache back to these text-block hashes (deployments.prefix_residency)
and returns them from `record_routing_stats`; Ray Serve hands the report to every handle's
router, which replaces its guess for that replica with it (keeping what it sent since). So a
prefix the cache evicted stops attracting requests, and one another router replica sent there
starts to. A choice of one replica is remembered as soon as it is made, before Ray confirms
the send: in a burst, a prefix's next request is chosen before its first one has reached the
replica (when that replica refuses the request, the wrong guess lasts until its next report).
A request goes, in this order of preference:

1. to the replica whose remembered chain covers the longest prefix of its prompt, when that
   covers at least `match_rate_threshold` of it and that replica's queue is less than
   `imbalanced_threshold` requests longer than the least loaded one's (balance wins over
   affinity when queues diverge);
2. for a new prefix, to the (not overloaded) replica that remembers the fewest blocks, so that
   distinct prefixes spread over the replicas (the shorter queue breaks a tie);
3. else to the least loaded replica (Ray picks the shortest queue among those offered).

Ray Serve LLM's `PrefixCacheAffinityRouter` follows the same policy, but in Ray 2.60 it reads
`.messages` / `.prompt` attributes (our hop passes a dict), keeps its tree in a detached actor
that it calls with blocking `ray.get` on the handle's event loop (three round trips a request,
stalling every stream of the OrchardRouter meanwhile), and that actor may live on a worker
node whose loss breaks routing. This router keeps its state in the handle's process: no call,
no actor to lose. Between two reports its view is what this handle sent.

Prompt text is hashed here and never logged.
"""

from __future__ import annotations

import importlib
import logging
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .prefix_hashing import block_hashes, prompt_text
from .settings import AffinityOptions

log = logging.getLogger("ray.serve")

ROUTER_PATH = "deployments.request_router:PrefixAffinityRouter"
_ROUTED_METHOD = "generate"  # the only call whose prompt is remembered (stats/info carry none)
_MAX_PENDING_HASHES = 4096  # hashes kept between choosing a replica and the request being sent
# What this handle sent a replica this long before its report was made stays known: the report
# may have been taken before those requests reached the replica's cache (clocks of two nodes too).
REPORT_SLACK_S = 2.0
SUSPECT_S = 10.0  # a replica a call could not reach is offered last this long


class PrefixIndex:
    """The block hashes one replica holds, as far as this handle knows: what it sent there, and
    what the replica last reported its cache really holds. Least recently sent forgotten first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blocks: OrderedDict[int, float] = OrderedDict()  # hash -> when sent (0: reported)

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt this replica holds."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        for h in hashes:
            self._blocks[h] = now
            self._blocks.move_to_end(h)
        self._trim()

    def replace(self, reported: Sequence[int], sent_after: float) -> None:
        """A replica's report (most recently used first) becomes the truth: blocks it evicted are
        forgotten, blocks other handles sent it are learned. What this handle sent after
        `sent_after` stays: the report may predate it."""
        fresh = [(h, t) for h, t in self._blocks.items() if t > sent_after]
        self._blocks = OrderedDict((h, 0.0) for h in reversed(reported))
        for h, t in fresh:
            self._blocks[h] = t
            self._blocks.move_to_end(h)
        self._trim()

    def _trim(self) -> None:
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


def rank_replicas(
    replicas: Sequence[Hashable], queues: dict, matched: dict, sizes: dict, n_blocks: int, policy: AffinityOptions
) -> tuple[list[list], str]:
    """Ranks of replica keys, most preferred first, and why (affinity | new_prefix | balance).

    `queues`: requests at each replica (None: unknown, counted as the least loaded);
    `matched`: leading blocks of the prompt each replica was sent; `sizes`: blocks each remembers.
    A replica imbalanced_threshold or more requests behind the least loaded one is never preferred
    (as Ray Serve LLM's PrefixCacheAffinityRouter: balanced means a gap under the threshold), so
    routing a request never leaves a replica more than the threshold behind.
    """
    least = min((q for q in queues.values() if q is not None), default=0)

    def behind(r) -> int:
        q = queues.get(r)
        return 0 if q is None else q - least

    balanced = [r for r in replicas if behind(r) == 0 or behind(r) < policy.imbalanced_threshold]
    everyone = list(replicas)
    if n_blocks == 0:
        return [everyone], "balance"
    best = max(matched.get(r, 0) for r in replicas)
    if best > 0 and best / n_blocks >= policy.match_rate_threshold:
        preferred = [r for r in balanced if matched.get(r, 0) == best]
        if preferred:
            return [preferred, everyone], "affinity"
        return [everyone], "balance"
    # one replica, not a tie for Ray to break: the choice is remembered at once (see choose_replicas)
    owner = min(balanced, key=lambda r: (sizes.get(r, 0), queues.get(r) or 0))
    return [[owner], everyone], "new_prefix"


_ROUTERS: weakref.WeakSet[PrefixAffinityRouter] = weakref.WeakSet()  # this process's, for /metrics


def routing_decisions() -> dict[str, dict[str, int]]:
    """What this process's prefix-affinity routers decided and the reports they took, by
    deployment name (the OrchardRouter's /metrics: its handles' routers live in its process)."""
    out: dict[str, Counter] = {}
    for router in list(_ROUTERS):
        out.setdefault(router.deployment, Counter()).update(router.decisions)
    return {name: dict(counts) for name, counts in out.items()}


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: prefix affinity over load balance (see the module docstring).
    `request_router_kwargs` are initialize_state's arguments: deployment.affinity in the YAML, and
    the deployment's name (the app builder adds it; /metrics labels the decisions with it)."""

    def initialize_state(self, deployment: str = "", **options: Any) -> None:
        """`options`: AffinityOptions' fields (others are ignored); unset ones take its defaults."""
        self.deployment = deployment
        self.policy = AffinityOptions(**{k: v for k, v in options.items() if k in AffinityOptions.model_fields})
        self.block_chars = self.policy.block_chars
        self.max_blocks = self.policy.max_blocks_per_replica
        self.indexes: dict[ReplicaID, PrefixIndex] = {}
        self.decisions = {"affinity": 0, "new_prefix": 0, "balance": 0, "reports": 0}
        self._pending: OrderedDict[str, list[int]] = OrderedDict()
        self._reports: dict[ReplicaID, float] = {}  # when each replica's last report taken was made
        self._suspect: dict[ReplicaID, float] = {}  # unreachable lately: offered last until then
        # Ray Serve may ship this class by value (cloudpickle), with globals of its own: register
        # with the module the OrchardRouter imported, which /metrics reads
        importlib.import_module(ROUTER_PATH.split(":")[0])._ROUTERS.add(self)

    def _hashes(self, pending: PendingRequest | None) -> list[int]:
        """The prompt's block hashes, computed once per request (routing may retry)."""
        if pending is None or pending.metadata.call_method != _ROUTED_METHOD or not pending.args:
            return []
        key = pending.metadata.internal_request_id
        if key not in self._pending:
            text = prompt_text(pending.args[0])
            self._pending[key] = block_hashes(text, self.block_chars) if text else []
            while len(self._pending) > _MAX_PENDING_HASHES:
                self._pending.popitem(last=False)
        return self._pending[key]

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int | None]:
        """Requests at each replica: the handle's cache (when the handle keeps one), probing the
        replicas it has no fresh entry for."""
        cached = self._use_replica_queue_len_cache
        queues = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) if cached else None for r in replicas}
        missing = [r for r in replicas if queues[r.replica_id] is None]
        if missing:
            for r, q in await self._probe_queue_lens(missing, 0):
                queues[r.replica_id] = q
        return queues

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidate_replicas, suspects = self._split_suspects(candidate_replicas)
        hashes = self._hashes(pending_request)
        if not hashes or len(candidate_replicas) < 2:
            return [list(candidate_replicas)] + ([suspects] if suspects else [])
        by_id = {r.replica_id: r for r in candidate_replicas}
        index = {rid: self.indexes.get(rid) for rid in by_id}
        ranks, why = rank_replicas(
            list(by_id),
            await self._queue_lens(candidate_replicas),
            {rid: ix.match(hashes) if ix else 0 for rid, ix in index.items()},
            {rid: len(ix) if ix else 0 for rid, ix in index.items()},
            len(hashes),
            self.policy,
        )
        self.decisions[why] += 1
        if why != "balance" and len(ranks[0]) == 1:
            # Remembered now, not when Ray confirms the send (a replica round trip later): in a
            # burst, the next request of this prefix is chosen before then and must follow it.
            self.indexes.setdefault(ranks[0][0], PrefixIndex(self.max_blocks)).insert(hashes)
        return [[by_id[rid] for rid in rank] for rank in ranks] + ([suspects] if suspects else [])

    def _split_suspects(self, replicas: list[RunningReplica]) -> tuple[list[RunningReplica], list[RunningReplica]]:
        """(replicas to rank, replicas unreachable lately), all to rank when every one is a suspect."""
        now = time.monotonic()
        for rid in [rid for rid, until in self._suspect.items() if until <= now]:
            del self._suspect[rid]
        suspects = [r for r in replicas if r.replica_id in self._suspect]
        if not suspects or len(suspects) == len(replicas):
            return list(replicas), []
        return [r for r in replicas if r.replica_id not in self._suspect], suspects

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """The request went to `replica_id`: that replica now holds (or is computing) its prefix."""
        hashes = self._hashes(pending_request)
        self._pending.pop(pending_request.metadata.internal_request_id, None)
        if hashes:
            self.indexes.setdefault(replica_id, PrefixIndex(self.max_blocks)).insert(hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """A replica that left (unloaded, died, replaced) takes its prefixes with it. Ray calls
        this also when a replica's routing stats change: its report of what its cache holds."""
        super().update_replicas(replicas)
        for rid in set(self.indexes) - self._replica_id_set:
            del self.indexes[rid]
            self._reports.pop(rid, None)
            self._suspect.pop(rid, None)
        for r in replicas:
            self._take_report(r.replica_id, (getattr(r, "routing_stats", None) or {}).get("prefixes"))

    def _take_report(self, rid: ReplicaID, report: dict | None) -> None:
        """ModelServer.record_routing_stats' "prefixes": {"at", "block_chars", "hashes"}."""
        if not report or report.get("block_chars") != self.block_chars or self._reports.get(rid) == report["at"]:
            return
        self._reports[rid] = report["at"]
        index = self.indexes.setdefault(rid, PrefixIndex(self.max_blocks))
        index.replace(report["hashes"], report["at"] - REPORT_SLACK_S)
        self.decisions["reports"] += 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.indexes.pop(replica_id, None)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        """A call to the replica failed (its node may be gone): its prefixes are not worth a
        detour, and it is offered last for a while (its next report restores what it holds)."""
        super().on_replica_actor_unavailable(replica_id)
        self.indexes.pop(replica_id, None)
        self._suspect[replica_id] = time.monotonic() + SUSPECT_S

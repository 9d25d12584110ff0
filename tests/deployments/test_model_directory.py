"""The memory governor as the router sees it (deployments.model_directory): model states, bytes
and the budget in /v1/models, polling, load timeouts, and never calling an unloaded model."""

from __future__ import annotations

import asyncio
import time

import httpx

from deployments.config import RouterConfig
from deployments.router import RouterCore, create_app
from tests.fakes import FakeClient

HELLO = [{"role": "user", "content": "Hi"}]


def governed_client(replicas: dict[str, dict], **clients):
    """A router whose models' states come from a fake Ray Serve status (replica counts by state)."""
    from types import SimpleNamespace

    from deployments.model_directory import ModelDirectory

    facts = {
        n: {
            "deployment": f"model-{n}",
            "load": "on_demand",
            "keep_alive_s": 60.0,
            "load_timeout_s": 0.3,
            "footprint_bytes": 1000,
            "replicas": 1,
        }
        for n in clients
    }
    status = SimpleNamespace(
        applications={
            "orchard": SimpleNamespace(
                deployments={f"model-{n}": SimpleNamespace(replica_states=replicas.get(n, {})) for n in clients}
            )
        }
    )
    directory = ModelDirectory(
        facts, 5000, lambda n: clients[n].info(1.0), app_name="orchard", read_status=lambda: status
    )
    core = RouterCore(RouterConfig.model_validate({}), clients, directory)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test"), core


async def test_models_list_shows_states_bytes_and_the_budget():
    client, core = governed_client(
        {"m1": {"RUNNING": 1}, "m2": {"STARTING": 1}}, m1=FakeClient("m1"), m2=FakeClient("m2"), m3=FakeClient("m3")
    )
    await core.directory.refresh()
    async with client:
        body = (await client.get("/v1/models")).json()
    cards = {m["id"]: m for m in body["data"]}
    assert {n: c["state"] for n, c in cards.items()} == {"m1": "loaded", "m2": "loading", "m3": "unloaded"}
    assert cards["m1"]["footprint_bytes"] == 160 and cards["m1"]["loads"] == 1 and cards["m1"]["pid"] == 4242
    assert cards["m3"]["footprint_bytes"] == 1000 and cards["m3"]["footprint"]["measured"] is False
    assert body["memory"] == {"budget_bytes": 5000, "used_bytes": 160 + 1000}


async def test_listing_the_models_alone_keeps_their_states_fresh():
    """A client that only ever lists the models (no /health, no request) sees eager models load."""
    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"))
    async with client:
        first = (await client.get("/v1/models")).json()["data"][0]["state"]
        for _ in range(40):
            await asyncio.sleep(0.05)
            if (await client.get("/v1/models")).json()["data"][0]["state"] == "loaded":
                break
        else:
            raise AssertionError("the model list never saw the model load")
    assert first == "unloaded"  # before the first poll


async def test_a_reloaded_model_never_shows_the_old_replicas_pid_or_misses_a_load():
    """Two refreshes at once (the watch loop's and a load call's) while a new replica's info is
    on its way: neither may report the model loaded with the replica before's pid."""
    from types import SimpleNamespace

    from deployments.model_directory import ModelDirectory

    pids = iter([1001, 1002])

    async def info(name):
        await asyncio.sleep(0.05)
        pid = next(pids)
        return {"pid": pid, "loaded_at": float(pid), "cold_start_s": 1.0, "footprint": {"total": 10}}

    replicas = {"RUNNING": 1}
    status = SimpleNamespace(
        applications={"orchard": SimpleNamespace(deployments={"model-m1": SimpleNamespace(replica_states=replicas)})}
    )
    facts = {
        "m1": {
            "deployment": "model-m1",
            "load": "on_demand",
            "keep_alive_s": 60.0,
            "load_timeout_s": 1.0,
            "footprint_bytes": 10,
            "replicas": 1,
        }
    }
    directory = ModelDirectory(facts, 5000, info, app_name="orchard", read_status=lambda: status)
    await directory.refresh()
    replicas.clear()  # it unloads
    await directory.refresh()
    replicas["RUNNING"] = 1  # a new replica

    async def card_after_refresh():
        await directory.refresh()
        return directory.record("m1").card()

    cards = await asyncio.gather(card_after_refresh(), card_after_refresh())
    assert [c["pid"] for c in cards] == [1002, 1002] and cards[0]["loads"] == 2 and cards[0]["unloads"] == 1


async def test_a_router_polls_ray_serve_slowly_unless_a_request_may_start_a_load(monkeypatch):
    """Each status poll costs the router and Ray's controller CPU: a server polls every
    IDLE_POLL_S, also while it serves loaded models; a request for an unloaded model (which
    starts its load) brings back fast polling at once."""
    from types import SimpleNamespace

    from deployments import model_directory
    from deployments.model_directory import ModelDirectory

    monkeypatch.setattr(model_directory, "POLL_S", 0.05)
    monkeypatch.setattr(model_directory, "ACTIVE_S", 0.3)
    polls = []
    status = SimpleNamespace(
        applications={
            "orchard": SimpleNamespace(deployments={"model-m1": SimpleNamespace(replica_states={"RUNNING": 1})})
        }
    )
    facts = {
        name: {
            "deployment": f"model-{name}",
            "load": "eager",
            "keep_alive_s": 60.0,
            "load_timeout_s": 1.0,
            "footprint_bytes": 1000,
            "replicas": 1,
        }
        for name in ("m1", "m2")
    }
    directory = ModelDirectory(
        facts,
        5000,
        FakeClient("m1").info,
        app_name="orchard",
        read_status=lambda: polls.append(time.monotonic()) or status,
    )
    directory.start()
    await asyncio.sleep(0.3)
    idle_polls = len(polls)
    for _ in range(4):  # requests for the loaded model
        directory.touch("m1")
        await asyncio.sleep(0.05)
    serving_polls = len(polls) - idle_polls
    directory.touch("m2")  # not loaded: its load starts now
    await asyncio.sleep(0.2)
    loading_polls = len(polls) - idle_polls - serving_polls
    directory._task.cancel()
    assert directory.record("m1").state == "loaded" and directory.record("m2").state == "unloaded"
    assert idle_polls == 1  # the first poll, then IDLE_POLL_S (5 s) of quiet
    assert serving_polls == 0
    assert loading_polls >= 3  # every 50 ms after the request


async def test_a_request_that_waits_past_load_timeout_is_a_503_with_retry_after():
    slow = FakeClient("m2", delay=2.0)  # its first chunk comes after the 0.3 s load_timeout_s
    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"), m2=slow)
    await core.directory.refresh()
    async with client:
        r = await client.post("/v1/chat/completions", json={"model": "m2", "messages": HELLO})
        ok = await client.post("/v1/chat/completions", json={"model": "m1", "messages": HELLO})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "model_loading" and "load_timeout_s" in r.json()["error"]["message"]
    assert slow.cancelled == 1  # it left the queue
    assert ok.status_code == 200


async def test_health_metrics_and_cache_never_call_an_unloaded_model():
    idle = FakeClient("m2")
    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"), m2=idle)
    await core.directory.refresh()
    async with client:
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
        cache = (await client.get("/v1/models/m2/cache")).json()
    assert health["models"] == {"m1": "ok", "m2": "unloaded"}
    assert cache["state"] == "unloaded" and cache["cache"] == {}
    assert getattr(idle, "health_calls", 0) == 0 and idle.payloads == []
    assert 'orchard_model_state{model="m2",state="unloaded"} 1.0' in metrics
    assert 'orchard_model_loads_total{model="m1"} 1.0' in metrics
    assert "orchard_memory_budget_bytes 5000.0" in metrics


def test_the_status_read_from_the_controllers_details_is_what_serve_status_reports():
    """`status_view` against Ray's own parser (what `serve.status()` runs) on the same details: a
    dict from a real Ray Serve 2.60 controller (tests/fixtures/serve_details.json, paths scrubbed),
    with a second replica starting and a deployment failing to start added."""
    import copy
    import json
    from pathlib import Path

    from ray.serve.schema import ServeInstanceDetails

    from deployments.model_directory import _load_error, model_state, status_view

    details = json.loads((Path(__file__).parents[1] / "fixtures" / "serve_details.json").read_text())
    deps = details["applications"]["orchard"]["deployments"]
    starting = copy.deepcopy(deps["model-smol"]["replicas"][0])
    deps["model-smol"]["replicas"].append({**starting, "replica_id": "second", "state": "STARTING"})
    deps["ResponseStore"].update(status="DEPLOY_FAILED", message="replica failed\nModelLoadError: bad shapes")

    ours = status_view(details).applications["orchard"].deployments
    rays = ServeInstanceDetails(**details)._get_status().applications["orchard"].deployments
    assert set(ours) == set(rays) == {"model-smol", "ResponseStore", "OrchardRouter"}
    for name, dep in rays.items():
        assert ours[name].replica_states == {str(k): v for k, v in dep.replica_states.items()}
        assert (_load_error(ours[name]), model_state(ours[name].replica_states)) == (
            _load_error(dep),
            model_state(dep.replica_states),
        )
    assert ours["model-smol"].replica_states == {"RUNNING": 1, "STARTING": 1}
    running = deps["model-smol"]["replicas"][0]["actor_name"]
    assert running.startswith("SERVE_REPLICA::orchard#model-smol#")  # what ray.get_actor finds in "serve"
    assert ours["model-smol"].running_actors == [running]  # the starting one is not read yet
    assert _load_error(ours["ResponseStore"]) == "ModelLoadError: bad shapes"


class FakeReplicas:
    """ReplicaStatus with no Ray: the actor names it was asked, and replicas that are gone."""

    def __init__(self, gone=()):
        self.asked, self.gone = [], set(gone)

    async def _check(self, actors):
        self.asked.append(tuple(actors))
        if not actors or set(actors) <= self.gone:
            from deployments.replica_status import ReplicaGone

            raise ReplicaGone(", ".join(actors))

    async def stats(self, actors, timeout_s):
        await self._check(actors)
        return {"name": "from-the-actor", "cache": {"hits": 7}}

    async def health(self, actors, timeout_s):
        await self._check(actors)


async def test_status_reads_go_to_the_replica_actors_not_through_the_handle():
    """GET /metrics, /health and a model's cache card read the running replicas by actor name (the
    directory's poll), so that no status read counts as a request in the governor's demand; a
    replica gone since the poll is read again after a fresh poll, and a model that unloaded
    meanwhile is not unhealthy."""
    from types import SimpleNamespace

    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"))
    deps = core.directory._read_status().applications["orchard"].deployments
    deps["model-m1"].running_actors = ["SERVE_REPLICA::orchard#model-m1#a"]
    core.replica_status = replicas = FakeReplicas(gone={"SERVE_REPLICA::orchard#model-m1#a"})
    await core.directory.refresh()
    deps["model-m1"].running_actors = ["SERVE_REPLICA::orchard#model-m1#b"]  # replaced after the poll
    async with client:
        cache = (await client.get("/v1/models/m1/cache")).json()
        assert cache["cache"] == {"hits": 7} and cache["engine"]["name"] == "from-the-actor"
        assert replicas.asked == [("SERVE_REPLICA::orchard#model-m1#a",), ("SERVE_REPLICA::orchard#model-m1#b",)]
        scrape = (await client.get("/metrics")).text
        assert 'orchard_engine_stat{model="m1",stat="cache_hits"} 7.0' in scrape  # the actor's, not the handle's 1
        assert (await client.get("/health")).json()["models"] == {"m1": "ok"}
        assert len(replicas.asked) == 4
        deps["model-m1"] = SimpleNamespace(replica_states={"STOPPING": 1}, running_actors=[])
        replicas.gone.add("SERVE_REPLICA::orchard#model-m1#b")  # unloaded since the last poll
        health = (await client.get("/health")).json()
    assert health == {"status": "ok", "models": {"m1": "unloading"}}
    assert getattr(core.models["m1"], "health_calls", 0) == 0  # never through the handle


async def test_a_model_whose_replicas_stopped_under_a_stats_read_is_a_503_not_a_500():
    """The directory still lists a replica that has stopped (its last poll was before the stop):
    the cache card's read finds no replica even after a fresh poll, and says so."""
    client, core = governed_client({"m1": {"RUNNING": 1}}, m1=FakeClient("m1"))
    deps = core.directory._read_status().applications["orchard"].deployments
    deps["model-m1"].running_actors = ["SERVE_REPLICA::orchard#model-m1#a"]
    core.replica_status = FakeReplicas(gone={"SERVE_REPLICA::orchard#model-m1#a"})
    await core.directory.refresh()
    async with client:
        r = await client.get("/v1/models/m1/cache")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unloading", r.text

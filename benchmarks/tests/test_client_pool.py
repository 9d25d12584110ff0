"""benchmarks.client_pool against a real HTTP server (uvicorn, a streamed completion that echoes
its prompt): every request of a wave sent once, from the pool's processes, results in the order
given, the hop key as the request id."""

import asyncio
import json
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from benchmarks.client_pool import ClientPool, Sent

SEEN: list[tuple[str, str | None]] = []


async def completions(request):
    body = await request.json()
    SEEN.append((body["prompt"], request.headers.get("x-request-id")))

    async def events():
        for part in (body["prompt"], "!"):
            yield f"data: {json.dumps({'choices': [{'text': part}]})}\n\n"
            await asyncio.sleep(0.01)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def serve() -> tuple[uvicorn.Server, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def test_a_wave_from_two_processes_sends_each_request_once_and_keeps_their_order():
    server, base = serve()
    pool = ClientPool(base, 2)
    try:
        requests = [Sent("/v1/completions", {"prompt": f"p{i}", "stream": True}, f"key-{i}") for i in range(7)]
        before = time.time()
        wave = asyncio.run(pool.wave(requests))
        again = asyncio.run(pool.wave(requests[:1]))  # the workers stay up between waves
    finally:
        pool.close()
        server.should_exit = True
    assert [r.text for r in wave.results] == [f"p{i}!" for i in range(7)]
    assert all(r.ok and r.ttft is not None for r in wave.results)
    assert sorted(SEEN[:7]) == sorted((f"p{i}", f"key-{i}") for i in range(7)) and SEEN[7] == ("p0", "key-0")
    assert all(before < sent < before + wave.seconds + 5 for sent in wave.sent)
    assert again.results[0].text == "p0!" and all(not p.is_alive() for p in pool.procs)

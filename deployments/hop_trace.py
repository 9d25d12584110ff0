"""Per-hop timestamps of generation requests, for finding where `serve run` spends a burst's time.

Off unless the environment variable ORCHARD_HOP_TRACE names a folder (set it for `serve run`, whose
Ray processes inherit it). Then every serve process appends JSON lines to `<folder>/<role>-<pid>.jsonl`:

- the router, once a request's first chunk is back: `router_in` (its API handler started),
  `handle_call` (the handle call to the model's replica), `router_first` (the first chunk came back);
- the model replica, when it yields a request's first chunk: `replica_in` (`generate` started),
  `submitted` (the engine took it), `admitted` and `admit_step` (the engine's loop thread added it to
  the scheduler, and how many engine steps had run by then), `first_token` (the engine read its first
  token), `first_yield` (the replica yielded it);
- the model replica, now and then: `steps`, the engine's step log (engine.engine.AsyncEngine.step_log).

Times are `time.time()` seconds, comparable across the processes of one machine. A record is keyed
by Ray Serve's request id: the `x-request-id` header a client sent (Ray makes one up otherwise), which
Ray passes from the proxy to the router and on through the handle to the replica. Nothing of a
request's content is written.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

ENV = "ORCHARD_HOP_TRACE"


def folder() -> Path | None:
    """Where this process writes its trace (None: tracing is off)."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def wall(monotonic_s: float | None) -> float | None:
    """A `time.monotonic()` reading of this process as `time.time()` seconds."""
    return None if monotonic_s is None else time.time() - (time.monotonic() - monotonic_s)


def request_key() -> str | None:
    """Ray Serve's id of the request being handled (the client's `x-request-id`), if any."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001 - outside a Serve request (tests), no key
        return None


class TraceFile:
    """One process's trace: JSON lines appended and flushed one at a time (any thread)."""

    def __init__(self, role: str, where: Path):
        where.mkdir(parents=True, exist_ok=True)
        self.path = where / f"{role}-{os.getpid()}.jsonl"
        self.role = role
        self._file = self.path.open("a")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = json.dumps({"role": self.role, **record}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()


def open_trace(role: str) -> TraceFile | None:
    """This process's trace file when ORCHARD_HOP_TRACE is set, else None."""
    where = folder()
    return TraceFile(role, where) if where is not None else None


def write_steps(trace: TraceFile, engine) -> None:
    """The engine's step log since the last call, as one record (nothing when it is empty)."""
    log = engine.step_log
    steps = []
    while log:
        steps.append(log.popleft())
    if steps:
        trace.write({"steps": steps})

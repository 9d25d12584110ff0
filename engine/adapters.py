"""Which LoRA adapters of the model are resident, and getting them there (issue 37).

At engine start every configured adapter's rank and target modules are read from its
adapter_config.json and its safetensors header (not its weights), and the base is wrapped once
(engine.lora.LoRATable.attach) for the union of those modules at the largest rank, with
`max_loaded_adapters` slots allocated up front: their bytes are the engine's from the start
(engine.engine counts them in the footprint, so the governor does), resident adapters or not.

An adapter is loaded on demand, when a request for it reaches admission (or when an operator asks:
`load`). It takes a free slot, or the slot of the least recently used *idle* adapter (no running or
waiting request uses it); when every slot's adapter is busy the request waits, still queued, until
one is idle. A busy adapter is never evicted. Its files are read by a loader thread with numpy only
(engine.lora.read_files), so a read never stalls the decode loop; the checks against the base and
the copy into the slot happen on the loop thread between two steps (`poll`). An adapter that cannot
be read or does not fit the base is `failed`, with the reason: the requests for it end with an
AdapterLoadError (a 422) and later ones too, until an operator's `load` tries again; the base and
the other adapters go on.

Everything here runs on the engine's loop thread, except `snapshot` (any thread).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field

from .config import AdapterConfig
from .errors import AdapterBusyError, AdapterLoadError, ModelLoadError
from .lora import LoRATable, adapter_shape, check_adapter, read_files

log = logging.getLogger(__name__)


@dataclass
class AdapterState:
    """One configured adapter: where it is, and what it is doing."""

    name: str
    path: str
    rank: int = 0
    modules: list[str] = field(default_factory=list)
    state: str = "unloaded"  # loaded | unloaded | loading | failed
    slot: int = 0  # its slot in the table while loading or loaded
    bytes: int = 0  # its weights, while loaded
    error: str | None = None
    last_used: float | None = None  # time.time() a request for it last ended (or was admitted)
    requests: int = 0  # requests for it in all
    users: int = 0  # running and waiting requests for it now
    digest: bytes | None = None  # of its name and files, once read: its prefix-cache identity
    reading: concurrent.futures.Future | None = None
    waiters: list[concurrent.futures.Future] = field(default_factory=list)  # operators' loads

    def public(self) -> dict:
        return {
            "state": self.state,
            "bytes": self.bytes,
            "path": self.path,
            "rank": self.rank,
            "error": self.error,
            "last_used": self.last_used,
            "requests": self.requests,
        }


class Adapters:
    """The adapters of one base model: their states, the table of slots, the loader thread."""

    def __init__(self, specs: list[AdapterConfig], base, slots: int):
        self.base = base
        self._lock = threading.Lock()
        self.states = {spec.name: AdapterState(spec.name, spec.path) for spec in specs}
        for st in self.states.values():
            try:
                st.rank, st.modules = adapter_shape(st.name, st.path)
            except ModelLoadError as exc:
                self._fail(st, exc.message)
        usable = [st for st in self.states.values() if st.state != "failed"]
        self.table = LoRATable(base, slots)
        modules = sorted({m for st in usable for m in st.modules})
        if modules:
            self.table.attach(modules, max(st.rank for st in usable))
        self.free = list(range(slots, 0, -1))
        self.refused: str | None = None  # why no adapter can be served on this model, if none can
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="orchard-adapter-read")

    # --- requests (the scheduler) --------------------------------------------------------

    def enter(self, name: str) -> None:
        """A request for `name` arrived (it keeps the adapter busy until `leave`)."""
        st = self.states[name]
        st.users += 1
        st.requests += 1

    def leave(self, name: str) -> None:
        st = self.states[name]
        st.users -= 1
        st.last_used = time.time()

    def ready(self, name: str) -> int:
        """The adapter's slot when it is resident; 0 while it is not (its load is started when a
        slot can be had). Raises AdapterLoadError when it failed."""
        st = self.states[name]
        if st.state == "failed":
            raise AdapterLoadError(st.error)
        if st.state == "loaded":
            st.last_used = time.time()
            return st.slot
        if st.state == "unloaded":
            self._start(st)
        return 0

    @property
    def loading(self) -> bool:
        return any(st.state == "loading" for st in self.states.values())

    def wait(self, timeout_s: float) -> None:
        """Block until a read finishes (or `timeout_s`): the loop has nothing else to do."""
        reads = [st.reading for st in self.states.values() if st.reading is not None]
        concurrent.futures.wait(reads, timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)

    def poll(self) -> None:
        """Between two steps: each finished read is checked against the base and put in its slot."""
        for st in self.states.values():
            if st.reading is not None and st.reading.done():
                self._install(st, st.reading)

    # --- operators (engine commands) -----------------------------------------------------

    def load(self, name: str, done: concurrent.futures.Future) -> None:
        """Load `name` now (a failed adapter is tried again); `done` resolves when it is loaded,
        or with the AdapterLoadError / AdapterBusyError (no slot can be freed)."""
        st = self.states[name]
        if st.state == "loaded":
            done.set_result(None)
            return
        if self.refused is not None:
            done.set_exception(AdapterLoadError(f"adapter {name!r}: {self.refused}"))
            return
        if st.state == "failed":
            with self._lock:
                st.state, st.error = "unloaded", None
        if st.state == "unloaded" and not self._start(st):
            busy = ", ".join(s.name for s in self.states.values() if s.state in ("loaded", "loading"))
            done.set_exception(AdapterBusyError(f"adapter {name!r}: every slot holds an adapter in use ({busy})"))
            return
        st.waiters.append(done)

    def unload(self, name: str) -> None:
        """Evict `name` now; AdapterBusyError while requests use it or it is loading."""
        st = self.states[name]
        if st.users or st.state == "loading":
            raise AdapterBusyError(f"adapter {name!r} is in use by {st.users} request(s) or loading: not unloaded")
        if st.state == "loaded":
            self._evict(st)

    def refuse_all(self, why: str) -> None:
        """No adapter can be served on this model (its loop is not ours): all of them fail."""
        self.refused = why
        for st in self.states.values():
            self._fail(st, why)

    # --- what others read ----------------------------------------------------------------

    def snapshot(self) -> dict[str, dict]:
        """Each adapter's public state (any thread)."""
        with self._lock:
            return {name: st.public() for name, st in self.states.items()}

    def stats(self) -> dict:
        used = self.table.slots - len(self.free)
        return {"slots_used": used, "slots_total": self.table.slots, "adapters": self.snapshot()}

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    # --- internals -----------------------------------------------------------------------

    def _start(self, st: AdapterState) -> bool:
        """Start reading `st` into a free slot, or an idle adapter's; False when there is none."""
        slot = self.free.pop() if self.free else self._evict_idle()
        if slot is None:
            return False
        with self._lock:
            st.state, st.slot = "loading", slot
        st.reading = self._reader.submit(read_files, st.name, st.path)
        log.info("adapter %s: loading into slot %d", st.name, slot)
        return True

    def _evict_idle(self) -> int | None:
        idle = [st for st in self.states.values() if st.state == "loaded" and st.users == 0]
        if not idle:
            return None
        victim = min(idle, key=lambda st: st.last_used or 0.0)
        self._evict(victim)
        return self.free.pop()

    def _evict(self, st: AdapterState) -> None:
        log.info("adapter %s: unloaded from slot %d", st.name, st.slot)
        self.table.adapters[st.slot] = None
        self.free.append(st.slot)
        with self._lock:
            st.state, st.slot, st.bytes = "unloaded", 0, 0

    def _install(self, st: AdapterState, reading: concurrent.futures.Future) -> None:
        st.reading = None
        try:
            adapter = check_adapter(st.name, st.path, reading.result(), self.base)
            self._fits(st, adapter)
        except Exception as exc:  # noqa: BLE001 - a malformed adapter fails alone
            why = (
                exc.message if isinstance(exc, ModelLoadError) else f"adapter {st.name!r}: {type(exc).__name__}: {exc}"
            )
            self.free.append(st.slot)
            self._fail(st, why)
            for done in st.waiters:
                done.set_exception(AdapterLoadError(why))
        else:
            self.table.put(st.slot, adapter)
            with self._lock:
                st.state, st.bytes, st.digest = "loaded", adapter.nbytes, adapter.digest
            log.info("adapter %s: loaded into slot %d (%d bytes)", st.name, st.slot, adapter.nbytes)
            for done in st.waiters:
                done.set_result(None)
        st.waiters = []

    def _fits(self, st: AdapterState, adapter) -> None:
        """The table was made at engine start for the adapters' files then: a file changed since
        may target modules it does not wrap, or a larger rank."""
        outside = sorted(set(adapter.weights) - set(self.table.stacks))
        if outside or adapter.rank > self.table.rank:
            raise ModelLoadError(
                f"adapter {st.name!r} ({st.path}): rank {adapter.rank} on {len(adapter.weights)} modules does not "
                f"fit what was wrapped at engine start (rank {self.table.rank}; not wrapped: {outside[:4]})"
            )

    def _fail(self, st: AdapterState, why: str) -> None:
        log.error("adapter %s failed: %s", st.name, why)
        with self._lock:
            st.state, st.slot, st.bytes, st.error = "failed", 0, 0, why

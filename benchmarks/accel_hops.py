"""Per-hop timestamps of the accelerator suite's bursts (`bench_accel --hops`): where a wave's requests
spend the time between the client and their first token, and how spread out they reach the engine.

Through `serve run`, every request carries an `x-request-id` header (set by an httpx request hook);
the serve processes write their timestamps under that id (deployments.hop_trace, on while
ORCHARD_HOP_TRACE names a folder) and the model replica writes the engine's step log. The engine
alone gets the same stamps from its stream (`admitted_at`) and its own step log. Per target and
client count the summary gives each hop's p50 / p99 (ms), the spread of each stamp within a wave
(last minus first, ms), how many engine steps a wave's admissions took, and per wave the engine's
steps, their mean and longest duration, the compiled decode's new traces and how many steps
went through it (padded rows: the masked step, slower on CUDA than the unpadded one).

`engine (staggered)` replays, wave by wave, the offsets at which `serve run`'s requests reached
`engine.submit` (measured in this run, same client count): the engine alone fed the same spread, to
tell what the spreading costs from what the Ray hops cost.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import statistics
import time
import uuid
from collections import defaultdict
from pathlib import Path

from .metrics import percentile

KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("hop_key", default=None)
HEADER = "x-request-id"
# (hop, from stamp, to stamp): a request's path in order; a hop whose stamps are missing is skipped
HOPS = (
    ("client to router", "sent", "router_in"),
    ("router handler", "router_in", "handle_call"),
    ("handle to replica", "handle_call", "replica_in"),
    ("replica to submit", "replica_in", "submitted"),
    ("engine inbox", "submitted", "admitted"),
    ("admitted to first token", "admitted", "first_token"),
    ("first token to yield", "first_token", "first_yield"),
    ("replica to router", "first_yield", "router_first"),
    ("router to client", "router_first", "client_first"),
    ("first token to client", "first_token", "client_first"),
    ("ttft", "sent", "client_first"),
)
SPREAD = ("sent", "router_in", "replica_in", "submitted", "admitted", "first_token", "client_first")


async def add_header(request) -> None:
    """httpx request hook: the request's hop key as Ray Serve's request id."""
    key = KEY.get()
    if key is not None:
        request.headers[HEADER] = key


class Hops:
    """Client stamps, the serve processes' traces, the engines' step logs, and the replay offsets."""

    def __init__(self, workdir: Path):
        self.run = uuid.uuid4().hex[:6]
        self.folder = workdir / f"hops-{self.run}"  # this run's own: a workdir may hold an earlier run's
        self.stamps: dict[str, dict] = {}  # key -> stamps and where it belongs (target, clients, wave)
        self.waves: list[dict] = []  # target, clients, wave, start, end (time.time())
        self.steps: dict[str, list] = defaultdict(list)  # "serve" / "engine" -> step log entries
        self.offsets: dict[int, list[list[float]]] = defaultdict(list)  # clients -> serve run's submit offsets
        self._read_at: dict[Path, int] = {}
        self._ids = itertools.count()

    # --- while the run goes ------------------------------------------------------------------

    def begin(self, target: str, clients: int, wave: str) -> str:
        """A request about to be sent: its key (also set as KEY for the header hook)."""
        key = f"hop-{self.run}-{next(self._ids)}"
        self.stamps[key] = {"target": target, "clients": clients, "wave": wave, "sent": time.time()}
        KEY.set(key)
        return key

    def first(self, key: str, ttft_s: float | None) -> None:
        stamp = self.stamps[key]
        if ttft_s is not None:
            stamp["client_first"] = stamp["sent"] + ttft_s

    def engine_stream(self, key: str, stream, first_token_mono: float | None) -> None:
        """The engine alone: its stream's admission, its first token (this process's clock)."""
        from deployments.hop_trace import wall

        stamp = self.stamps[key]
        stamp["submitted"] = stamp["sent"]
        stamp["admitted"], stamp["admit_step"] = stream.admitted_at, stream.admitted_step
        stamp["first_token"] = wall(first_token_mono)

    def wave_done(self, target: str, clients: int, wave: str, start: float, engine=None) -> None:
        """After a wave: its window, the engine's step log (engine targets) or the serve traces."""
        self.waves.append({"target": target, "clients": clients, "wave": wave, "start": start, "end": time.time()})
        if engine is not None and engine.step_log is not None:
            while engine.step_log:
                self.steps["engine"].append(engine.step_log.popleft())
        elif target == "serve run":
            self.read_traces()
            self._keep_offsets(clients, wave)

    def read_traces(self) -> None:
        """New lines of every serve process's trace file, merged into the stamps."""
        for path in sorted(self.folder.glob("*.jsonl")):
            with path.open() as f:
                f.seek(self._read_at.get(path, 0))
                text = f.read()
            done = text.rfind("\n") + 1  # a half-written last line waits for the next read
            self._read_at[path] = self._read_at.get(path, 0) + len(text[:done].encode())
            for line in text[:done].splitlines():
                self._take(json.loads(line))

    def _take(self, record: dict) -> None:
        if "steps" in record:
            self.steps["serve"].extend(record["steps"])
            return
        stamp = self.stamps.get(record.pop("id", None) or "")
        if stamp is not None:
            record.pop("role", None)
            stamp.update({k: v for k, v in record.items() if v is not None})

    def _keep_offsets(self, clients: int, wave: str) -> None:
        subs = sorted(s["submitted"] for s in self._of("serve run", clients, wave) if "submitted" in s)
        if len(subs) == clients:
            self.offsets[clients].append([t - subs[0] for t in subs])

    def replay(self, clients: int, wave_index: int) -> list[float] | None:
        """The submit offsets of one of serve run's waves of this size (None before any)."""
        seen = self.offsets.get(clients)
        return seen[wave_index % len(seen)] if seen else None

    def _of(self, target: str, clients: int, wave: str | None = None) -> list[dict]:
        return [
            s
            for s in self.stamps.values()
            if s["target"] == target and s["clients"] == clients and (wave is None or s["wave"] == wave)
        ]

    # --- the summary -------------------------------------------------------------------------

    def summary(self, targets: list[str], clients: list[int]) -> dict:
        """Per target and client count (measured waves only, not the warm-up)."""
        self.read_traces()
        out = {}
        for target in targets:
            for n in clients:
                stamps = [s for s in self._of(target, n) if not s["wave"].startswith("warm")]
                if stamps:
                    out[f"{target} @ {n}"] = self._level(target, n, stamps)
        return out

    def _level(self, target: str, n: int, stamps: list[dict]) -> dict:
        hops = {}
        for name, a, b in HOPS:
            gaps = [1000 * (s[b] - s[a]) for s in stamps if a in s and b in s]
            if gaps:
                hops[name] = [_r(percentile(gaps, 50)), _r(percentile(gaps, 99))]
        by_wave = defaultdict(list)
        for s in stamps:
            by_wave[s["wave"]].append(s)
        spreads = {}
        for stamp in SPREAD:
            per_wave = [_spread([s.get(stamp) for s in w]) for w in by_wave.values()]
            per_wave = [x for x in per_wave if x is not None]
            if per_wave:
                spreads[stamp] = _r(statistics.median(per_wave))
        admit_steps = [len({s["admit_step"] for s in w if "admit_step" in s}) for w in by_wave.values()]
        source = "serve" if target == "serve run" else "engine"
        waves = [w for w in self.waves if w["target"] == target and w["clients"] == n and w["wave"] in by_wave]
        return {
            "requests": len(stamps),
            "hops_ms_p50_p99": hops,
            "spread_ms_median_over_waves": spreads,
            "admission_steps_per_wave": admit_steps,
            "waves": [self._wave_steps(source, w) for w in waves],
        }

    def _wave_steps(self, source: str, wave: dict) -> dict:
        """The engine's steps during one wave: how many, their mean, median, longest and total ms, the
        long ones (over twice the median: a join's), new traces."""
        log = self.steps.get(source, [])
        inside = [s for s in log if wave["start"] <= s[0] <= wave["end"]]
        before = [s for s in log if s[0] < wave["start"]]
        if not inside:
            return {"wave": wave["wave"], "steps": 0}
        traces_before = before[-1][4] if before else inside[0][4]
        masked_before = before[-1][5] if before else inside[0][5]
        durations = [1000 * s[1] for s in inside]
        median = statistics.median(durations)
        return {
            "wave": wave["wave"],
            "seconds": _r(wave["end"] - wave["start"], 3),
            "steps": len(inside),
            "step_ms_mean": _r(statistics.fmean(durations)),
            "step_ms_median": _r(median),
            "step_ms_max": _r(max(durations)),
            "step_ms_total": _r(sum(durations)),
            "steps_over_2x_median": sum(d > 2 * median for d in durations),
            "ms_in_steps_over_2x_median": _r(sum(d for d in durations if d > 2 * median)),
            "new_traces": inside[-1][4] - traces_before,
            "masked_steps": inside[-1][5] - masked_before,  # padded rows: the compiled, masked decode
            "most_requests": max(s[2] for s in inside),
        }


def _spread(times: list[float | None]) -> float | None:
    times = [t for t in times if t is not None]
    return 1000 * (max(times) - min(times)) if len(times) > 1 else None


def _r(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def table(summary: dict) -> str:
    """The hops' p50 (p99) in ms per target and client count, and each wave's spread at the engine."""
    from .report import md_table

    names = [name for name, _, _ in HOPS]
    rows = []
    for level, s in summary.items():
        hops = s["hops_ms_p50_p99"]
        cells = [f"{hops[h][0]} ({hops[h][1]})" if h in hops else "" for h in names]
        spread = s["spread_ms_median_over_waves"]
        traces = sum(w.get("new_traces", 0) for w in s["waves"])
        masked = sum(w.get("masked_steps", 0) for w in s["waves"])
        total = sum(w.get("steps", 0) for w in s["waves"])
        steps = statistics.median(s["admission_steps_per_wave"]) if s["admission_steps_per_wave"] else None
        medians = [w["step_ms_median"] for w in s["waves"] if "step_ms_median" in w]
        median = statistics.median(medians) if medians else None
        rows.append([level, *cells, spread.get("admitted"), steps, traces, f"{masked}/{total}", median])
    header = [
        "target @ clients",
        *names,
        "admit spread ms",
        "admit steps",
        "new traces",
        "masked steps",
        "step ms (median of waves)",
    ]
    return md_table(header, rows)

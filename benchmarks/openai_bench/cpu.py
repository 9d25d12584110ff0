"""Optional (`--cpu-profile`): where this machine's CPU went during each scenario, by process.

A background thread reads every process's CPU time once a second (psutil); a scenario's figure is
the CPU seconds each process group used between the samples around it, divided by the wall time:
"cores busy". Useful when the server runs on this machine: it shows the server's own processes
(model workers vs HTTP plumbing) and any other load that shared the CPU during the run.
"""

from __future__ import annotations

import os
import threading
import time

import psutil


def group_of(cmdline: list[str], name: str) -> str:
    """A short, stable label: Ray actors by actor name, Python by its script or module."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split(".")[0]
    args = [a for a in cmdline if not a.startswith("-") or a in ("-m", "-c")]
    if args and "python" in os.path.basename(args[0]):
        rest = args[1:]
        if rest[:1] == ["-m"] and len(rest) > 1:
            return f"python -m {rest[1]}"
        if rest[:1] == ["-c"]:
            return "python -c"
        return f"python {os.path.basename(rest[0])}" if rest else "python"
    return os.path.basename(args[0]) if args else name


class CpuSampler:
    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[tuple[int, float], tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> CpuSampler:
        self._take()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def _take(self) -> None:
        snap = {}
        for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
            info = p.info
            if info["cpu_times"] is None:
                continue
            key = (info["pid"], info["create_time"] or 0.0)
            snap[key] = (
                group_of(info["cmdline"] or [], info["name"] or "?"),
                info["cpu_times"].user + info["cpu_times"].system,
            )
        self.samples.append((time.time(), snap))

    def usage(self, t0: float, t1: float, min_cores: float = 0.02) -> dict[str, float]:
        """Cores busy per process group between the samples nearest to t0 and t1 (unix time)."""
        if len(self.samples) < 2:
            return {}
        (ta, a), (tb, b) = (min(self.samples, key=lambda s: abs(s[0] - t)) for t in (t0, t1))
        if tb <= ta:
            return {}
        used: dict[str, float] = {}
        for key, (group, cpu) in b.items():
            used[group] = used.get(group, 0.0) + cpu - (a[key][1] if key in a else 0.0)
        out = {g: round(c / (tb - ta), 2) for g, c in used.items() if c / (tb - ta) >= min_cores}
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

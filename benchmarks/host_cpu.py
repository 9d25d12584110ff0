"""How many of the host's CPUs a benchmark keeps busy, sampled from outside the measured processes.

    python -m benchmarks.host_cpu --out samples.jsonl --interval 0.1     # runs until killed

A separate process (so sampling takes no GIL from an engine that runs in the benchmark's process)
reads /proc/stat every `--interval` seconds and appends one JSON line per sample: the wall time and
each CPU's busy fraction since the previous sample. `HostCpu` starts it and, for a time window (a
benchmark level), summarizes the samples inside: the mean number of busy CPUs (the sum of the
fractions) and how many CPUs were more than half busy, median and max over the samples. Linux only;
elsewhere `HostCpu.start` returns None.

Why (issue 36): on the lent GPU machine an engine's decode steps slow from ~5.5 to ~7 ms once 8 or
more of its 16 vCPUs are busy (benchmarks.lab.step_modes); this says how many a `serve run` wave
keeps busy, against the engine alone's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAT = Path("/proc/stat")
BUSY_OVER = 0.5


def read_stat() -> list[tuple[int, int]]:
    """(busy, total) jiffies of every CPU, in /proc/stat's order."""
    out = []
    for line in STAT.read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            out.append((sum(v[:8]) - idle, sum(v[:8])))
    return out


def sample_forever(out: Path, interval: float) -> None:
    prev = read_stat()
    with out.open("a") as f:
        while True:
            time.sleep(interval)
            now, cur = time.time(), read_stat()
            busy = [round((b1 - b0) / (t1 - t0), 3) if t1 > t0 else 0.0 for (b0, t0), (b1, t1) in zip(prev, cur)]
            f.write(json.dumps({"t": round(now, 3), "busy": busy}) + "\n")
            f.flush()
            prev = cur


class HostCpu:
    """The sampler process, and summaries of its samples over time windows."""

    def __init__(self, proc: subprocess.Popen, path: Path):
        self.proc, self.path = proc, path

    @classmethod
    def start(cls, path: Path, interval: float = 0.1) -> HostCpu | None:
        if not STAT.exists():
            return None
        cmd = [sys.executable, "-m", "benchmarks.host_cpu", "--out", str(path), "--interval", str(interval)]
        return cls(subprocess.Popen(cmd), path)

    def samples(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.endswith("}")]

    def over(self, spans: list[tuple[float, float]]) -> dict | None:
        """Busy CPUs over the samples that end inside any of SPANS ((start, end) wall times)."""
        inside = [s["busy"] for s in self.samples() if any(a < s["t"] <= b for a, b in spans)]
        if not inside:
            return None
        load = [sum(b) for b in inside]
        over = [sum(x > BUSY_OVER for x in b) for b in inside]
        return {
            "samples": len(inside),
            "busy_cpus_mean": round(statistics.fmean(load), 2),
            "busy_cpus_p90": round(sorted(load)[int(0.9 * (len(load) - 1))], 2),
            "cpus_over_half_p50": statistics.median(over),
            "cpus_over_half_max": max(over),
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="append one JSON line per sample here")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    args = p.parse_args(argv)
    try:
        sample_forever(Path(args.out), args.interval)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

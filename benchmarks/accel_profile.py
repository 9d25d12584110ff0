"""Where `serve run`'s time goes under load: py-spy samples of its proxy, router and model replica
(collapsed stacks, `--nonblocking`), summarised as each process's busiest functions.

Used by `bench_accel --profile-s S`: while one level's waves repeat, py-spy records every serve
process for S seconds. The raw stacks go to a folder (tar them to bring them back); the summary
(per process: samples, share of samples per thread, top functions by self and by inclusive share)
goes into the JSON.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy executable: on PATH, or in the bin/ of a --target install on sys.path."""
    found = shutil.which("py-spy")
    if found:
        return found
    for entry in sys.path:
        candidate = Path(entry) / "bin" / "py-spy"
        if candidate.exists():
            return str(candidate)
    return None


def start(procs: dict, seconds: float, outdir: Path, gil: bool = False) -> dict[str, subprocess.Popen]:
    """One `py-spy record` per process (role -> psutil.Process), running in the background; `gil`:
    only threads holding the GIL (who keeps the others waiting)."""
    exe = py_spy()
    if exe is None:
        return {}
    outdir.mkdir(parents=True, exist_ok=True)
    running = {}
    for role, proc in procs.items():
        argv = [exe, "record", "--pid", str(proc.pid), "--duration", str(int(seconds)), "--rate", "200"]
        argv += ["--format", "raw", "--threads", "--nonblocking", "--output", str(outdir / f"{role}.txt")]
        argv += ["--gil"] if gil else []
        running[role] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return running


def finish(running: dict[str, subprocess.Popen], outdir: Path, top: int = 12) -> dict:
    """Wait for the recorders; summarise each process's stacks."""
    out = {}
    for role, rec in running.items():
        try:
            _, err = rec.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            rec.kill()
            err = b"py-spy did not finish"
        path = outdir / f"{role}.txt"
        out[role] = summarize(path.read_text()) if path.exists() else {"error": err.decode()[-400:]}
    return out


def summarize(raw: str, top: int = 12) -> dict:
    """Collapsed stacks ("thread;frame;frame count" lines) -> per-thread shares, top functions."""
    threads, self_, incl = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        threads[frames[0]] += n
        self_[_short(frames[-1])] += n
        for name in {_short(f) for f in frames[1:]}:
            incl[name] += n

    def share(c: collections.Counter) -> list:
        return [[k, round(v / total, 3)] for k, v in c.most_common(top)] if total else []

    return {"samples": total, "threads": share(threads), "self": share(self_), "inclusive": share(incl)}


def _short(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`: lines merged, paths trimmed."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1].rstrip(")")
    return f"{name} ({file})" if file else name

"""CPU and wake-ups of this user's processes (and their busiest threads) over an interval.

    python -m benchmarks.lab.proc_wakeups 15          # e.g. beside an idle or a loaded `serve run`

Per process: cores used, voluntary context switches a second (wake-ups: it slept and was woken)
and involuntary ones (preempted). On a small machine every wake-up of a side process can preempt a
compute thread; docs/lab-notebook.md (2026-12-01, "An idle model costs (almost) nothing") reads these figures.
Linux only (/proc). Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

import psutil


def _switches(pid: int, tid: int) -> tuple[int, int, str] | None:
    try:
        status = open(f"/proc/{pid}/task/{tid}/status").read()
        comm = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
    except OSError:
        return None
    vol = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    invol = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
    return vol, invol, comm


def snapshot() -> dict[tuple[int, int], tuple[str, str, float, int, int]]:
    me, user, out = os.getpid(), psutil.Process().username(), {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "username"]):
        if p.info["username"] != user or p.pid == me:
            continue
        try:
            name = " ".join(p.info["cmdline"] or [p.info["name"]])[:70]
            for t in p.threads():
                sw = _switches(p.pid, t.id)
                if sw is not None:
                    out[(p.pid, t.id)] = (name, sw[2], t.user_time + t.system_time, sw[0], sw[1])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def measure(seconds: float) -> dict:
    a = snapshot()
    time.sleep(seconds)
    b = snapshot()
    procs: dict[int, dict] = collections.defaultdict(
        lambda: {"cores": 0.0, "wakeups_per_s": 0.0, "preempted_per_s": 0.0}
    )
    threads = []
    for key, (name, comm, cpu, vol, invol) in b.items():
        if key not in a:
            continue
        d = {
            "cores": (cpu - a[key][2]) / seconds,
            "wakeups_per_s": (vol - a[key][3]) / seconds,
            "preempted_per_s": (invol - a[key][4]) / seconds,
        }
        proc = procs[key[0]]
        proc["cmd"] = name
        for k, v in d.items():
            proc[k] += v
        threads.append({"pid": key[0], "tid": key[1], "thread": comm, **d})
    rows = sorted(
        ({"pid": pid, **v} for pid, v in procs.items() if v["cores"] or v["wakeups_per_s"]),
        key=lambda r: -r["wakeups_per_s"],
    )
    threads.sort(key=lambda t: -t["wakeups_per_s"])
    return {
        "seconds": seconds,
        "processes": rows,
        "threads": threads[:20],
        "total_wakeups_per_s": round(sum(r["wakeups_per_s"] for r in rows), 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seconds", type=float, nargs="?", default=15.0, help="the interval (default 15)")
    doc = measure(ap.parse_args(argv).seconds)
    print(json.dumps(doc, indent=2))
    print("| pid | cores | wake-ups/s | preempted/s | command |\n|---|---|---|---|---|")
    for r in doc["processes"][:25]:
        print(f"| {r['pid']} | {r['cores']:.3f} | {r['wakeups_per_s']:.1f} | {r['preempted_per_s']:.1f} | {r['cmd']} |")


if __name__ == "__main__":
    main()

"""Why an engine's decode steps run in one of two speeds on the lent GPU machine (~3.5 or ~5 ms a
step, a whole wave at a time; issue 36), and whether where its loop thread runs decides it.

    python -m benchmarks.lab.step_modes --model synthetic:qwen3-0.6b-8bit --waves 12

AsyncEngine in this process, waves of `--clients` distinct 32-byte prompts, `--max-tokens` greedy
tokens each. For every wave it records what can be read at no cost to the loop: the median step
(the engine's step log), the CPUs the loop thread ran on (sampled every 10 ms from /proc), its
migrations and involuntary switches, how busy each CPU and the loop thread's SMT sibling were
(/proc/stat), the process's busiest threads, and the GPU's SM clock and power (an `nvidia-smi`
logger beside it). Arms, in order:
  free       the scheduler places every thread;
  pinned     the loop thread alone on one CPU, the process's other threads off that core;
  spinK      as pinned, with K busy spinner processes on other CPUs (`--spinners`): what the rest of a
             serving stack's CPU use costs the loop thread on a machine whose cores share a turbo
             budget or hidden SMT siblings (a KVM guest sees neither);
  free       again, for drift.
Prints the machine's topology, JSON, then one table row per wave and per arm.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

from ..bench_accel import engine_request, prompt_text
from ..report import emit, md_table

CPU = Path("/sys/devices/system/cpu")


def topology() -> dict:
    """Each online CPU's core, package and SMT siblings (Linux sysfs), and lscpu's summary."""
    cpus = {}
    for d in sorted(CPU.glob("cpu[0-9]*"), key=lambda p: int(p.name[3:])):
        t = d / "topology"
        if not t.is_dir():
            continue
        cpus[int(d.name[3:])] = {
            "core": _read(t / "core_id"),
            "package": _read(t / "physical_package_id"),
            "siblings": parse_list(_read(t / "thread_siblings_list") or d.name[3:]),
        }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    keep = ("Model name", "Thread(s) per core", "Core(s) per socket", "Socket(s)", "NUMA", "MHz", "Hypervisor")
    return {"cpus": cpus, "lscpu": [ln for ln in lscpu.splitlines() if ln.startswith(keep)]}


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def parse_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            v = list(map(int, vals))
            idle = v[3] + v[4]
            out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def thread_stat(tid: int) -> dict:
    """A thread of this process: its last CPU, CPU ticks, name, switches and migrations."""
    base = Path(f"/proc/self/task/{tid}")
    stat = (base / "stat").read_text()
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    f = stat[stat.rindex(")") + 2 :].split()
    out = {"name": name, "cpu": int(f[36]), "ticks": int(f[11]) + int(f[12])}
    for line in (base / "status").read_text().splitlines():
        if line.startswith("nonvoluntary_ctxt_switches"):
            out["invol"] = int(line.split()[1])
    sched = base / "sched"
    if sched.exists():
        for line in sched.read_text().splitlines():
            if line.startswith("se.nr_migrations"):
                out["migrations"] = int(line.split()[-1])
    return out


def all_threads() -> dict[int, dict]:
    out = {}
    for d in Path("/proc/self/task").iterdir():
        try:
            out[int(d.name)] = thread_stat(int(d.name))
        except (OSError, ValueError):
            pass
    return out


class CpuSampler:
    """Every 10 ms, the CPU the loop thread last ran on (a /proc read: ~20 µs of GIL)."""

    def __init__(self, tid: int):
        self.tid, self.seen, self._stop = tid, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.seen.append(thread_stat(self.tid)["cpu"])
            except OSError:
                pass

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return self.seen


class GpuLog:
    """`nvidia-smi` every 50 ms into a file: wall time, SM clock MHz, power W, utilization %."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu",
                 "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=path.open("w"), stderr=subprocess.DEVNULL,
            )  # fmt: skip
        except OSError:
            self.proc = None

    def lines(self) -> list[str]:
        return self.path.read_text().splitlines() if self.path.exists() else []

    def window(self, first: int) -> dict:
        """Median SM clock / power / utilization over the lines logged since line `first`."""
        rows = []
        for line in self.lines()[first:]:
            try:
                rows.append([float(x) for x in line.split(",")[1:4]])
            except ValueError:
                continue
        if not rows:
            return {}
        return {
            "sm_mhz": statistics.median(r[0] for r in rows),
            "power_w": round(statistics.median(r[1] for r in rows), 1),
            "util_pct": statistics.median(r[2] for r in rows),
        }

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def pin(loop_tid: int, loop_cpu: int, topo: dict) -> None:
    """The loop thread on `loop_cpu` alone; every other thread of this process off its core."""
    core = set(topo["cpus"].get(loop_cpu, {}).get("siblings", [loop_cpu]))
    rest = set(os.sched_getaffinity(0)) - core or {loop_cpu}
    for tid in all_threads():
        os.sched_setaffinity(tid, {loop_cpu} if tid == loop_tid else rest)


def unpin(all_cpus: set[int]) -> None:
    for tid in all_threads():
        try:
            os.sched_setaffinity(tid, all_cpus)
        except OSError:
            pass


def spinner(cpu: int) -> subprocess.Popen:
    """A process that spins on one CPU (an SMT sibling's neighbour at full tilt)."""
    code = f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    return subprocess.Popen(["python3", "-c", code])


async def one_wave(engine, args, tag: str, tid: int, topo: dict, gpu: GpuLog) -> dict:
    engine.step_log = []
    before_cpu, before_threads = cpu_times(), all_threads()
    sampler = CpuSampler(tid)
    t0, gpu_line = time.perf_counter(), len(gpu.lines())
    results = await asyncio.gather(
        *(engine_request(engine, prompt_text(f"{tag}c{i}"), args.max_tokens) for i in range(args.clients))
    )
    wall = time.perf_counter() - t0
    seen = sampler.stop()
    after_cpu, after_threads = cpu_times(), all_threads()
    steps, engine.step_log = engine.step_log, None
    decode = [1000 * s[1] for s in steps if s[2] == args.clients] or [1000 * s[1] for s in steps]
    busy = {
        c: round((after_cpu[c][0] - before_cpu[c][0]) / max(1, after_cpu[c][1] - before_cpu[c][1]), 2)
        for c in after_cpu
    }
    main_cpu = max(set(seen), key=seen.count) if seen else after_threads[tid]["cpu"]
    sib = [c for c in topo["cpus"].get(main_cpu, {}).get("siblings", []) if c != main_cpu]
    ticks = {t: after_threads[t]["ticks"] - before_threads.get(t, {"ticks": 0})["ticks"] for t in after_threads}
    top = sorted(ticks, key=lambda t: -ticks[t])[:5]
    me, was = after_threads[tid], before_threads[tid]
    return {
        "tok_s": round(sum(r.completion_tokens for r in results) / wall, 1),
        "steps": len(steps),
        "masked_steps": steps[-1][5] - steps[0][5] if steps else 0,  # padded rows: the compiled step
        "step_ms_median": round(statistics.median(decode), 2) if decode else None,
        "loop_cpus": sorted(set(seen)),
        "loop_cpu": main_cpu,
        "loop_cpu_share": round(seen.count(main_cpu) / len(seen), 2) if seen else None,
        "sibling_busy": max((busy[c] for c in sib), default=None),
        "cpus_busy_over_half": sorted(c for c, b in busy.items() if b > 0.5),
        "migrations": me.get("migrations", 0) - was.get("migrations", 0),
        "invol_switches": me.get("invol", 0) - was.get("invol", 0),
        "busiest_threads": [(after_threads[t]["name"], ticks[t]) for t in top],
        **gpu.window(gpu_line),
    }


async def measure(args) -> dict:
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    topo = topology()
    all_cpus = set(os.sched_getaffinity(0))
    gpu = GpuLog(Path(args.gpu_log))
    engine = AsyncEngine.from_source(args.model, EngineConfig(max_num_seqs=max(64, args.clients)))
    tid = engine._thread.native_id
    loop_cpu = args.loop_cpu
    waves = []
    try:
        for i in range(2):  # warm-up: compile the step shapes
            await one_wave(engine, args, f"warm{i}", tid, topo, gpu)
        others = sorted(all_cpus - {loop_cpu})
        plan = [("free", args.waves, 0), ("pinned", args.waves, 0)]
        plan += [(f"spin{k}", args.waves // 2, k) for k in args.spinners if k <= len(others)]
        plan.append(("free-again", args.waves, 0))
        for arm, n, k in plan:
            unpin(all_cpus)
            if arm != "free" and arm != "free-again":
                pin(tid, loop_cpu, topo)
            spins = [spinner(c) for c in others[-k:]] if k else []
            try:
                for w in range(n):
                    row = await one_wave(engine, args, f"{arm}{w}", tid, topo, gpu)
                    waves.append({"arm": arm, "spinners": k, "wave": w, **row})
                    print(arm, w, row["step_ms_median"], row["loop_cpu"], row.get("sm_mhz"), flush=True)
            finally:
                for proc in spins:
                    proc.kill()
    finally:
        unpin(all_cpus)
        gpu.close()
        engine.shutdown()
    arms = {}
    for w in waves:
        arms.setdefault(w["arm"], []).append(w["step_ms_median"])
    summary = {a: {"waves": len(v), "step_ms_median": round(statistics.median(v), 2), "min": min(v), "max": max(v)}
               for a, v in arms.items()}  # fmt: skip
    return {"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens, "loop_cpu": loop_cpu,
            "topology": topo, "arms": summary, "waves": waves}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:qwen3-0.6b-8bit")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--waves", type=int, default=10, help="waves per arm (the spin arms run half)")
    p.add_argument("--spinners", type=int, nargs="*", default=[4, 8, 13], help="busy processes per spin arm")
    p.add_argument("--loop-cpu", type=int, default=2, help="the CPU the pinned arms give the loop thread")
    p.add_argument("--gpu-log", default="/tmp/step_modes_gpu.csv")
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    doc = asyncio.run(measure(args))
    rows = [
        [w["arm"], w["wave"], w["step_ms_median"], w["tok_s"], ",".join(map(str, w["loop_cpus"])),
         w["sibling_busy"], w["migrations"], w["invol_switches"], w.get("sm_mhz"), w.get("power_w")]
        for w in doc["waves"]
    ]  # fmt: skip
    header = ["arm", "wave", "step ms", "tok/s", "loop CPUs", "sibling busy", "migr.", "invol.", "SM MHz", "W"]
    print("\n".join(doc["topology"]["lscpu"]))
    emit(doc, md_table(header, rows), args.out)


if __name__ == "__main__":
    main()

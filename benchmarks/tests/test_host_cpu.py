"""benchmarks.host_cpu: the sampler process writes samples, and windows summarize them."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks.host_cpu import STAT, HostCpu, read_stat


def test_a_window_counts_the_busy_cpus_of_the_samples_inside_it(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [(1.0, [0.9, 0.1]), (2.0, [1.0, 0.6]), (3.0, [0.2, 0.2]), (9.0, [1.0, 1.0])]
    path.write_text("".join(json.dumps({"t": t, "busy": b}) + "\n" for t, b in rows) + '{"t": 10.0, "bu')  # cut off
    host = HostCpu(proc=None, path=path)
    window = host.over([(0.5, 3.0)])
    assert window["samples"] == 3
    assert window["busy_cpus_mean"] == round((1.0 + 1.6 + 0.4) / 3, 2)
    assert (window["cpus_over_half_p50"], window["cpus_over_half_max"]) == (1, 2)
    assert host.over([(0.5, 1.5), (8.0, 9.5)])["samples"] == 2
    assert host.over([(4.0, 5.0)]) is None


@pytest.mark.skipif(not STAT.exists(), reason="/proc/stat: Linux only")
def test_the_sampler_process_writes_one_line_per_cpu_set_until_stopped(tmp_path):
    host = HostCpu.start(tmp_path / "samples.jsonl", interval=0.05)
    start = time.time()
    deadline = start + 10
    while len(host.samples()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    host.stop()
    samples = host.samples()
    assert len(samples) >= 3 and host.proc.returncode is not None
    assert all(len(s["busy"]) == len(read_stat()) and all(0 <= x <= 1.0 for x in s["busy"]) for s in samples)
    assert host.over([(start - 1, time.time())])["samples"] == len(samples)

"""The hop summary's per-wave step counts (benchmarks.accel_hops), on a made-up step log."""

from benchmarks.accel_hops import Hops, table


def test_a_waves_masked_steps_are_the_compiled_steps_taken_inside_it(tmp_path):
    hops = Hops(tmp_path)
    # (start, seconds, requests, outputs, traces so far, compiled steps so far)
    hops.steps["engine"] = [
        (9.0, 0.004, 1, 1, 2, 10),  # before the wave
        (10.0, 0.004, 4, 4, 2, 10),  # unpadded: no compiled step
        (10.1, 0.030, 8, 8, 3, 11),  # a join: the batch is padded from here
        (10.2, 0.006, 8, 8, 3, 12),
        (10.3, 0.006, 8, 8, 3, 13),
        (12.0, 0.004, 1, 1, 3, 14),  # after it
    ]
    hops.waves.append({"target": "engine", "clients": 8, "wave": "r0w0", "start": 9.9, "end": 10.5})
    steps = hops._wave_steps("engine", hops.waves[0])
    assert steps["steps"] == 4
    assert steps["masked_steps"] == 3
    assert steps["new_traces"] == 1
    assert steps["step_ms_median"] == 6.0
    assert steps["steps_over_2x_median"] == 1

    summary = {
        "engine @ 8": {
            "hops_ms_p50_p99": {},
            "spread_ms_median_over_waves": {},
            "admission_steps_per_wave": [2],
            "waves": [steps, {"wave": "r0w1", "steps": 0}],  # a wave the step log missed
        }
    }
    row = table(summary).splitlines()[-1]
    assert "3/4" in row and "6.0" in row

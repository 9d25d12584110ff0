"""bench_speculative's arithmetic and workloads, without a model: the shares it reports, the waves it
sends, and that the suite is registered."""

import pytest

from benchmarks import bench_speculative as bs
from benchmarks.__main__ import SUITES


def test_the_suite_is_registered_and_shows_its_help(capsys):
    assert SUITES["speculative"][0] == "benchmarks.bench_speculative"
    with pytest.raises(SystemExit) as exit_:
        bs.parser().parse_args(["--help"])
    assert exit_.value.code == 0
    assert "--methods" in capsys.readouterr().out


def test_repeat_and_lookup_shares():
    prompt = [1, 2, 3, 4, 5]
    assert bs.repeat_share(prompt, [1, 2, 3, 4, 9]) == 0.5  # (1,2,3,4) in the prompt, (2,3,4,9) not
    assert bs.repeat_share(prompt, [1, 2]) is None
    # output 4-grams seen before in prompt + output: (1,2,3,4), then (9,9,9,9) twice after its first
    assert bs.lookup_share(prompt, [1, 2, 3, 4, 9, 9, 9, 9, 9, 9]) == 0.3


def test_first_difference():
    assert bs.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert bs.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert bs.first_difference([1, 2], [1, 2, 3]) == 2


def test_waves_use_distinct_prompts_per_round_and_client():
    for name in ("edit", "open"):
        prompts = bs.workload_prompts(name)
        assert len(set(prompts)) == len(prompts) >= 12
        waves = [bs.wave_prompts(prompts, 5, r) for r in range(2)]
        assert len({p for w in waves for p in w}) == 10
    edit = bs.workload_prompts("edit")
    assert len(edit) == len(bs.PASSAGES) * len(bs.EDIT_TASKS)
    assert bs.add_typos(bs.PASSAGES[0]) != bs.PASSAGES[0]

"""benchmarks.bench_peers_ab: the paired ratios and who won each round (pure)."""

from __future__ import annotations

from benchmarks.bench_peers_ab import ROWS, paired, table


def round_of(ours: dict, peer: dict) -> dict:
    base = {key: 1.0 for _, key, _ in ROWS}
    return {"ours": {"rows": {**base, **ours}}, "peer": {"rows": {**base, **peer}}}


def test_ratios_medians_and_wins_follow_each_rows_direction():
    rounds = [
        round_of({"tok_s_1": 12.0, "single_ttft_p50_ms": 160.0}, {"tok_s_1": 10.0, "single_ttft_p50_ms": 200.0}),
        round_of({"tok_s_1": 9.0, "single_ttft_p50_ms": 250.0}, {"tok_s_1": 10.0, "single_ttft_p50_ms": 200.0}),
        round_of({"tok_s_1": 11.0, "single_ttft_p50_ms": 190.0}, {"tok_s_1": 10.0, "single_ttft_p50_ms": 200.0}),
    ]
    s = paired(rounds)
    assert s["tok_s_1"]["ratio"] == [1.2, 0.9, 1.1]
    assert s["tok_s_1"]["median_ratio"] == 1.1
    assert s["tok_s_1"]["ours_won"] == "2/3"  # more tok/s wins
    assert s["single_ttft_p50_ms"]["ours_won"] == "2/3"  # less TTFT wins
    assert s["tok_s_5"]["ours_won"] == "0/3"  # a tie is not a win for a higher-is-better row


def test_zero_peer_errors_give_no_ratio_and_fewer_errors_win():
    s = paired([round_of({"errors": 0}, {"errors": 0}), round_of({"errors": 0}, {"errors": 3})])
    assert s["errors"]["ratio"] == [None, 0.0]
    assert s["errors"]["ours_won"] == "2/2"  # lower is better: as few errors counts
    assert "| errors | 0 / 0 | 0 / 3 |" in table(s)

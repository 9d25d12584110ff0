"""A config that cannot deploy, end to end: `serve run` of bad YAML keeps running (Ray builds the
app in its controller), and its log names the field or the numbers. Both configs are deployed as
two applications of one `serve run`, so that the suite starts Ray once for them.
"""

from __future__ import annotations

import pytest

from .serving import ROOT, failed_deploy_outputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    default = (ROOT / "serve_config.yaml").read_text()
    bad_fields = default.replace("max_num_seqs: 16", "max_num_seqs: 0", 1).replace(
        "stream_window_ms: 30", "stream_windw_ms: 30", 1
    )
    governor = (ROOT / "tests" / "fixtures" / "governor.yaml").read_text()
    assert "max_num_seqs: 16" in default and "stream_window_ms: 30" in default and "budget_mb: 2350" in governor
    return failed_deploy_outputs(
        {"bad-fields": bad_fields, "small-budget": governor.replace("budget_mb: 2350", "budget_mb: 400")},
        tmp_path_factory.mktemp("bad_config"),
    )


def test_bad_yaml_fails_with_a_message_naming_the_field(output):
    assert "args.models[0].engine.max_num_seqs: Input should be greater than or equal to 1" in output
    assert "args.models[0].stream_windw_ms: Extra inputs are not permitted" in output


def test_a_model_larger_than_the_budget_fails_at_start(output):
    assert "model 'tiny-a' needs" in output and "the whole memory budget is 400 MiB" in output

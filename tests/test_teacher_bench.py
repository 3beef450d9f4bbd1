"""The VLM benchmark runs and reports what it promises (small settings; the full one is manual)."""

from __future__ import annotations

import json

import pytest

from vlmrel.bench import vlm as bench


@pytest.mark.parametrize("where", ["process", "thread"])
def test_bench_vlm_small(capsys, where):
    bench.main(
        ["--json", "--requests", "24", "--latency", "0.02", "--slots", "4", "--sequential-n", "4"]
        + ["--simulator", where]
    )
    out = json.loads(capsys.readouterr().out)
    assert out["simulator"] == where
    assert out["capacity_req_per_s"] == 4 / 0.02
    assert out["vlmrel"]["ok"] == 24 and out["vlmrel"]["server_requests"] == 24
    assert out["vlmrel"]["server_peak_concurrency"] <= 4
    assert out["cached"]["cache_hits"] == 24 and out["cached"]["server_requests"] == 0
    assert out["cached"]["same_answers"]
    assert out["seed_loop"]["ok"] == 4
    assert 0 < out["vlmrel"]["server_slot_utilization"] <= 1
    assert out["vlmrel"]["server_slot_s_per_request"] >= 0.02
    assert set(out["targets"]) == {"fraction_of_capacity_ge_0.95", "cached_rerun_lt_0.5s"}

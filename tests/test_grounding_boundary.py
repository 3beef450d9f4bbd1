"""Semantic boundary samples (beta_sem on the normalised answer similarity), their overlap with the
geometric ones, the seeds' checks as flags, and the in-sample vs out-of-sample table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmrel.grounding.analysis import (
    Matrices,
    boundary_overlap,
    iou_spread,
    seed_checks,
    semantic_boundary,
)
from vlmrel.grounding.drift import normalized_similarity
from vlmrel.grounding.tables import in_vs_out, write_in_vs_out

NAN = np.nan
# hand-made answer distances d (5 samples x 3 perturbations); similarity 1 - d / max(row)
DRIFT = np.array(
    [
        [0.0, 0.0, 0.0],  # all answers identical: similarity 1 everywhere (not 0/0)
        [0.1, 0.2, 0.4],  # similarity 0.75, 0.5, 0.0 -> classes 3, 2, 0 of [0.3, 0.5, 0.7]
        [0.2, 0.2, NAN],  # similarity 0, 0 (one failed request) -> class 0 only
        [0.05, 0.1, 0.1],  # similarity 0.5, 0, 0 -> classes 2, 0
        [NAN, NAN, NAN],  # every request failed: no similarity, not a boundary sample
    ]
)
IDS = ["a", "b", "c", "d", "e"]


def _mat(iou_perturbed, iou_original=None):
    ip = np.asarray(iou_perturbed, float)
    n, p = ip.shape
    return Matrices(
        sample_ids=IDS[:n],
        perturbation_ids=[f"p{j}" for j in range(p)],
        iou_original=np.full(n, 0.9) if iou_original is None else np.asarray(iou_original, float),
        iou_perturbed=ip,
        answer_original=[None] * n,
        answer_perturbed=[[None] * p for _ in range(n)],
        failure_original=[None] * n,
        failure_perturbed=[[None] * p for _ in range(n)],
    )


def test_all_zero_distances_give_similarity_one_and_no_nan():
    with np.errstate(all="raise"):  # no 0/0 anywhere
        sim = normalized_similarity(np.zeros((3, 4)))
    assert np.array_equal(sim, np.ones((3, 4)))
    sim = normalized_similarity(DRIFT)
    assert np.array_equal(sim[0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(sim[1], [0.75, 0.5, 0.0])
    assert np.isnan(sim[2, 2]) and np.isnan(sim[4]).all() and not np.isnan(sim[:2]).any()


def test_beta_sem_applied_to_hand_made_similarities():
    mat = _mat(np.full(DRIFT.shape, 0.8))
    diffs = ["easy", "easy", "medium", "hard", "hard"]
    sem = semantic_boundary(mat, diffs, DRIFT, [0.3, 0.5, 0.7], "config list")
    assert sem["samples"] == ["b", "d"]
    assert sem["rate"] == pytest.approx(2 / 5)
    assert sem["thresholds"] == [0.3, 0.5, 0.7] and sem["thresholds_source"] == "config list"
    assert sem["by_difficulty"]["hard"] == {"n": 2, "n_boundary": 1, "rate": 0.5}
    assert sem["n_all_zero_distance_samples"] == 1
    # one threshold at 0.6: b spans 0.75 | 0.5, 0; d has 0.5, 0, 0 all below -> only b
    assert semantic_boundary(mat, diffs, DRIFT, [0.6], "x")["samples"] == ["b"]
    # the seed's unsafe 1 - d / d.max() would have made sample a NaN; here it is similarity 1, class 3
    assert "a" not in sem["samples"]


def test_overlap_of_geometric_and_semantic_samples():
    ov = boundary_overlap(IDS, ["a", "b", "c"], ["b", "d", "c"])
    assert (ov["n_geometric"], ov["n_semantic"], ov["n_both"], ov["n_either"]) == (3, 3, 2, 4)
    assert ov["both"] == ["b", "c"] and ov["geometric_only"] == ["a"] and ov["semantic_only"] == ["d"]
    assert ov["jaccard"] == pytest.approx(0.5) and ov["rate_both"] == pytest.approx(0.4)
    assert boundary_overlap(IDS, [], [])["jaccard"] is None


def test_seed_checks_flags_and_values():
    ip = np.array(
        [
            [0.9, 0.5, 0.1],  # std 0.327 > 0.1
            [0.8, 0.8, 0.8],  # 0
            [0.6, NAN, 0.7],  # std 0.05
            [NAN, NAN, NAN],  # no spread: left out
        ]
    )
    spread = iou_spread(ip)
    np.testing.assert_allclose(spread[:3], [np.std([0.9, 0.5, 0.1]), 0.0, 0.05], atol=1e-12)
    assert np.isnan(spread[3])
    mat = _mat(ip)
    c = seed_checks(mat, boundary_rate=0.25, rho=0.8, mi_gain_pct=12.0)
    items = {i["check"]: i for i in c["items"]}
    mean_spread = (np.std([0.9, 0.5, 0.1]) + 0.0 + 0.05) / 3
    assert items["iou_spread"]["value"] == pytest.approx(mean_spread) and items["iou_spread"]["pass"] is True
    assert items["share_sensitive"]["value"] == pytest.approx(1 / 3)
    assert items["boundary_rate"]["pass"] is True  # 25 % within 20-40 %
    assert items["geo_sem_rho"]["pass"] is False  # 0.8 outside 0.3-0.7
    assert items["mi_gain"]["pass"] is True  # 12 % > 5 %
    assert (c["n_pass"], c["n_fail"], c["n_undefined"]) == (4, 1, 0)
    assert c["per_sample_iou_spread"]["d"] is None
    c = seed_checks(mat, boundary_rate=0.5, rho=None, mi_gain_pct=None)
    items = {i["check"]: i for i in c["items"]}
    assert items["boundary_rate"]["pass"] is False
    assert items["geo_sem_rho"]["pass"] is None and items["mi_gain"]["pass"] is None
    assert (c["n_fail"], c["n_undefined"]) == (1, 2)


def _boundary(subset, out_of_sample, rate, sem_rate=0.5, ref=None):
    b = {
        "subset": subset,
        "n_samples": 4,
        "n_perturbations": 3,
        "out_of_sample": out_of_sample,
        "thresholds": {
            "thresholds": [0.4, 0.6, 0.8],
            "boundary_000": {"rate": rate},
            "boundary_001": {"rate": rate / 2},
        },
        "semantic": {"rate": sem_rate},
    }
    if ref:
        b["in_sample_reference"] = ref
    return b


def test_in_vs_out_of_sample_rows_and_disjointness(tmp_path):
    ref = {
        "thresholds": [0.5, 0.7, 0.9],
        "thresholds_source": "exact MI optimum for perturbation_magnitude",
        "boundary_000": {"rate": 0.75},
        "boundary_001": {"rate": 0.5},
    }
    t = _boundary("t", False, 0.5)
    v = _boundary("v", True, 0.25, ref=ref)
    subsets = [{"name": "t", "indices": [1, 2, 3]}, {"name": "v", "indices": [4, 5, 6, 7]}]
    res = in_vs_out(v, t, subsets)
    assert res["disjoint"] and res["subsets"] == ["t", "v"]
    assert [(r["subset"], r["kind"], r["boundary_000_rate"]) for r in res["rows"]] == [
        ("t", "in-sample", 0.5),
        ("v", "out-of-sample", 0.25),
        ("v", "in-sample", 0.75),
    ]
    assert res["rows"][2]["thresholds_source"].endswith("(optimistic)")
    with pytest.raises(ValueError, match="share 1 samples"):
        in_vs_out(v, t, [subsets[0], {"name": "v", "indices": [3, 4]}])
    # only one subset configured: the in-sample row alone
    assert [r["in_sample"] for r in in_vs_out(_boundary("v", False, 0.3), None, subsets[1:])["rows"]] == [
        True
    ]
    files = {}
    for name, obj in (("v", v), ("t", t), ("st", subsets[0]), ("sv", subsets[1])):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    write_in_vs_out(
        str(files["v"]), str(files["t"]), [str(files["st"]), str(files["sv"])],
        str(tmp_path / "o.json"), str(tmp_path / "o.html"),
    )  # fmt: skip
    html = (tmp_path / "o.html").read_text()
    assert "out-of-sample" in html and "25.0 %" in html and "checked disjoint" in html

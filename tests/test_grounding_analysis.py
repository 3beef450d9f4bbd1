"""predictions.parquet -> IoUs -> thresholds.json / boundary.json -> figures, on a simulated model."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import spearmanr

from vlmrel.grounding import parse_bbox
from vlmrel.grounding.analysis import (
    PREDICTION_COLUMNS,
    arrange,
    boundary_report,
    prediction_row,
    read_predictions,
    signals,
    thresholds_report,
)
from vlmrel.grounding.data import difficulty, make_demo_scenes
from vlmrel.grounding.drift import CachedEmbedder, semantic_drift
from vlmrel.grounding.figures import threshold_figure, timing_figure, validation_figure
from vlmrel.grounding.iou import boundary_000, boundary_001, iou
from vlmrel.grounding.perturb import ORIGINAL_ID, build_grid
from vlmrel.io import read_json, write_json


class CharEmbedder:
    """Bag-of-characters vectors: different answers get different vectors."""

    name = "chars"

    def embed(self, texts):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 64] += 1
        return out


def _simulate(tmp_path):
    scenes = make_demo_scenes(12, seed=2, size=(160, 120))
    grid = build_grid({"brightness_contrast": "5x5"})
    rng = np.random.default_rng(0)
    gt = {}
    rows = []
    for sc in scenes:
        sid = sc["question_id"]
        x1, y1, x2, y2 = sc["bbox_xyxy"]
        gt[sid] = (x1 / 160, y1 / 120, x2 / 160, y2 / 120)
        skill = rng.uniform(0, 40)
        for p in [None, *grid]:
            mag = 0.0 if p is None else p.magnitude
            jitter = rng.normal(0, skill * (1 + 10 * mag), 4)
            box = np.array([x1 / 160, y1 / 120, x2 / 160, y2 / 120]) * 1000 + jitter
            text = '{"bbox_2d": [' + ", ".join(str(int(v)) for v in np.round(box)) + "]}"
            if rng.random() < 0.05:
                text = "I am not sure."
            parsed = parse_bbox(text, "rel1000", (160, 120))
            rows.append(
                prediction_row(
                    sid,
                    ORIGINAL_ID if p is None else p.id,
                    {} if p is None else p.params,
                    text,
                    parsed.box,
                    parsed.failure,
                    float(rng.uniform(0.5, 3)),
                    bool(rng.random() < 0.3),
                )
            )
    # one request that failed in the client: no answer at all
    rows[3] = prediction_row(
        rows[3]["sample_id"], rows[3]["perturbation_id"], {}, None, None, "timeout", 30.0, False
    )
    path = tmp_path / "predictions.parquet"
    pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS)).to_parquet(path)
    diffs = [difficulty((b[2] - b[0]) * (b[3] - b[1])) for b in gt.values()]
    return path, gt, grid, diffs


def test_pipeline_against_direct_computation(tmp_path):
    path, gt, grid, diffs = _simulate(tmp_path)
    df = read_predictions(path)
    mat = arrange(df, gt, [p.id for p in grid])
    assert mat.iou_perturbed.shape == (12, 25)
    # IoU of one cell recomputed by hand from the stored row
    row = df[(df.sample_id == mat.sample_ids[2]) & (df.perturbation_id == grid[7].id)].iloc[0]
    expected = iou(list(row["box"]), gt[mat.sample_ids[2]]) if row["box"] is not None else np.nan
    assert mat.iou_perturbed[2, 7] == pytest.approx(expected, nan_ok=True)
    n_failed = int((df.status == "failed").sum())
    assert n_failed > 0 and np.isnan(np.r_[mat.iou_original, mat.iou_perturbed.ravel()]).sum() == n_failed

    drift = semantic_drift(mat.answer_original, mat.answer_perturbed, CachedEmbedder(CharEmbedder()))
    sig = signals(mat, [p.magnitude for p in grid], drift)
    assert set(sig) == {"perturbation_magnitude", "iou_drop", "semantic_drift"}
    th = thresholds_report(mat.iou_perturbed, sig, k=3, n_bins=10, lbfgsb_restarts=3)
    for entry in th["signals"].values():
        assert entry["exact"]["mi"] >= max(entry["lbfgsb"]["mi"], entry["baseline"]["mi"]) - 1e-12
        assert entry["n_dropped"] >= int(np.isnan(mat.iou_perturbed).sum())
    write_json(tmp_path / "thresholds.json", th)
    th = read_json(tmp_path / "thresholds.json")

    t = th["signals"]["perturbation_magnitude"]["exact"]["thresholds"]
    rep = boundary_report(mat, diffs, t, thresholds_source="exact:perturbation_magnitude", drift=drift)
    write_json(tmp_path / "boundary.json", rep)
    b0 = boundary_000(mat.iou_perturbed, t)
    b1 = boundary_001(mat.iou_original, mat.iou_perturbed, t)
    assert rep["thresholds"]["boundary_000"]["samples"] == [
        s for s, f in zip(mat.sample_ids, b0, strict=True) if f
    ]
    assert rep["thresholds"]["boundary_001"]["rate"] == pytest.approx(np.nanmean(b1))
    by = rep["thresholds"]["boundary_000"]["by_difficulty"]
    assert sum(v["n"] for v in by.values()) == 12
    drop = (mat.iou_original[:, None] - mat.iou_perturbed).ravel()
    ok = np.isfinite(drop) & np.isfinite(drift.ravel())
    rho = spearmanr(drop[ok], drift.ravel()[ok]).statistic
    assert rep["spearman_iou_drop_vs_semantic_drift"]["pairs"]["rho"] == pytest.approx(rho)
    assert rep["failure_rate"]["n_failed"] == n_failed and rep["failure_rate"]["by_kind"]["timeout"] == 1
    assert rep["accuracy"]["original"]["acc@0.5"]["n_valid"] == int(np.isfinite(mat.iou_original).sum())

    validation_figure(
        mat, rep, th, tmp_path / "validation.png", drift=drift, definition="boundary_001", dpi=60
    )
    threshold_figure(th, tmp_path / "thresholds.png", dpi=60)
    timing_figure(df.latency_s, df.cache_hit, df.status, tmp_path / "timing.png", dpi=60)
    for name in ("validation.png", "thresholds.png", "timing.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300


def test_prediction_rows_are_consistent(tmp_path):
    with pytest.raises(ValueError, match="either a box or a failure"):
        prediction_row("s", "p", {}, "x", (0, 0, 1, 1), "no_json", 0.1, False)
    r = prediction_row("s", "p", {"noise": 0.1}, "x", None, "no_json", 0.1, False)
    assert r["status"] == "failed" and r["parameters"] == '{"noise": 0.1}'
    df = pd.DataFrame([r, r], columns=list(PREDICTION_COLUMNS))
    df.to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="duplicate"):
        read_predictions(tmp_path / "dup.parquet")
    df.iloc[:1].to_parquet(tmp_path / "one.parquet")
    with pytest.raises(ValueError, match="no row for sample 's', perturbation 'original'"):
        arrange(read_predictions(tmp_path / "one.parquet"), {"s": (0, 0, 1, 1)}, ["p"])

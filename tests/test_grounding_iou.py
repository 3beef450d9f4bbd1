"""IoU on hand-computed boxes, Acc@t, classes, both boundary definitions, severity, failure rates."""

import numpy as np
import pytest

from vlmrel.grounding.iou import (
    accuracy_at,
    boundary_000,
    boundary_001,
    box_iou,
    failure_rates,
    iou,
    iou_classes,
    severity,
)

NAN = np.nan


@pytest.mark.parametrize(
    "a,b,expected",
    [
        ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),  # inter 1, union 4 + 4 - 1
        ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),
        ((0, 0, 1, 1), (2, 2, 3, 3), 0.0),
        ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),  # touching edges
        ((0, 0, 4, 2), (1, 0, 3, 2), 0.5),  # inside: 4 / 8
        ((0.1, 0.1, 0.5, 0.5), (0.3, 0.3, 0.7, 0.7), 0.04 / 0.28),
    ],
)
def test_iou_hand_computed(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


def test_iou_is_the_original_image_iou_after_normalising():
    w, h = 640, 480
    a, b = (64, 48, 320, 240), (100, 100, 400, 300)
    na = (a[0] / w, a[1] / h, a[2] / w, a[3] / h)
    nb = (b[0] / w, b[1] / h, b[2] / w, b[3] / h)
    assert iou(na, nb) == pytest.approx(iou(a, b))


def test_failures_are_nan_not_zero():
    assert np.isnan(iou(None, (0, 0, 1, 1)))
    out = box_iou(np.array([[0, 0, 1, 1], [NAN] * 4]), np.array([0, 0, 1, 1]))
    assert out[0] == 1.0 and np.isnan(out[1])


def test_accuracy_excludes_failures_and_reports_both():
    ious = np.array([0.9, 0.6, 0.4, NAN])
    a = accuracy_at(ious, 0.5)
    assert a["acc"] == pytest.approx(2 / 3)
    assert a["acc_failures_as_miss"] == pytest.approx(2 / 4)
    assert a["failure_rate"] == pytest.approx(0.25)
    assert accuracy_at(np.array([0.5, 0.7]), 0.7)["acc"] == 0.5  # >= counts


def test_classes():
    c = iou_classes(np.array([0.0, 0.29, 0.3, 0.5, 0.69, 0.7, 1.0, NAN]), [0.3, 0.5, 0.7])
    assert c.tolist() == [0, 0, 1, 2, 2, 3, 3, -1]


def test_boundary_definitions_disagree_on_hand_examples():
    t = [0.3, 0.5, 0.7]
    iou_orig = np.array([0.8, 0.8, 0.4, 0.6, NAN])
    iou_pert = np.array(
        [
            [0.2, 0.2, 0.25],  # A: perturbed all class 0 (one class), original class 3 -> 001 yes, 000 no
            [0.75, 0.9, 0.71],  # B: all class 3 like the original -> neither
            [0.35, 0.6, 0.45],  # C: perturbed span classes 1 and 2 -> 000 yes; 001 yes (0.6 differs)
            [0.55, 0.65, 0.2],  # D: classes 2, 2, 0 -> both
            [0.1, 0.9, NAN],  # E: original failed -> 001 undefined, 000 yes
        ]
    )
    b0 = boundary_000(iou_pert, t)
    b1 = boundary_001(iou_orig, iou_pert, t)
    assert b0.tolist() == [False, False, True, True, True]
    assert b1[:4].tolist() == [1.0, 0.0, 1.0, 1.0] and np.isnan(b1[4])
    sev = severity(iou_orig, iou_pert, t)
    assert sev[:4].tolist() == [3, 0, 1, 2] and np.isnan(sev[4])


def test_boundary_000_ignores_failed_perturbations():
    t = [0.5]
    assert boundary_000(np.array([[0.9, NAN, 0.8], [0.1, NAN, NAN], [NAN, NAN, NAN]]), t).tolist() == [
        False,
        False,
        False,
    ]
    # the failed request is not a class jump for 001 either
    assert boundary_001(np.array([0.9]), np.array([[0.8, NAN]]), t).tolist() == [0.0]


def test_failure_rates():
    fr = failure_rates(np.array([0.5, NAN]), np.array([[NAN, 0.1, 0.2], [NAN, NAN, 0.3]]))
    assert fr["per_sample"].tolist() == pytest.approx([1 / 4, 3 / 4])
    assert fr["overall"] == pytest.approx(4 / 8)
    assert fr["original"] == 0.5 and fr["perturbed"] == pytest.approx(3 / 6)

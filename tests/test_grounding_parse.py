"""parse_bbox: each coordinate convention and each failure kind, on Qwen-style answers."""

import pytest

from vlmrel.grounding import FAILURE_KINDS, QWEN3_PROMPT, build_prompt, parse_bbox, smart_resize
from vlmrel.grounding.parse import SmartResize


def test_rel1000_qwen3_json_list_with_label():
    text = '```json\n[\n\t{"bbox_2d": [100, 0, 285, 266], "label": "top left water"}\n]\n```'
    r = parse_bbox(text, "rel1000", (640, 480))
    assert r.ok and r.status == "ok"
    assert r.box == pytest.approx((0.1, 0.0, 0.285, 0.266))
    assert r.to_pixels((640, 480)) == pytest.approx((64.0, 0.0, 182.4, 127.68))


def test_norm1_and_text_around_json():
    r = parse_bbox('Sure! The box is {"bbox_2d": [0.25, 0.5, 0.75, 1.0]} as asked.', "norm1", (100, 50))
    assert r.box == pytest.approx((0.25, 0.5, 0.75, 1.0))


def test_abs_resized_uses_qwen25_smart_resize():
    # 640 x 480 -> multiples of 28 nearest: 644 x 476 (area within limits)
    assert smart_resize(640, 480) == (644, 476)
    r = parse_bbox('{"bbox_2d": [161, 119, 483, 357]}', "abs_resized", (640, 480))
    assert r.box == pytest.approx((161 / 644, 119 / 476, 483 / 644, 357 / 476))
    # a tiny image is scaled up to min_pixels; a huge one down to max_pixels
    w, h = smart_resize(20, 20)
    assert w % 28 == 0 and h % 28 == 0 and w * h >= 56 * 56
    w, h = smart_resize(8000, 6000, SmartResize(max_pixels=1_003_520))
    assert w * h <= 1_003_520 and w % 28 == 0 and abs(w / h - 4 / 3) < 0.05


def test_same_numbers_mean_different_boxes_per_convention():
    """Seed defect 9: the convention is a setting, not guessed from the numbers."""
    a = parse_bbox("[10, 20, 30, 40]", "rel1000", (640, 480)).box
    b = parse_bbox("[10, 20, 30, 40]", "abs_resized", (640, 480)).box
    assert a != pytest.approx(b)


@pytest.mark.parametrize(
    "text,coords,kind",
    [
        ("I cannot find it.", "rel1000", "no_json"),
        ("", "rel1000", "no_json"),
        (None, "rel1000", "no_json"),
        ('{"answer": "the man"}', "rel1000", "no_json"),
        ("the box is 10, 20, 30, 40", "rel1000", "no_json"),  # bare numbers are not an answer
        ('{"bbox_2d": [10, 20, 30]}', "rel1000", "too_few_numbers"),
        ('{"bbox_2d": []}', "rel1000", "too_few_numbers"),
        ('{"bbox_2d": [300, 20, 100, 40]}', "rel1000", "degenerate_box"),
        ('{"bbox_2d": [10, 40, 30, 40]}', "rel1000", "degenerate_box"),
        ('{"bbox_2d": [10, 20, 1030, 40]}', "rel1000", "out_of_range"),
        ('{"bbox_2d": [-5, 20, 100, 40]}', "rel1000", "out_of_range"),
        ('{"bbox_2d": [0.1, 0.2, 1.3, 0.4]}', "norm1", "out_of_range"),
        ('{"bbox_2d": [10, 20, 700, 40]}', "abs_resized", "out_of_range"),  # 644 px wide input
    ],
)
def test_failure_kinds(text, coords, kind):
    r = parse_bbox(text, coords, (640, 480))
    assert not r.ok and r.box is None and r.failure == kind and kind in FAILURE_KINDS
    assert r.status == "parse_failed"


def test_truncated_json_still_has_a_box_key():
    r = parse_bbox('{"bbox_2d": [100, 200, 300, 400], "label": "dog', "rel1000", (10, 10))
    assert r.box == pytest.approx((0.1, 0.2, 0.3, 0.4))


def test_first_box_wins_and_extra_numbers_ignored():
    text = '[{"bbox_2d": [1, 2, 3, 4, 5]}, {"bbox_2d": [500, 500, 600, 600]}]'
    assert parse_bbox(text, "rel1000", (10, 10)).box == pytest.approx((0.001, 0.002, 0.003, 0.004))


def test_bad_arguments():
    with pytest.raises(ValueError, match="coordinate convention"):
        parse_bbox("[1,2,3,4]", "abs", (10, 10))
    with pytest.raises(ValueError, match="image_size"):
        parse_bbox("[1,2,3,4]", "rel1000", (0, 10))


def test_seed_prompt():
    expression = "guy in plaid"
    seed = f'Where is "{expression}" in this image? Output the bounding box in format: {{"bbox_2d": [x_min, y_min, x_max, y_max]}} using coordinates 0-1000.'
    assert build_prompt(QWEN3_PROMPT, expression) == seed
    with pytest.raises(ValueError, match="expression"):
        build_prompt("Find it.", expression)

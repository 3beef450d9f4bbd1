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


# ---------------------------------------------------------------- answers as real servers return them


def test_qwen3vl_fenced_list_of_labelled_boxes():
    # Qwen3-VL-235B's answer, published in QwenLM/Qwen3-VL issue #2020 ("The bounding box
    # coordinates can sometimes be significantly off", 2026-02-02), prompt
    # 'Please output bounding boxes for each instance of the following object: ["watch"]'
    text = (
        "```json\n[\n"
        '    {"bbox_2d": [323, 118, 444, 825], "label": "watch"},\n'
        '    {"bbox_2d": [444, 118, 565, 825], "label": "watch"},\n'
        '    {"bbox_2d": [565, 118, 686, 825], "label": "watch"},\n'
        '    {"bbox_2d": [686, 118, 807, 825], "label": "watch"}\n'
        "]\n```"
    )
    r = parse_bbox(text, "rel1000", (1380, 245), expression="watch")
    assert r.ok and r.n_boxes == 4 and r.choice == "label_match"
    assert r.box == pytest.approx((0.323, 0.118, 0.444, 0.825))
    # the issue page shows the fence opened as "```" then "json" on its own line: same box
    alt = text.replace("```json\n", "```\njson\n")
    assert parse_bbox(alt, "rel1000", (1380, 245)).box == r.box


def test_label_matching_the_expression_wins_else_the_first():
    # the cookbook list layout of QwenLM/Qwen3-VL issue #2020 with two different labels
    text = (
        "Here are the objects you asked for:\n```json\n[\n"
        '\t{"bbox_2d": [10, 20, 110, 220], "label": "man in red"},\n'
        '\t{"bbox_2d": [500, 500, 900, 950], "label": "Woman on the left."}\n'
        "]\n```\nLet me know if you need anything else."
    )
    r = parse_bbox(text, "rel1000", (640, 480), expression="woman on the left")
    assert (r.choice, r.n_boxes) == ("label_match", 2)
    assert r.box == pytest.approx((0.5, 0.5, 0.9, 0.95))
    r = parse_bbox(text, "rel1000", (640, 480), expression="the dog")
    assert (r.choice, r.n_boxes) == ("first", 2)
    assert r.box == pytest.approx((0.01, 0.02, 0.11, 0.22))
    assert parse_bbox(text, "rel1000", (640, 480)).choice == "first"  # no expression given


def test_qwen25vl_fenced_list_with_other_keys_in_pixels():
    # Qwen2.5-VL-32B (mlx 4-bit) answer to the OCR cookbook prompt, published in QwenLM/Qwen3-VL
    # issue #1030 ("OCR Cookbook BBox Issues With Api/Local qwen2.5-vl-32b-instruct"); no label key
    text = (
        "```json\n[\n"
        '        {"bbox_2d": [50, 117, 346, 168], "text_content": "AuntieAnne\'s"},\n'
        '        {"bbox_2d": [50, 248, 163, 270], "text_content": "CINNAMON SUGAR"}\n'
        "]\n```"
    )
    r = parse_bbox(text, "abs_resized", (400, 600), expression="AuntieAnne's")
    assert (r.n_boxes, r.choice) == (2, "first")
    w, h = smart_resize(400, 600)
    assert r.box == pytest.approx((50 / w, 117 / h, 346 / w, 168 / h))


def test_qwen25vl_single_object_answer():
    # the Qwen2.5-VL grounding answer layout of QwenLM/Qwen3-VL issue #1137 ("Qwen2.5-VL Grounding
    # Example for muliple bbox"): '{\n"bbox_2d": [135, 114, 1016, 672]\n}' in pixels of the
    # processor's input; COCO_train2014_000000580957.jpg is 1333 x 1000 (non-square, wider than 1000)
    text = '{\n"bbox_2d": [135, 114, 1016, 672]\n}'
    w, h = smart_resize(1333, 1000)
    assert (w, h) == (1344, 1008)  # 1333/28 = 47.6 -> 48 x 28; 1000/28 = 35.7 -> 36 x 28
    r = parse_bbox(text, "abs_resized", (1333, 1000))
    assert r.ok and (r.n_boxes, r.choice) == (1, "only")
    assert r.box == pytest.approx((135 / 1344, 114 / 1008, 1016 / 1344, 672 / 1008))
    # the same numbers read as Qwen3-VL's 0-1000 convention are out of range (1016 > 1000)
    assert parse_bbox(text, "rel1000", (1333, 1000)).failure == "out_of_range"


def test_smart_resize_on_a_non_square_image_maps_each_axis_with_its_own_scale():
    """Qwen2.5-VL's rule (qwen-vl-utils smart_resize, quoted in hiyouga/LlamaFactory issue #7690):
    round each side to a multiple of 28, then rescale both sides into [min_pixels, max_pixels]."""
    # 1920 x 1080 -> 1932 x 1092 at the default limits (the example of LlamaFactory issue #7690)
    assert smart_resize(1920, 1080) == (1932, 1092)
    # a tall image under a small max_pixels: both sides shrink by the same beta, floored to 28
    spec = SmartResize(max_pixels=200_704)  # 256 patches of 28 x 28
    w, h = smart_resize(300, 900, spec)
    assert w * h <= 200_704 and w % 28 == 0 and h % 28 == 0
    # 308 x 896 > max; beta = sqrt(300 * 900 / 200704) = 1.16: 300/1.16/28 -> 9, 900/1.16/28 -> 27
    assert (w, h) == (252, 756)
    # the model's full-input box is the whole image; its centre pixel is the image centre
    full = parse_bbox(f'{{"bbox_2d": [0, 0, {w}, {h}]}}', "abs_resized", (300, 900), resize=spec)
    assert full.box == pytest.approx((0.0, 0.0, 1.0, 1.0))
    r = parse_bbox('{"bbox_2d": [63, 189, 189, 567]}', "abs_resized", (300, 900), resize=spec)
    assert r.to_pixels((300, 900)) == pytest.approx((75.0, 225.0, 225.0, 675.0))
    # a 640 x 427 image (RefCOCO-like): 644 x 420, so x is scaled down and y up, each on its own
    assert smart_resize(640, 427) == (644, 420)
    r = parse_bbox('{"bbox_2d": [322, 210, 644, 420]}', "abs_resized", (640, 427))
    assert r.to_pixels((640, 427)) == pytest.approx((320.0, 213.5, 640.0, 427.0))


def test_think_block_before_the_answer():
    # Qwen3-VL-*-Thinking writes its reasoning in <think>...</think> before the answer (served by
    # vLLM without --reasoning-parser, or llama.cpp with --reasoning-format none); a box drafted in
    # the reasoning is not the answer
    text = (
        "<think>\nThe user asks for the man in red. There is one at about [100, 100, 200, 200]... no,"
        ' that is a sign. {"bbox_2d": [1, 2, 3, 4]}\n</think>\n\n'
        '```json\n[{"bbox_2d": [320, 140, 610, 980], "label": "man in red"}]\n```'
    )
    r = parse_bbox(text, "rel1000", (640, 480), expression="man in red")
    assert r.ok and r.thinking and r.box == pytest.approx((0.32, 0.14, 0.61, 0.98))


def test_lone_closing_think_tag_from_vllm():
    # vLLM serving Qwen3-VL-8B-Thinking: the answer lacks the opening <think>, which sits in the chat
    # template (QwenLM/Qwen3-VL issue #1750, "vllm部署Qwen3_VL-8B-thinking无<think>标签"; also
    # issue #1504 for Qwen3-VL-235B-Thinking)
    text = 'The object is the red mug near the edge.\n</think>\n\n{"bbox_2d": [100, 250, 300, 500]}'
    r = parse_bbox(text, "rel1000", (640, 480))
    assert r.ok and r.thinking and r.box == pytest.approx((0.1, 0.25, 0.3, 0.5))


def test_unfinished_thinking_is_a_named_failure():
    # cut off (max_tokens) while reasoning: no answer, not IoU 0
    r = parse_bbox(
        '<think>\nLet me look at the image. The box could be {"bbox_2d": [1, 2', "rel1000", (64, 64)
    )
    assert not r.ok and r.failure == "unfinished_thinking" and r.box is None


def test_ollama_thinking_field():
    # Ollama /api/chat with think=true returns the reasoning in message.thinking and the answer in
    # message.content (docs.ollama.com/capabilities/thinking; ollama.com/blog/thinking)
    msg = {
        "role": "assistant",
        "content": '{"bbox_2d": [250, 300, 750, 900], "label": "the cat"}',
        "thinking": 'The cat sits in the middle; roughly {"bbox_2d": [0, 0, 10, 10]} at first glance.',
    }
    for answer in (msg, {"model": "qwen3-vl:8b", "message": msg, "done": True}):
        r = parse_bbox(answer, "rel1000", (640, 480))
        assert r.ok and r.thinking and r.box == pytest.approx((0.25, 0.3, 0.75, 0.9))
    # the same reply as stored JSON text, and /api/generate's {"response", "thinking"}
    import json

    assert parse_bbox(json.dumps({"message": msg}), "rel1000", (640, 480)).box == pytest.approx(
        (0.25, 0.3, 0.75, 0.9)
    )
    gen = {"response": msg["content"], "thinking": msg["thinking"], "done": True}
    assert parse_bbox(gen, "rel1000", (640, 480)).ok
    # the content given as text with the field passed beside
    r = parse_bbox(msg["content"], "rel1000", (640, 480), thinking=msg["thinking"])
    assert r.ok and r.thinking


def test_ollama_answer_only_in_thinking_is_a_named_failure():
    # with image inputs some Qwen models on Ollama route everything to message.thinking and leave
    # message.content empty (ollama/ollama issue #14716): no answer, recorded as thinking_only
    msg = {"role": "assistant", "content": "", "thinking": '... so the box is {"bbox_2d": [1, 2, 30, 40]}'}
    r = parse_bbox(msg, "rel1000", (64, 64))
    assert not r.ok and r.failure == "thinking_only" and r.box is None
    assert parse_bbox("", "rel1000", (64, 64), thinking="reasoning").failure == "thinking_only"


def test_prose_only_and_refusals_stay_failures():
    # a model's refusal through any server: no box, never [0, 0, 0, 0]
    for text in (
        "I'm sorry, I can't find a \"zebra\" in this image.",
        "```json\n[]\n```",
        "<think>x</think>\n",
    ):
        r = parse_bbox(text, "rel1000", (64, 64))
        assert not r.ok and r.box is None and r.failure in FAILURE_KINDS

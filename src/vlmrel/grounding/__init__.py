"""The grounding chain's library (seeds 000, 001): data, perturbations, parsing, IoU, thresholds, drift.

Public entry points::

    parse_bbox(text, coords, image_size) -> ParsedBox      # box normalised to [0, 1], or failure kind
    optimal_thresholds(iou, signal, k=3, n_bins=20) -> (thresholds, mi)   # exact MI optimum (nats)

Importing this package loads no torch/transformers (those load inside the drift embedder).
"""

from vlmrel.grounding.parse import (
    COORDS,
    FAILURE_KINDS,
    QWEN3_PROMPT,
    ParsedBox,
    SmartResize,
    build_prompt,
    parse_bbox,
    smart_resize,
)
from vlmrel.grounding.thresholds import (
    BASELINE_THRESHOLDS,
    brute_force_thresholds,
    iou_to_class,
    lbfgsb_thresholds,
    mutual_information,
    optimal_thresholds,
)

__all__ = [
    "BASELINE_THRESHOLDS",
    "COORDS",
    "FAILURE_KINDS",
    "ParsedBox",
    "QWEN3_PROMPT",
    "SmartResize",
    "brute_force_thresholds",
    "build_prompt",
    "iou_to_class",
    "lbfgsb_thresholds",
    "mutual_information",
    "optimal_thresholds",
    "parse_bbox",
    "smart_resize",
]

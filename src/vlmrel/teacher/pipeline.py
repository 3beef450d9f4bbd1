"""One function per workflow step of the teacher chain: plain paths and values in, files out.

The workflow's ``scripts/teacher_*.py`` only unpack ``snakemake.input/params/output`` and
call these, so every step can also be run from a notebook. Every output is written
atomically.

manifest -> :func:`annotate` (``raw.jsonl``) -> :func:`ground_truth` -> :func:`human_sample`
(+ Label Studio tasks) -> [:func:`audited_truth`]; embeddings -> :func:`heads` ->
:func:`predict` -> :func:`evaluate` -> :func:`figures`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("vlmrel.teacher")
PathLike = str | os.PathLike[str]


def annotate(
    manifest: PathLike,
    root: PathLike,
    vlm_view: Mapping[str, Any],
    vlm_section: Mapping[str, Any] | None,
    raw: PathLike,
    stats: PathLike,
) -> dict[str, Any]:
    """``raw.jsonl``: the VLM's annotation or recorded failure per accepted image.

    ``vlm_view`` is the redacted ``vlm:`` section the rule's params carry, ``vlm_section``
    the config's full one, read at run time (:func:`vlmrel.vlm.runtime_section`), so no
    endpoint secret is a param. Raises :class:`vlmrel.vlm.VLMOutage` when more than
    ``vlm.max_failure_share`` of the requests failed.
    """
    from vlmrel.vlm.config import runtime_section

    from .annotate import annotate as run

    return run(manifest, root, runtime_section(vlm_view, vlm_section), raw, stats_path=stats)


def ground_truth(raw: PathLike, truth: PathLike, stats: PathLike, mapping: Mapping[str, Any]) -> dict:
    """``ground_truth_auto.jsonl`` from the successful annotations (seed 004's rules)."""
    from .truth import build_ground_truth

    return build_ground_truth(raw, truth, stats, mapping)


def human_sample(
    truth: PathLike,
    manifest: PathLike,
    sample: PathLike,
    tasks: PathLike,
    label_config: PathLike,
    *,
    size: int,
    seed: int,
    image_url_prefix: str,
    mapping: Mapping[str, Any],
) -> int:
    """The seeded review sample, its Label Studio tasks (pre-annotated) and labelling config."""
    from .labelstudio import export_tasks
    from .truth import TruthMapping, write_human_sample

    write_human_sample(truth, sample, size, seed)
    n = export_tasks(sample, manifest, tasks, label_config, TruthMapping.from_dict(mapping), image_url_prefix)
    log.info("Label Studio: %d tasks", n)
    return n


def audited_truth(source: PathLike, out: PathLike, mapping: Mapping[str, Any]) -> None:
    """Import the audited human truth (a Label Studio export or a ground-truth file)."""
    from .labelstudio import load_audited
    from .truth import TruthMapping

    load_audited(source, out, TruthMapping.from_dict(mapping))


def heads(
    embeddings: PathLike,
    truth: PathLike,
    heads_out: PathLike,
    card: PathLike,
    *,
    mapping: Mapping[str, Any],
    heads_cfg: Mapping[str, Any],
    seed: int,
    model: str,
    threads: int | None = None,
) -> Any:
    """Scene, attribute and object heads on the embeddings against the auto truth."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from .heads import train_heads_files

    return train_heads_files(
        embeddings, truth, heads_out, card, mapping, {**heads_cfg, "seed": seed}, model=model
    )


def predict(embeddings: PathLike, heads_in: PathLike, card: PathLike, out: PathLike) -> int:
    """The heads' predictions for every embedded image."""
    from .heads import write_predictions

    n = write_predictions(embeddings, heads_in, card, out)
    log.info("predictions for %d images", n)
    return n


def evaluate(predictions: PathLike, truth: PathLike, truth_kind: str, card: PathLike, out: PathLike) -> Any:
    """``eval.json``: against the audited human truth, or the auto truth (and it says which)."""
    from .evaluate import evaluate as run

    return run(predictions, truth, truth_kind, card, out)


def figures(eval_json: PathLike, confusion: PathLike, attributes: PathLike, dpi: int) -> None:
    """The scene confusion matrix and the per-attribute precision/recall/F1 bars."""
    from vlmrel.io import read_json

    from .figures import attribute_figure, confusion_figure

    ev = read_json(eval_json)
    confusion_figure(ev, confusion, dpi)
    attribute_figure(ev, attributes, dpi)

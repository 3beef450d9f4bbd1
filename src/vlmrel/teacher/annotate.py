"""Annotate every accepted image of the manifest with the VLM: ``raw.jsonl``.

One request per image: seed 004's JSON-only prompt (:func:`vlmrel.teacher.schema.annotation_prompt`)
and schema (:data:`vlmrel.teacher.schema.ANNOTATION_SCHEMA`), through :func:`vlmrel.vlm.run_requests`,
so requests run concurrently with retries, every finished answer is committed to the
persistent response cache at once (a killed job loses only requests in flight, a re-run
sends only what is missing) and the API key never leaves the environment.

Each line of ``raw.jsonl`` (manifest order) is either::

    {"image_id": ..., "rel_path": ..., "status": "ok", "annotation": {...validated...}}
    {"image_id": ..., "rel_path": ..., "status": "failed", "failure": {"kind": ..., "error": ...}}

Only what the answer says goes in: no timings, cache flags or endpoints, so a resumed
run writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from vlmrel import vlm
from vlmrel.images import read_manifest

from .schema import ANNOTATION_SCHEMA, annotation_prompt
from .truth import write_jsonl

log = logging.getLogger(__name__)


def build_requests(manifest: str | os.PathLike[str], root: str | os.PathLike[str]) -> list[vlm.Request]:
    """One annotation request per accepted image, in manifest order."""
    df = read_manifest(manifest)
    root = Path(root)
    prompt = annotation_prompt()
    return [
        vlm.Request(
            prompt=prompt,
            image=root / row.rel_path,
            schema=ANNOTATION_SCHEMA,
            meta={"image_id": row.image_id, "rel_path": row.rel_path},
        )
        for row in df.itertuples()
    ]


def result_record(res: vlm.Result) -> dict[str, Any]:
    """The raw.jsonl line of one result: the annotation or the recorded failure."""
    rec: dict[str, Any] = {"image_id": res.meta["image_id"], "rel_path": res.meta["rel_path"]}
    if res.ok:
        rec["status"] = "ok"
        rec["annotation"] = res.parsed
    else:
        rec["status"] = "failed"
        rec["failure"] = {"kind": res.failure_kind or "error", "error": res.error}
    return rec


def annotate(
    manifest: str | os.PathLike[str],
    root: str | os.PathLike[str],
    vlm_config: dict[str, Any] | vlm.VLMConfig,
    out_path: str | os.PathLike[str],
    stats_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Annotate the manifest's images; write ``raw.jsonl`` atomically; return a summary."""
    cfg = vlm_config if isinstance(vlm_config, vlm.VLMConfig) else vlm.VLMConfig.from_dict(vlm_config)
    reqs = build_requests(manifest, root)
    log.info(
        "annotating %d images with %s %s (config %s)", len(reqs), cfg.backend, cfg.model, cfg.fingerprint()
    )
    results = vlm.run_requests(cfg, reqs, stats_path=stats_path, progress=progress)
    records = [result_record(r) for r in results]
    write_jsonl(out_path, records)
    failures = Counter(r["failure"]["kind"] for r in records if r["status"] != "ok")
    summary = {
        "n_images": len(records),
        "n_ok": len(records) - sum(failures.values()),
        "failures_by_kind": dict(sorted(failures.items())),
    }
    log.info("raw annotations: %s", summary)
    return summary

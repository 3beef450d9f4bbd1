"""The grounding chain's steps, one function per workflow job (the scripts only wire them).

    demo data ─► subset ─► grid ─► predictions.parquet ─► ious.parquet ─┬─► thresholds.json ─► boundary.json ─► figures
                                                    └─► drift.parquet ──┘

* :func:`prepare_demo`: generated scenes in the RefCOCO parquet layout, plus PNGs and a simulator
  metadata file with their true boxes (so the HTTP simulator can answer; it is not a model).
* :func:`make_subset`: a seeded subset stratified by difficulty (box-area fraction), saved as
  dataset indices with each sample's expression, box and difficulty, so a subset is named and reused.
* :func:`write_grid`: the perturbation grid (id, family, params, magnitude) as TSV.
* :func:`predict`: every (sample, perturbation) request through the VLM client layer (cached,
  concurrent, retried), parsed with :func:`~vlmrel.grounding.parse.parse_bbox`; failures are rows with
  a failure kind and no box (never IoU 0). Samples go in chunks, so memory stays bounded and
  a killed job loses only requests in flight (the client's cache keeps the rest).
* :func:`compute_ious`, :func:`compute_drift`, :func:`compute_thresholds`, :func:`compute_boundary`,
  :func:`make_figures`: the analysis of :mod:`vlmrel.grounding.analysis`.

With a threshold subset (config ``grounding.threshold_subset``), the chain runs on both subsets;
the validation subset is selected apart from the threshold subset (``make_subset(exclude_file=)``)
and :func:`compute_boundary` classifies it with the threshold subset's ``thresholds.json``
(out-of-sample), its own optimum's rates beside; geometric and semantic boundary samples, their
overlap and the seeds' checks go into ``boundary.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from vlmrel.grounding.analysis import (
    PREDICTION_COLUMNS,
    SIGNALS,
    Matrices,
    _row_nanmean,
    _spearman,
    arrange,
    boundary_report,
    prediction_row,
    read_predictions,
    signals,
    thresholds_report,
)
from vlmrel.grounding.data import (
    RefSample,
    difficulty,
    load_classic,
    load_parquet,
    read_subset,
    select_subset,
    write_demo_parquet,
    write_subset,
)
from vlmrel.grounding.parse import COORDS, SmartResize, build_prompt, parse_bbox
from vlmrel.grounding.perturb import ORIGINAL_ID, Perturbation, apply_perturbation, build_grid, grid_table
from vlmrel.grounding.thresholds import BASELINE_THRESHOLDS
from vlmrel.io import atomic_path, read_json, write_json

log = logging.getLogger("vlmrel.grounding")

IOU_COLUMNS = (
    "sample_id",
    "perturbation_id",
    "difficulty",
    "area_fraction",
    "magnitude",
    "iou",  # NaN for a failed request: never 0
    "iou_original",
    "iou_drop",
    "status",
    "failure_kind",
)


# ------------------------------------------------------------------------------------- data


def load_samples(data_cfg: Mapping, demo_parquet: str | None = None, *, indices=None, keep_images=True):
    """Samples of the configured source (``grounding.data``): demo, parquet or classic."""
    source = data_cfg["source"]
    if source == "demo":
        if demo_parquet is None:
            raise ValueError("grounding.data.source=demo needs the generated demo parquet")
        return load_parquet(demo_parquet, indices=indices, keep_images=keep_images)
    if source == "parquet":
        pc = data_cfg["parquet"]
        if not pc.get("path"):
            raise ValueError("grounding.data.parquet.path: not set (the RefCOCO parquet file or folder)")
        return load_parquet(
            pc["path"],
            columns=pc.get("columns") or None,
            bbox_format=pc.get("bbox_format", "xywh"),
            indices=indices,
            keep_images=keep_images,
        )
    if source == "classic":
        cc = data_cfg["classic"]
        for key in ("refs", "instances", "images"):
            if not cc.get(key):
                raise ValueError(f"grounding.data.classic.{key}: not set")
        samples = load_classic(cc["refs"], cc["instances"], cc["images"], split=cc.get("split", "val"))
        if indices is not None:
            wanted = set(int(i) for i in indices)
            samples = [s for s in samples if s.index in wanted]
        return samples
    raise ValueError(f"grounding.data.source: unknown source {source!r} (demo, parquet or classic)")


def prepare_demo(parquet_path: str, sim_dir: str, n: int, seed: int, size: Sequence[int]) -> None:
    """Generated scenes as parquet, plus their PNGs and a simulator metadata file (boxes in 0-1000)."""
    from vlmrel.vlm.simulator import write_metadata

    write_demo_parquet(parquet_path, n, seed, (int(size[0]), int(size[1])))
    out = Path(sim_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for s in load_parquet(parquet_path):
        name = f"{s.sample_id}.png"
        with atomic_path(out / name) as tmp:
            s.image().save(tmp, format="PNG")
        box = [round(1000.0 * v, 3) for v in s.bbox_norm]
        images.append({"id": s.sample_id, "path": name, "boxes": {e: box for e in s.expressions}})
    write_metadata(out / "metadata.json", images)
    log.info("demo: %d scenes, simulator metadata %s", len(images), out / "metadata.json")


def sample_record(s: RefSample, thresholds: Sequence[float], expression_index: int = 0) -> dict:
    """What later steps need of a sample without reading the dataset: expression, box, difficulty."""
    expr = s.expressions[min(int(expression_index), len(s.expressions) - 1)]
    return {
        "index": s.index,
        "sample_id": s.sample_id,
        "expression": expr,
        "bbox_norm": [float(v) for v in s.bbox_norm],
        "width": s.width,
        "height": s.height,
        "area_fraction": s.area_fraction,
        "difficulty": difficulty(s.area_fraction, thresholds),
    }


def make_subset(
    samples: Sequence[RefSample],
    out_path: str,
    *,
    name: str,
    n: int,
    seed: int,
    allocation: str,
    thresholds: Sequence[float],
    expression_index: int = 0,
    indices_file: str | None = None,
    exclude_file: str | None = None,
) -> dict:
    """Select (or reuse from ``indices_file``) a subset and save it as indices plus per-sample records.

    ``exclude_file`` (another subset, e.g. the threshold subset) holds samples this one must not
    share: a selection leaves them out before drawing; a reused subset that overlaps it is an error.
    """
    pos_of = {s.index: p for p, s in enumerate(samples)}
    excluded = set(read_subset(exclude_file)) if exclude_file else set()
    if indices_file:
        idx = read_subset(indices_file)
        missing = [i for i in idx if i not in pos_of]
        if missing:
            raise ValueError(
                f"{indices_file}: indices {missing[:10]} are not in the dataset ({len(samples)} samples)"
            )
        shared = sorted(set(idx) & excluded)
        if shared:
            raise ValueError(
                f"subset {name}: {len(shared)} of its indices from {indices_file} are also in "
                f"{exclude_file} (e.g. {shared[:10]}); the threshold and validation subsets must be disjoint"
            )
        positions = sorted(pos_of[i] for i in idx)
        how = f"indices from {indices_file}"
    else:
        free = [p for p, s in enumerate(samples) if s.index not in excluded]
        diffs = [difficulty(samples[p].area_fraction, thresholds) for p in free]
        positions = sorted(free[q] for q in select_subset(diffs, n, seed, allocation=allocation))
        how = f"seeded stratified selection (seed {seed}, {allocation} allocation)"
        if excluded:
            how += f", from the {len(free)} samples not in {Path(exclude_file).name}"
    records = [sample_record(samples[p], thresholds, expression_index) for p in positions]
    counts = {d: sum(r["difficulty"] == d for r in records) for d in ("easy", "medium", "hard")}
    write_subset(
        out_path,
        name,
        samples,
        positions,
        selection=how,
        difficulty_thresholds=[float(t) for t in thresholds],
        difficulty_counts=counts,
        dataset_size=len(samples),
        sample_records=records,
        disjoint_from=Path(exclude_file).stem if exclude_file else None,
    )
    log.info("subset %s: %d samples %s (%s)", name, len(records), counts, how)
    return read_json(out_path)


# ------------------------------------------------------------------------------------- grid


def write_grid(cfg: Mapping, path: str) -> list[Perturbation]:
    """The perturbation grid of ``grounding.perturbations`` as TSV (id, family, params, magnitude)."""
    import pandas as pd

    grid = build_grid(cfg)
    if not grid:
        raise ValueError("grounding.perturbations: the grid is empty")
    names = sorted({str(p.params["corruption"]) for p in grid if p.family == "corruption"})
    if names:
        from vlmrel.grounding.perturb import available_corruptions

        usable = available_corruptions()
        bad = [n for n in names if n not in usable]
        if bad:
            raise ValueError(
                f"grounding.perturbations.corruptions: {bad} cannot be used; choose from {usable}"
            )
    with atomic_path(path) as tmp:
        pd.DataFrame(grid_table(grid)).to_csv(tmp, sep="\t", index=False)
    log.info("grid: %d perturbations", len(grid))
    return grid


def read_grid(path: str) -> list[Perturbation]:
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype={"id": str, "family": str, "params": str})
    grid = [Perturbation(f, json.loads(p)) for f, p in zip(df["family"], df["params"], strict=True)]
    bad = [(p.id, i) for p, i in zip(grid, df["id"], strict=True) if p.id != i]
    if bad:
        raise ValueError(f"{path}: ids do not match their parameters: {bad[:3]}")
    return grid


# -------------------------------------------------------------------------------- predictions


def resolve_coords(coords_cfg: Mapping, model: str) -> str:
    """The coordinate convention of ``model``: ``by_model[model]`` or ``default``."""
    c = (coords_cfg.get("by_model") or {}).get(model, coords_cfg.get("default", "rel1000"))
    if c not in COORDS:
        raise ValueError(f"grounding.coords for model {model!r}: {c!r} is not one of {COORDS}")
    return c


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), max(1, n)):
        yield seq[i : i + n]


def _merge_stats(total: dict, part: dict) -> dict:
    for key in ("items", "cache_hits", "duplicates", "sent", "requests", "ok", "failed", "retries"):
        total[key] = total.get(key, 0) + int(part.get(key, 0) or 0)
    for key in ("failures_by_kind", "attempt_errors_by_kind"):
        acc = total.setdefault(key, {})
        for k, v in (part.get(key) or {}).items():
            acc[k] = acc.get(k, 0) + int(v)
    total["wall_s"] = total.get("wall_s", 0.0) + float(part.get("wall_s") or 0.0)
    for k in ("backend", "model", "concurrency_per_endpoint"):
        if k in part:
            total[k] = part[k]
    return total


def predict(
    *,
    dataset: Sequence[RefSample],
    subset: Mapping,
    grid: Sequence[Perturbation],
    vlm_cfg: Mapping,
    prompt: str,
    coords: str,
    use_schema: bool,
    seed: int,
    out_path: str,
    stats_path: str,
    sim_metadata: Sequence[str] = (),
    chunk_samples: int = 16,
    smart_resize: Mapping | None = None,
    progress: bool = True,
) -> None:
    """Ask the VLM for every (sample, original + perturbation) and write ``predictions.parquet``."""
    import pandas as pd

    from vlmrel import vlm

    cfg = vlm.VLMConfig.from_dict(dict(vlm_cfg))
    if cfg.simulator.enabled and sim_metadata:
        cfg = cfg.with_sim_metadata(*sim_metadata)
    resize = SmartResize(**smart_resize) if smart_resize else None
    by_index = {s.index: s for s in dataset}
    records = subset["sample_records"]
    missing = [r["index"] for r in records if r["index"] not in by_index]
    if missing:
        raise ValueError(f"subset {subset['name']}: dataset rows {missing[:10]} not found")
    schema = vlm.GROUNDING_SCHEMA if use_schema else None
    columns = [ORIGINAL_ID, *grid]
    rows: list[dict] = []
    stats: dict = {"chunks": 0}
    n_chunks = (len(records) + chunk_samples - 1) // max(1, chunk_samples)
    for c, chunk in enumerate(_chunks(records, chunk_samples)):
        reqs, sizes = [], []
        slots: list[int | dict] = []  # a request's index, or a row already failed here (no request)
        for rec in chunk:
            s = by_index[rec["index"]]
            if s.sample_id != rec["sample_id"]:
                raise ValueError(
                    f"subset {subset['name']}: row {rec['index']} is {s.sample_id!r} in the dataset "
                    f"but {rec['sample_id']!r} in the subset file (was the dataset changed?)"
                )
            text = build_prompt(prompt, rec["expression"])
            try:
                base, base_error = s.image(), None
            except ValueError as exc:  # an unreadable image fails its requests, not the run
                base, base_error = None, str(exc)
                log.error("%s", exc)
            for p in columns:
                pid = ORIGINAL_ID if p == ORIGINAL_ID else p.id
                params = {} if p == ORIGINAL_ID else dict(p.params)
                kind, error = ("image_error", base_error) if base is None else (None, None)
                if base is not None:
                    try:
                        img = (
                            base
                            if p == ORIGINAL_ID
                            else apply_perturbation(base, p, sample_id=s.sample_id, seed=seed)
                        )
                        enc = vlm.encode_image(img, cfg.image)
                    except (ValueError, RuntimeError, OSError, vlm.ImageError) as exc:
                        kind, error = "perturbation_error", f"{s.sample_id} {pid}: {exc}"
                        log.error("%s", error)
                if kind is not None:
                    row = prediction_row(s.sample_id, pid, params, None, None, kind, 0.0, False)
                    slots.append(row | {"error": error, "attempts": 0})
                    continue
                slots.append(len(reqs))
                reqs.append(
                    vlm.Request(
                        prompt=text,
                        image=enc,
                        schema=schema,
                        meta={"s": s.sample_id, "p": pid, "params": params, "e": rec["expression"]},
                    )
                )
                sizes.append((enc.width, enc.height))
        log.info("chunk %d/%d: %d samples, %d requests", c + 1, n_chunks, len(chunk), len(reqs))
        part_stats = Path(stats_path).with_suffix(".part.json")
        results = vlm.run_requests(cfg, reqs, stats_path=part_stats, progress=progress) if reqs else []
        if part_stats.exists():
            _merge_stats(stats, read_json(part_stats))
            part_stats.unlink()
        stats["chunks"] += 1
        for slot in slots:
            if isinstance(slot, dict):
                rows.append(slot)
                continue
            res, size = results[slot], sizes[slot]
            m = res.meta
            box, kind, n_boxes = None, None, 0
            if res.ok:
                parsed = parse_bbox(res.text, coords, size, resize=resize, expression=m.get("e"))
                box, kind, n_boxes = parsed.box, parsed.failure, parsed.n_boxes
            else:
                kind = res.failure_kind or "error"
            row = prediction_row(
                m["s"], m["p"], m["params"], res.text, box, kind, res.latency_s or 0.0, res.cache_hit
            )
            row["error"] = res.error if not res.ok else (None if kind is None else f"parse: {kind}")
            row["attempts"] = int(res.attempts)
            row["n_boxes"] = int(n_boxes)
            rows.append(row)
    for row in rows:
        row.setdefault("n_boxes", 0)
    df = pd.DataFrame(rows, columns=[*PREDICTION_COLUMNS, "error", "attempts", "n_boxes"])
    with atomic_path(out_path) as tmp:
        df.to_parquet(tmp, index=False)
    n_fail = int((df["status"] != "ok").sum())
    stats.update(
        answers_with_several_boxes=int((df["n_boxes"] > 1).sum()),
        several_boxes_rule="the box whose label equals the expression, else the first",
        n_predictions=len(df),
        n_failed_predictions=n_fail,
        failed_predictions_by_kind=df.loc[df["status"] != "ok", "failure_kind"]
        .value_counts()
        .sort_index()
        .to_dict(),
        coords=coords,
        prompt=prompt,
    )
    write_json(stats_path, stats)
    log.info("predictions: %d rows, %d failed (%s)", len(df), n_fail, stats["failed_predictions_by_kind"])


# ------------------------------------------------------------------------------------- IoUs


def compute_ious(predictions: str, subset: Mapping, grid: Sequence[Perturbation], out_path: str) -> None:
    """``ious.parquet``: one row per prediction with its IoU (NaN for failures), difficulty, magnitude."""
    import pandas as pd

    df = read_predictions(predictions)
    recs = subset["sample_records"]
    gt = {r["sample_id"]: r["bbox_norm"] for r in recs}
    mat = arrange(df, gt, [p.id for p in grid])
    kinds = {
        (s, p): k for s, p, k in zip(df["sample_id"], df["perturbation_id"], df["failure_kind"], strict=True)
    }
    rows = []
    mags = [0.0, *(p.magnitude for p in grid)]
    pids = [ORIGINAL_ID, *(p.id for p in grid)]
    for i, r in enumerate(recs):
        ious = [mat.iou_original[i], *mat.iou_perturbed[i]]
        for pid, mag, v in zip(pids, mags, ious, strict=True):
            k = kinds[(r["sample_id"], pid)]
            rows.append(
                {
                    "sample_id": r["sample_id"],
                    "perturbation_id": pid,
                    "difficulty": r["difficulty"],
                    "area_fraction": r["area_fraction"],
                    "magnitude": float(mag),
                    "iou": float(v),
                    "iou_original": float(mat.iou_original[i]),
                    "iou_drop": float(mat.iou_original[i] - v),
                    "status": "ok" if np.isfinite(v) else "failed",
                    "failure_kind": None if k is None or (isinstance(k, float) and np.isnan(k)) else str(k),
                }
            )
    out = pd.DataFrame(rows, columns=list(IOU_COLUMNS))
    with atomic_path(out_path) as tmp:
        out.to_parquet(tmp, index=False)
    log.info("ious: %d rows, %d failures (NaN)", len(out), int(out["iou"].isna().sum()))


def read_ious(path: str) -> tuple[Matrices, list[str], np.ndarray]:
    """``ious.parquet`` back as :class:`Matrices` (no answers), difficulties and magnitudes."""
    import pandas as pd

    df = pd.read_parquet(path)
    sample_ids = list(dict.fromkeys(df["sample_id"]))
    pert = list(dict.fromkeys(p for p in df["perturbation_id"] if p != ORIGINAL_ID))
    cols = [ORIGINAL_ID, *pert]
    pos = {(s, p): i for i, (s, p) in enumerate(zip(df["sample_id"], df["perturbation_id"], strict=True))}
    iou = df["iou"].to_numpy(float)
    fk = df["failure_kind"].tolist()
    mag = df["magnitude"].to_numpy(float)
    n, m = len(sample_ids), len(cols)
    ious = np.full((n, m), np.nan)
    kinds: list[list[str | None]] = [[None] * m for _ in range(n)]
    for i, s in enumerate(sample_ids):
        for j, p in enumerate(cols):
            r = pos.get((s, p))
            if r is None:
                raise ValueError(f"{path}: no row for sample {s!r}, perturbation {p!r}")
            ious[i, j] = iou[r]
            kinds[i][j] = fk[r] if isinstance(fk[r], str) else None
    diff_of = dict(zip(df["sample_id"], df["difficulty"], strict=True))
    mags = np.array([mag[pos[(sample_ids[0], p)]] for p in pert]) if n else np.zeros(len(pert))
    mat = Matrices(
        sample_ids=sample_ids,
        perturbation_ids=pert,
        iou_original=ious[:, 0],
        iou_perturbed=ious[:, 1:],
        answer_original=[None] * n,
        answer_perturbed=[[None] * (m - 1) for _ in range(n)],
        failure_original=[row[0] for row in kinds],
        failure_perturbed=[row[1:] for row in kinds],
    )
    return mat, [diff_of[s] for s in sample_ids], mags


# ------------------------------------------------------------------------------------ drift


def compute_drift(
    predictions: str,
    subset: Mapping,
    grid: Sequence[Perturbation],
    out_path: str,
    summary_path: str,
    *,
    embedder_cfg: Mapping,
    text: str = "raw",
    vlm_cfg: Mapping | None = None,
    region: Mapping | None = None,
    dataset: Sequence[RefSample] | None = None,
    seed: int = 0,
) -> None:
    """``drift.parquet``: cosine distance between embeddings of the original and perturbed answers.

    With ``region = {enabled: true, model: ...}`` (and the ``dataset`` to rebuild the perturbed
    images, seeded as in :func:`predict`), a ``region_drift`` column holds the cosine distance between
    vision-encoder embeddings of the predicted regions (original vs perturbed image)."""
    import pandas as pd

    from vlmrel.grounding.drift import make_embedder, semantic_drift

    df = read_predictions(predictions)
    gt = {r["sample_id"]: r["bbox_norm"] for r in subset["sample_records"]}
    mat = arrange(df, gt, [p.id for p in grid])
    remote = None
    kind = embedder_cfg.get("kind", "minilm")
    if kind in ("ollama", "openai"):
        from vlmrel import vlm

        base = vlm.VLMConfig.from_dict(dict(vlm_cfg or {}))
        emb = {**base.to_dict()["embedding"], "backend": kind}
        if embedder_cfg.get("model"):
            emb["model"] = embedder_cfg["model"]
        cfg = base.replace(embedding=emb)

        def remote(texts: list[str]):
            vecs = vlm.embed(cfg, texts)
            bad = np.isnan(vecs).any(axis=1)
            if bad.any():
                log.warning(
                    "embedding failed for %d of %d texts; their drift is NaN", int(bad.sum()), len(texts)
                )
            return vecs

    embedder = make_embedder(embedder_cfg, remote=remote)
    # a failed request has no answer to compare, even when the server sent text (malformed JSON)
    orig = [None if f else a for a, f in zip(mat.answer_original, mat.failure_original, strict=True)]
    pert = [
        [None if f else a for a, f in zip(ra, rf, strict=True)]
        for ra, rf in zip(mat.answer_perturbed, mat.failure_perturbed, strict=True)
    ]
    d = semantic_drift(orig, pert, embedder, mode=text)
    rows = [
        {"sample_id": s, "perturbation_id": p, "semantic_drift": float(d[i, j])}
        for i, s in enumerate(mat.sample_ids)
        for j, p in enumerate(mat.perturbation_ids)
    ]
    columns = ["sample_id", "perturbation_id", "semantic_drift"]
    region_info = None
    if region and region.get("enabled"):
        rd, region_info = _region_drift(df, subset, grid, mat, region, dataset, seed)
        for row, v in zip(rows, rd.ravel(), strict=True):
            row["region_drift"] = float(v)
        columns.append("region_drift")
    out = pd.DataFrame(rows, columns=columns)
    with atomic_path(out_path) as tmp:
        out.to_parquet(tmp, index=False)
    n_answers = sum(a is not None for a in orig) + sum(a is not None for row in pert for a in row)
    write_json(
        summary_path,
        {
            "embedder": embedder.name,
            "text": text,
            "what": "cosine distance 1 - cos(u, v) between embeddings of the model's answers on the "
            "original and the perturbed image (not the question); NaN where either request failed",
            "n_pairs": int(d.size),
            "n_nan": int(np.isnan(d).sum()),
            "n_answers": int(n_answers),
            "n_texts_embedded": int(embedder.n_computed),
            "mean": float(np.nanmean(d)) if np.isfinite(d).any() else None,
            "region": region_info,
        },
    )
    log.info("drift: %d pairs, %d distinct texts embedded", d.size, embedder.n_computed)


def _region_drift(df, subset, grid, mat, region, dataset, seed) -> tuple[np.ndarray, dict]:
    """``[N, P]`` cosine distances between image embeddings of the predicted regions (NaN on failure)."""
    import torch

    from vlmrel.grounding.drift import region_drift
    from vlmrel.models import load_encoder, preprocess_spec
    from vlmrel.pixels import preprocess

    if dataset is None:
        raise ValueError("grounding.drift.region: the dataset is needed to rebuild the perturbed images")
    name = region.get("model", "tiny_clip")
    encoder = load_encoder(name, device=region.get("device", "cpu"))
    spec = preprocess_spec(name)

    def embed(crops: list) -> np.ndarray:
        out = []
        for start in range(0, len(crops), 64):
            x = np.stack([preprocess(c, spec) for c in crops[start : start + 64]])
            out.append(encoder.encode_image(torch.from_numpy(x)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, encoder.feature_dim))

    boxes = {(s, p): b for s, p, b in zip(df["sample_id"], df["perturbation_id"], df["box"], strict=True)}
    by_id = {s.sample_id: s for s in dataset}
    out = np.full(mat.iou_perturbed.shape, np.nan)
    for i, sid in enumerate(mat.sample_ids):
        base = by_id[sid].image()
        bo = boxes[(sid, ORIGINAL_ID)]
        pairs = []
        for p in grid:
            bp = boxes[(sid, p.id)]
            img = apply_perturbation(base, p, sample_id=sid, seed=seed)
            pairs.append((base, None if bo is None else list(bo), img, None if bp is None else list(bp)))
        out[i] = region_drift(pairs, embed)
    info = {
        "model": name,
        "what": "cosine distance between image-encoder embeddings of the predicted regions "
        "(original vs perturbed); NaN where either request failed",
        "n_nan": int(np.isnan(out).sum()),
        "mean": float(np.nanmean(out)) if np.isfinite(out).any() else None,
    }
    return out, info


def read_drift(path: str, mat: Matrices, column: str = "semantic_drift") -> np.ndarray | None:
    """A drift column of ``drift.parquet`` as ``[N, P]`` (None if the column is absent)."""
    import pandas as pd

    df = pd.read_parquet(path)
    if column not in df.columns:
        return None
    val = {(s, p): v for s, p, v in zip(df["sample_id"], df["perturbation_id"], df[column], strict=True)}
    out = np.full(mat.iou_perturbed.shape, np.nan)
    for i, s in enumerate(mat.sample_ids):
        for j, p in enumerate(mat.perturbation_ids):
            if (s, p) not in val:
                raise ValueError(f"{path}: no drift for sample {s!r}, perturbation {p!r}")
            out[i, j] = val[(s, p)]
    return out


# ------------------------------------------------------------------------- thresholds, boundary


def compute_thresholds(
    ious: str, drift: str | None, out_path: str, *, signal_names: Sequence[str], **kw
) -> None:
    """``thresholds.json``: per signal, the exact MI optimum beside the seed's L-BFGS-B and the baseline."""
    mat, _, mags = read_ious(ious)
    d = read_drift(drift, mat) if drift else None
    sig = signals(mat, mags, d)
    unknown = [s for s in signal_names if s not in SIGNALS]
    if unknown:
        raise ValueError(f"grounding.thresholds.signals: unknown {unknown}; choose from {list(SIGNALS)}")
    chosen = {s: sig[s] for s in signal_names if s in sig}
    report = thresholds_report(mat.iou_perturbed, chosen, **kw)
    report["n_samples"] = len(mat.sample_ids)
    report["n_perturbations"] = len(mat.perturbation_ids)
    report["signals_skipped"] = [s for s in signal_names if s not in sig]
    write_json(out_path, report)
    for name, e in report["signals"].items():
        if e.get("exact"):
            log.info(
                "%s: exact MI %.4f %s | L-BFGS-B %.4f | baseline %.4f",
                name,
                e["exact"]["mi"],
                e["exact"]["thresholds"],
                e["lbfgsb"]["mi"],
                e["baseline"]["mi"],
            )


def chosen_thresholds(thresholds_json: Mapping, source) -> tuple[list[float], str]:
    """The thresholds ``boundary.json`` classifies with: a signal's exact optimum, the baseline, or a list."""
    if isinstance(source, list | tuple):
        return [float(t) for t in source], "config list"
    if source == "baseline":
        return list(BASELINE_THRESHOLDS), "baseline [0.3, 0.5, 0.7]"
    entry = thresholds_json["signals"].get(source)
    if entry is None:
        raise ValueError(f"grounding.boundary.thresholds: signal {source!r} is not in thresholds.json")
    if not entry.get("exact"):
        log.warning("no valid pairs for %s: boundary samples use the baseline thresholds", source)
        return list(BASELINE_THRESHOLDS), f"baseline (no exact optimum for {source})"
    return [float(t) for t in entry["exact"]["thresholds"]], f"exact MI optimum for {source}"


def compute_boundary(
    ious: str,
    drift: str | None,
    thresholds: str,
    out_path: str,
    *,
    source,
    semantic_source="semantic_drift",
    own_thresholds: str | None = None,
    thresholds_subset: str | None = None,
    subset: str | None = None,
) -> None:
    """``boundary.json``: geometric (both definitions) and semantic boundary samples, their overlap,
    severity, rates by difficulty, failures, Spearman, and the seeds' checks as flags.

    ``thresholds`` is the ``thresholds.json`` the samples are classified with: this subset's own
    (in-sample) or that of the threshold subset ``thresholds_subset`` (out-of-sample); then
    ``own_thresholds`` (this subset's own ``thresholds.json``) adds the in-sample rates beside.
    """
    from vlmrel.grounding.analysis import boundary_overlap, seed_checks, semantic_boundary
    from vlmrel.grounding.thresholds import mutual_information

    mat, diffs, mags = read_ious(ious)
    d = read_drift(drift, mat) if drift else None
    tj = read_json(thresholds)
    ts, how = chosen_thresholds(tj, source)
    learned = isinstance(source, str) and source in SIGNALS  # else given (a config list, the baseline)
    out_of_sample = learned and bool(thresholds_subset) and thresholds_subset != subset
    if out_of_sample:
        how = f"{how}, chosen on subset {thresholds_subset}"
    report = boundary_report(mat, diffs, ts, thresholds_source=how, drift=d)
    report["subset"] = subset
    report["thresholds_subset"] = (thresholds_subset if out_of_sample else subset) if learned else None
    report["out_of_sample"] = out_of_sample
    report["thresholds_kind"] = (
        ("out-of-sample" if out_of_sample else "in-sample") if learned else "given (not learned)"
    )
    region = read_drift(drift, mat, "region_drift") if drift else None
    if region is not None:
        drop = mat.iou_original[:, None] - mat.iou_perturbed
        report["spearman_iou_drop_vs_region_drift"] = {
            "pairs": _spearman(drop, region),
            "sample_means": _spearman(_row_nanmean(drop), _row_nanmean(region)),
        }
    geometric = report["thresholds"]["boundary_000"]["samples"]
    if d is not None:
        try:
            ts_sem, how_sem = chosen_thresholds(tj, semantic_source)
        except ValueError as exc:
            log.warning("semantic boundary samples: %s", exc)
            report["semantic"] = {"note": str(exc)}
        else:
            if out_of_sample and isinstance(semantic_source, str) and semantic_source != "baseline":
                how_sem = f"{how_sem}, chosen on subset {thresholds_subset}"
            report["semantic"] = semantic_boundary(mat, diffs, d, ts_sem, how_sem)
            report["overlap"] = boundary_overlap(mat.sample_ids, geometric, report["semantic"]["samples"])
    else:
        report["semantic"] = {"note": "no semantic drift (grounding.drift.enabled is false)"}
    # MI gain of the chosen thresholds over the baseline on this subset's own pairs
    sig_name = source if isinstance(source, str) and source in SIGNALS else "perturbation_magnitude"
    sig = signals(mat, mags, d).get(sig_name)
    gain, detail = None, None
    if sig is not None:
        n_bins, binning = int(tj.get("n_bins", 20)), tj.get("binning", "width")
        mi_c = mutual_information(mat.iou_perturbed, sig, ts, n_bins, binning)
        mi_b = mutual_information(mat.iou_perturbed, sig, BASELINE_THRESHOLDS, n_bins, binning)
        gain = 100.0 * (mi_c - mi_b) / mi_b if mi_b > 0 else None
        entry = tj["signals"].get(sig_name) or {}
        detail = {
            "signal": sig_name,
            "mi_chosen": mi_c,
            "mi_baseline": mi_b,
            "n_bins": n_bins,
            "binning": binning,
            "in_sample_gain_pct_on_threshold_subset": (entry.get("baseline") or {}).get(
                "exact_improvement_pct"
            )
            if sig_name == source
            else None,
        }
        if gain is None:
            detail["note"] = "undefined: the baseline's MI is 0"
    rho = report.get("spearman_iou_drop_vs_semantic_drift", {}).get("pairs", {}).get("rho")
    report["checks"] = seed_checks(
        mat,
        boundary_rate=report["thresholds"]["boundary_000"]["rate"],
        rho=rho,
        mi_gain_pct=gain,
        mi_gain_detail=detail,
    )
    if own_thresholds and out_of_sample:
        own, own_how = chosen_thresholds(read_json(own_thresholds), source)
        ref = boundary_report(mat, diffs, own, thresholds_source=own_how)
        report["in_sample_reference"] = {
            "what": "the same samples classified with thresholds chosen on this subset itself (optimistic)",
            "thresholds": own,
            "thresholds_source": own_how,
            "boundary_000": {"rate": ref["thresholds"]["boundary_000"]["rate"]},
            "boundary_001": {"rate": ref["thresholds"]["boundary_001"]["rate"]},
        }
    write_json(out_path, report)
    log.info(
        "boundary (%s): boundary_000 rate %.3f, boundary_001 rate %s, semantic rate %s; failure rate %.3f; "
        "checks %d pass, %d fail, %d undefined",
        "out-of-sample" if out_of_sample else "in-sample",
        report["thresholds"]["boundary_000"]["rate"] or 0.0,
        report["thresholds"]["boundary_001"]["rate"],
        report["semantic"].get("rate"),
        report["failure_rate"]["overall"] or 0.0,
        report["checks"]["n_pass"],
        report["checks"]["n_fail"],
        report["checks"]["n_undefined"],
    )


def make_figures(
    *,
    ious: str,
    drift: str | None,
    thresholds: str,
    boundary: str,
    predictions: str,
    stats: str | None = None,
    validation_png: str,
    thresholds_png: str,
    timing_png: str,
    definition: str = "boundary_000",
    dpi: int = 120,
) -> None:
    """The six-panel validation figure, the threshold comparison and the timing figure."""
    from vlmrel.grounding.figures import threshold_figure, timing_figure, validation_figure

    mat, _, _ = read_ious(ious)
    d = read_drift(drift, mat) if drift else None
    tj = read_json(thresholds)
    validation_figure(mat, read_json(boundary), tj, validation_png, drift=d, definition=definition, dpi=dpi)
    threshold_figure(tj, thresholds_png, dpi=dpi)
    df = read_predictions(predictions)
    timing_figure(
        df["latency_s"].to_numpy(float),
        df["cache_hit"].to_numpy(bool),
        df["status"].tolist(),
        timing_png,
        dpi=dpi,
        stats=read_json(stats) if stats else None,
    )

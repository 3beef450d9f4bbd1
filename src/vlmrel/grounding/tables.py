"""HTML tables of ``thresholds.json``, ``boundary.json``, the seeds' checks and the in-sample vs
out-of-sample comparison, for the Snakemake report (figures alone hide the numbers).

Each table is a small self-contained HTML file (no scripts, no external styles).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence

from vlmrel.io import atomic_path, read_json, write_json

_STYLE = (
    "<style>table{border-collapse:collapse;font:13px sans-serif;margin:0 0 1.2em}"
    "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}"
    "th{background:#eee}caption{text-align:left;font-weight:bold;padding:4px 0}"
    "td.pass{background:#d9f2d9}td.fail{background:#f7d4d4}td.na{background:#eee}</style>"
)


def fmt(v, digits: int = 4) -> str:
    """A cell's text: numbers rounded, lists joined, None as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.{digits}g}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(fmt(x, digits) for x in v) + "]"
    return str(v)


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def html_table(caption: str, header: Sequence[str], rows: Sequence[Sequence], classes=None) -> str:
    """One ``<table>``; ``classes[i][j]`` optionally styles a cell (``pass``, ``fail``, ``na``)."""
    out = [f"<table><caption>{html.escape(caption)}</caption><tr>"]
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr>")
    for i, row in enumerate(rows):
        out.append("<tr>")
        for j, cell in enumerate(row):
            cls = classes[i][j] if classes and classes[i][j] else None
            attr = f' class="{cls}"' if cls else ""
            out.append(f"<td{attr}>{html.escape(cell if isinstance(cell, str) else fmt(cell))}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def write_html(path: str | os.PathLike[str], title: str, tables: Sequence[str]) -> None:
    body = "\n".join(tables)
    doc = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{_STYLE}</head><body>\n{body}\n</body></html>\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")


def thresholds_table(tj: Mapping) -> str:
    """Per signal: the exact optimum, the seed's L-BFGS-B and the baseline (thresholds, MI, gaps)."""
    rows = []
    for sig, e in tj["signals"].items():
        for method in ("exact", "lbfgsb", "baseline"):
            m = e.get(method)
            if not m:
                rows.append([sig, method, "n/a", "n/a", "n/a", fmt(e.get("n_pairs"))])
                continue
            gain = m.get("exact_improvement_pct")
            rows.append(
                [
                    sig,
                    method,
                    fmt(m["thresholds"], 3),
                    fmt(m["mi"]),
                    "" if gain is None else fmt(gain, 3),
                    fmt(e.get("n_pairs")),
                ]
            )
    cap = (
        f"thresholds.json: I(C_t(IoU); S) in nats, k={tj.get('k')}, {tj.get('n_bins')} "
        f"{tj.get('binning')} bins, {tj.get('n_samples')} samples x {tj.get('n_perturbations')} perturbations"
    )
    return html_table(
        cap, ["signal", "method", "thresholds", "MI (nats)", "exact gain over it (%)", "pairs"], rows
    )


def boundary_table(bj: Mapping) -> str:
    """The boundary rates (geometric both definitions, chosen and baseline thresholds; semantic),
    the overlap and the failure rate."""
    ch, base = bj["thresholds"], bj["baseline"]
    sem = bj.get("semantic") or {}
    ov = bj.get("overlap") or {}
    rows = [
        ["subset", fmt(bj.get("subset"))],
        ["samples x perturbations", f"{bj['n_samples']} x {bj['n_perturbations']}"],
        ["thresholds (beta_geo)", fmt(ch["thresholds"], 3)],
        ["thresholds from", fmt(bj["thresholds_source"])],
        ["thresholds kind", fmt(bj.get("thresholds_kind"))],
        ["boundary_000 rate (chosen)", pct(ch["boundary_000"]["rate"])],
        ["boundary_001 rate (chosen)", pct(ch["boundary_001"]["rate"])],
        ["boundary_000 rate (baseline)", pct(base["boundary_000"]["rate"])],
        ["boundary_001 rate (baseline)", pct(base["boundary_001"]["rate"])],
    ]
    ref = bj.get("in_sample_reference")
    if ref:
        rows += [
            [
                "boundary_000 rate with this subset's own optimum (in-sample)",
                pct(ref["boundary_000"]["rate"]),
            ],
            [
                "boundary_001 rate with this subset's own optimum (in-sample)",
                pct(ref["boundary_001"]["rate"]),
            ],
        ]
    if "rate" in sem:
        rows += [
            ["semantic thresholds (beta_sem)", fmt(sem["thresholds"], 3)],
            ["semantic thresholds from", fmt(sem["thresholds_source"])],
            ["semantic boundary rate", pct(sem["rate"])],
            ["samples with all answer distances 0 (similarity 1)", fmt(sem["n_all_zero_distance_samples"])],
        ]
    else:
        rows.append(["semantic boundary samples", fmt(sem.get("note"))])
    if ov:
        rows += [
            [
                "geometric (boundary_000) / semantic / both / either",
                f"{ov['n_geometric']} / {ov['n_semantic']} / {ov['n_both']} / {ov['n_either']}",
            ],
            ["overlap (Jaccard)", fmt(ov["jaccard"], 3)],
            ["geometric only", ", ".join(ov["geometric_only"]) or "-"],
            ["semantic only", ", ".join(ov["semantic_only"]) or "-"],
        ]
    fr = bj["failure_rate"]
    rows += [
        [
            "failed requests (left out of IoU statistics)",
            f"{fr['n_failed']} of {fr['n_requests']} ({pct(fr['overall'])})",
        ],
        ["failures by kind", ", ".join(f"{k}: {v}" for k, v in fr["by_kind"].items()) or "-"],
        [
            "mean IoU original / perturbed",
            f"{fmt(bj['iou']['original_mean'], 3)} / {fmt(bj['iou']['perturbed_mean'], 3)}",
        ],
    ]
    sp = (bj.get("spearman_iou_drop_vs_semantic_drift") or {}).get("pairs")
    if sp:
        rows.append(["Spearman IoU drop vs semantic drift (pairs)", f"rho {fmt(sp['rho'], 3)}, n {sp['n']}"])
    return html_table("boundary.json", ["quantity", "value"], rows)


def checks_table(bj: Mapping) -> str:
    """The seeds' checks: value, criterion, pass/fail."""
    items = bj["checks"]["items"]
    rows, classes = [], []
    for c in items:
        flag = {True: "pass", False: "fail", None: "undefined"}[c["pass"]]
        value = c["value"]
        shown = (
            pct(value)
            if c["check"] in ("boundary_rate", "share_sensitive") and value is not None
            else fmt(value)
        )
        rows.append([c["check"], c["seed"], c["what"], shown, c["criterion"], flag])
        classes.append([None] * 5 + [{"pass": "pass", "fail": "fail"}.get(flag, "na")])
    cap = (
        f"The seeds' checks on subset {bj.get('subset')} "
        f"({bj.get('thresholds_kind', 'in-sample')} thresholds): "
        f"{bj['checks']['n_pass']} pass, {bj['checks']['n_fail']} fail, {bj['checks']['n_undefined']} undefined"
    )
    return html_table(cap, ["check", "seed", "what", "value", "criterion", "result"], rows, classes)


def write_tables(
    thresholds: str, boundary: str, thresholds_html: str, boundary_html: str, checks_html: str
) -> None:
    """The three report tables of one subset."""
    tj, bj = read_json(thresholds), read_json(boundary)
    write_html(thresholds_html, "thresholds.json", [thresholds_table(tj)])
    write_html(boundary_html, "boundary.json", [boundary_table(bj)])
    write_html(checks_html, "checks", [checks_table(bj)])


def in_vs_out(validation: Mapping, threshold: Mapping | None, subsets: Sequence[Mapping]) -> dict:
    """In-sample vs out-of-sample boundary rates side by side; checks the subsets are disjoint.

    Rows: the threshold subset with its own thresholds (in-sample), the validation subset with the
    threshold subset's (out-of-sample), and the validation subset with its own optimum (in-sample,
    optimistic). Thresholds given in config are neither: their kind is "given (not learned)".
    """
    if len(subsets) == 2:
        shared = sorted(set(subsets[0]["indices"]) & set(subsets[1]["indices"]))
        if shared:
            raise ValueError(
                f"subsets {subsets[0]['name']} and {subsets[1]['name']} share {len(shared)} samples "
                f"(e.g. dataset rows {shared[:10]}); thresholds must be validated on other samples"
            )

    def row(b: Mapping, rates: Mapping, ts, kind: str, source: str) -> dict:
        sem = b.get("semantic") or {}
        return {
            "subset": b["subset"],
            "n_samples": b["n_samples"],
            "n_perturbations": b["n_perturbations"],
            "thresholds": ts,
            "thresholds_source": source,
            "kind": kind,
            "in_sample": kind == "in-sample",
            "boundary_000_rate": rates["boundary_000"]["rate"],
            "boundary_001_rate": rates["boundary_001"]["rate"],
            "semantic_rate": sem.get("rate") if rates is b["thresholds"] else None,
        }

    def kind_of(b: Mapping) -> str:
        return b.get("thresholds_kind") or ("out-of-sample" if b.get("out_of_sample") else "in-sample")

    rows = [
        row(b, b["thresholds"], b["thresholds"]["thresholds"], kind_of(b), b.get("thresholds_source", ""))
        for b in ([threshold] if threshold is not None else []) + [validation]
    ]
    ref = validation.get("in_sample_reference")
    if ref:
        rows.append(
            row(
                validation,
                ref,
                ref["thresholds"],
                "in-sample",
                f"{ref.get('thresholds_source', '')} (optimistic)",
            )
        )
    return {
        "disjoint": len(subsets) == 2,
        "subsets": [s["name"] for s in subsets],
        "rows": rows,
        "note": "in-sample: thresholds chosen on the same samples they classify (optimistic); "
        "out-of-sample: chosen on the threshold subset, applied to the validation subset",
    }


def write_in_vs_out(
    validation: str, threshold: str | None, subsets: Sequence[str], out_json: str, out_html: str
) -> dict:
    """``in_vs_out_of_sample.json`` and its HTML table."""
    res = in_vs_out(
        read_json(validation), read_json(threshold) if threshold else None, [read_json(s) for s in subsets]
    )
    write_json(out_json, res)
    rows = [
        [
            r["subset"],
            f"{r['n_samples']} x {r['n_perturbations']}",
            fmt(r["thresholds"], 3),
            r["thresholds_source"],
            r["kind"],
            pct(r["boundary_000_rate"]),
            pct(r["boundary_001_rate"]),
            pct(r["semantic_rate"]) if r["semantic_rate"] is not None else "-",
        ]
        for r in res["rows"]
    ]
    cap = "Boundary rates in-sample vs out-of-sample" + (
        f" (subsets {' and '.join(res['subsets'])} checked disjoint)"
        if res["disjoint"]
        else " (no threshold subset configured: in-sample only)"
    )
    header = [
        "subset",
        "samples x perturbations",
        "thresholds",
        "thresholds from",
        "kind",
        "boundary_000",
        "boundary_001",
        "semantic",
    ]
    write_html(out_html, "in vs out of sample", [html_table(cap, header, rows)])
    return res

"""The go/no-go gate after Phase 1 and the convergence sweep (seed 002, sections 6 and 7).

Decision tree on exp0's overall summary (:func:`vlmrel.mcdo.reliability.overall_summary`):

1. any model at any T (either space) ``usable`` -> ``proceed`` (Phase 2 runs);
2. otherwise the best status is ``marginal`` -> ``convergence_sweep``: exp0 again on a small N
   at higher T. With the sweep's overall summary given, ``usable`` there -> ``proceed``; still not
   usable -> the seed's "judgment call": the decision stays ``convergence_sweep`` with
   ``judgment_call: true`` and Phase 2 runs only if forced;
3. otherwise the best status is ``failed`` (every model failed, ``all_failed_at_T_max`` is the
   seed's wording of it) -> ``negative_result``: stop and write it up;
4. no model has any status but ``insufficient_trials`` (K < 2, or degenerate scores whose metrics
   are undefined) -> ``inconclusive``: the tree has no branch for it; Phase 2 runs only if forced.

``force`` (config ``mcdo.gate.force_phase2``) makes ``run_phase2`` true whatever the decision;
the decision and reasons still say what the evidence was. ``run_phase2`` also lets the later
phases (Phase 4) into the DAG.

Phase 1's ambiguity experiment (exp5_subset) is recorded as ``checks``: the seed's sanity check
(section 6: ``rho_uncertainty_vs_entropy > 0.3`` and ``auroc_high_entropy > 0.6``) per model. A
check is reported, never a blocker: it does not change the decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DECISIONS = ("proceed", "convergence_sweep", "negative_result", "inconclusive")


def _models_with(summary: Mapping[str, Any], status: str) -> list[str]:
    return sorted(m for m, v in summary["models"].items() if v["best_status"] == status)


def _check(summary: Mapping[str, Any], what: str) -> None:
    for key in ("models", "best_status", "any_usable", "all_failed_at_T_max"):
        if key not in summary:
            raise ValueError(f"{what}: not an exp0 overall summary (missing '{key}')")
    if not summary["models"]:
        raise ValueError(f"{what}: no models in the exp0 overall summary")


def _where(model: Mapping[str, Any]) -> str:
    at = model.get("best_at") or {}
    return f" (T={at.get('T')}, {at.get('space')}-normalisation)" if at else ""


def sanity_checks(ambiguity_overall: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's exp5 sanity check of each model of an ambiguity overall summary (not a blocker)."""
    from vlmrel.mcdo.ambiguity import SANITY

    models: dict[str, Any] = {}
    for m, v in sorted(ambiguity_overall.get("models", {}).items()):
        if v.get("skipped"):
            models[m] = {"skipped": True, "reason": v.get("reason", "")}
            continue
        entry: dict[str, Any] = {"skipped": False}
        for key, threshold in SANITY.items():
            value = v.get(key)
            ok = value is not None and math.isfinite(float(value)) and float(value) > threshold
            entry[key] = value
            entry[f"{key}_ok"] = bool(ok)
        entry["ok"] = all(entry[f"{k}_ok"] for k in SANITY)
        models[m] = entry
    return {
        "blocking": False,
        "thresholds": {k: f"> {t}" for k, t in SANITY.items()},
        "models": models,
        "any_ok": any(e.get("ok") for e in models.values()),
    }


def decide_gate(
    overall_summary: Mapping[str, Any],
    force: bool = False,
    sweep_summary: Mapping[str, Any] | None = None,
    checks: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The gate decision (module docstring) as a JSON-ready dict for ``gate.json``.

    Keys: ``decision``, ``run_phase2``, ``forced``, ``reasons`` (sentences), ``best_status``,
    ``usable_models``, ``marginal_models``, ``all_failed_at_T_max``, ``judgment_call``,
    ``sweep`` (the sweep's verdict or None), ``models`` (each model's statuses) and ``checks``
    (the sanity checks of the ambiguity overall summaries in ``checks``, keyed by experiment; they
    never change the decision).
    """
    _check(overall_summary, "gate input")
    models = overall_summary["models"]
    best = overall_summary["best_status"]
    usable, marginal = _models_with(overall_summary, "usable"), _models_with(overall_summary, "marginal")
    reasons: list[str] = []
    judgment_call = False
    sweep_info = None
    if overall_summary["any_usable"]:
        decision = "proceed"
        reasons += [f"{m} is usable{_where(models[m])}" for m in usable]
    elif best == "marginal":
        decision = "convergence_sweep"
        reasons += [f"{m} is at best marginal{_where(models[m])}" for m in marginal]
        reasons.append("no model is usable at any T: run exp0 at higher T on a small N (convergence sweep)")
        if sweep_summary is not None:
            _check(sweep_summary, "convergence sweep summary")
            sweep_usable = _models_with(sweep_summary, "usable")
            sweep_info = {
                "best_status": sweep_summary["best_status"],
                "usable_models": sweep_usable,
                "models": {m: v["best_status"] for m, v in sweep_summary["models"].items()},
            }
            if sweep_summary["any_usable"]:
                decision = "proceed"
                reasons += [
                    f"convergence sweep: {m} is usable{_where(sweep_summary['models'][m])}"
                    for m in sweep_usable
                ]
            else:
                judgment_call = True
                reasons.append(
                    f"convergence sweep: best status still {sweep_summary['best_status']}; "
                    "judgment call (seed 002, section 6): Phase 2 runs only if forced"
                )
    elif best == "failed":
        decision = "negative_result"
        if overall_summary["all_failed_at_T_max"]:
            reasons.append("every model failed at T_max in both spaces")
        reasons.append("no model reached marginal or usable at any T: negative result, stop and write it up")
    else:
        decision = "inconclusive"
        reasons.append(
            "no model has a reliability status (insufficient_trials): K < 2 trials, or scores that are "
            "constant so ICC/SNR/Spearman are undefined"
        )
    run_phase2 = decision == "proceed" or bool(force)
    if force and decision != "proceed":
        reasons.append("Phase 2 forced by config (mcdo.gate.force_phase2)")
    recorded = {str(c.get("experiment", f"check{i}")): sanity_checks(c) for i, c in enumerate(checks)}
    for exp, check in recorded.items():
        verdict = "passed" if check["any_ok"] else "not passed"
        reasons.append(
            f"{exp} sanity check (rho with entropy > 0.3, AUROC for high entropy > 0.6) {verdict} "
            "(a check, not a blocker)"
        )
    return {
        "decision": decision,
        "run_phase2": run_phase2,
        "forced": bool(force),
        "judgment_call": judgment_call,
        "reasons": reasons,
        "best_status": best,
        "usable_models": usable,
        "marginal_models": marginal,
        "all_failed_at_T_max": bool(overall_summary["all_failed_at_T_max"]),
        "sweep": sweep_info,
        "checks": recorded,
        "models": {
            m: {
                "best_status": v["best_status"],
                "best_at": v.get("best_at"),
                "status_at_T_max": v.get("status_at_T_max"),
                "T": v.get("T"),
                "p": v.get("p"),
                "n_trials": v.get("n_trials"),
                "n_images": v.get("n_images"),
            }
            for m, v in sorted(models.items())
        },
    }


_TITLES = {
    "proceed": "Phase 1 gate: proceed to Phase 2",
    "convergence_sweep": "Phase 1 gate: marginal, convergence sweep",
    "negative_result": "Phase 1 gate: negative result",
    "inconclusive": "Phase 1 gate: inconclusive",
}


def negative_result_note(gate: Mapping[str, Any]) -> str:
    """A readable markdown note of the gate's verdict (written for every decision, meant for a negative one)."""
    decision = gate["decision"]
    lines = [f"# {_TITLES.get(decision, decision)}", ""]
    if decision == "negative_result":
        lines += [
            "MC dropout in the frozen encoders did **not** give a reliable per-image uncertainty: across "
            "independent trials, no model reached even the *marginal* level (median pairwise Spearman >= 0.6 "
            "and SNR >= 1) at any number of passes T, before or after L2 normalisation. Following the runbook "
            "(seed 002, section 6), Phase 2 is not run.",
            "",
        ]
    lines += [f"- decision: **{decision}**", f"- Phase 2 runs: **{'yes' if gate['run_phase2'] else 'no'}**"]
    if gate.get("forced"):
        lines.append("- Phase 2 was forced by config (`mcdo.gate.force_phase2`)")
    lines += [
        "",
        "## Per model",
        "",
        "| model | p | K | N | T | best status | at | status at T_max (pre / post) |",
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, v in gate["models"].items():
        at = v.get("best_at") or {}
        at_s = f"T={at.get('T')}, {at.get('space')}" if at else "-"
        tmax = v.get("status_at_T_max") or {}
        ts = v.get("T") or []
        lines.append(
            f"| {m} | {v.get('p')} | {v.get('n_trials')} | {v.get('n_images')} | {ts[0] if ts else '-'}..{ts[-1] if ts else '-'} "
            f"| {v['best_status']} | {at_s} | {tmax.get('pre', '-')} / {tmax.get('post', '-')} |"
        )
    lines += ["", "## Reasons", ""] + [f"- {r}" for r in gate["reasons"]]
    if gate.get("sweep"):
        s = gate["sweep"]
        lines += ["", "## Convergence sweep", "", f"- best status in the sweep: {s['best_status']}"]
        lines += [f"- {m}: {st}" for m, st in s["models"].items()]
    lines += [
        "",
        "## Thresholds (seed 002, section 6)",
        "",
        "- usable: median pairwise Spearman >= 0.8, SNR >= 2, ICC >= 0.75",
        "- marginal: not usable, Spearman >= 0.6 and SNR >= 1",
        "- failed: Spearman < 0.6 or SNR < 1",
    ]
    if decision == "negative_result":
        lines += [
            "",
            "## What a reader may still try",
            "",
            "- more passes (the convergence sweep up to T=512) or more images;",
            "- another dropout rate p or dropout kind (exp1, exp3 can be forced with `mcdo.gate.force_phase2`).",
        ]
    return "\n".join(lines) + "\n"


def knee(T: Sequence[float], values: Sequence[float | None], tol: float = 0.02) -> float | None:
    """The smallest T after which the curve gains less than ``tol``: min T_i with max(v[j > i]) - v_i < tol.

    Points with a missing/NaN value are dropped; T is sorted. Returns None when the curve has fewer
    than two points or only saturates at its last point (still rising within the sweep).
    """
    pts = sorted(
        (float(t), float(v))
        for t, v in zip(T, values, strict=True)
        if v is not None and math.isfinite(float(v))
    )
    if len(pts) < 2:
        return None
    ts = np.array([p[0] for p in pts])
    vs = np.array([p[1] for p in pts])
    for i in range(len(vs) - 1):
        if np.max(vs[i + 1 :]) - vs[i] < tol:
            t = ts[i]
            return int(t) if float(t).is_integer() else float(t)
    return None


def convergence_summary(
    model_summary: Mapping[str, Any],
    tol: float = 0.02,
    metrics: Sequence[str] = ("spearman_median", "icc", "snr"),
    knee_metric: str = "spearman_median",
) -> dict[str, Any]:
    """Reliability-against-T curves of one model's sweep summary (:func:`vlmrel.mcdo.reliability.model_summary`)
    and the knee of ``knee_metric`` per space."""
    ts = list(model_summary["T"])
    out: dict[str, Any] = {"model": model_summary["model"], "T": ts, "tol": tol, "knee_metric": knee_metric}
    curves: dict[str, dict[str, list]] = {}
    knees: dict[str, Any] = {}
    for space, by_t in model_summary["reliability"].items():
        curves[space] = {m: [by_t[str(t)].get(m) for t in ts] for m in metrics}
        curves[space]["status"] = [by_t[str(t)]["status"] for t in ts]
        knees[space] = knee(ts, [by_t[str(t)].get(knee_metric) for t in ts], tol)
    out["curves"] = curves
    out["knee"] = knees
    out["best_status"] = model_summary.get("best_status")
    return out

"""The go/no-go gate on real exp0 summaries (vlmrel.mcdo.reliability), the note and the convergence knee."""

import numpy as np
import pytest

from vlmrel.mcdo.gate import convergence_summary, decide_gate, knee, negative_result_note
from vlmrel.mcdo.reliability import Trials, model_summary, overall_summary

T_LIST = [4, 8, 16]


def _model(model: str, noise_by_t: dict[int, float], k: int = 4, n: int = 60, seed: int = 0) -> dict:
    """A real model_summary from synthetic traces: a per-image truth plus trial noise per T."""
    rng = np.random.default_rng(seed)
    truth = rng.lognormal(size=n)
    pre = np.stack(
        [np.stack([truth + noise_by_t[t] * rng.standard_normal(n) for t in T_LIST]) for _ in range(k)]
    )
    trials = Trials(
        T=T_LIST, image_id=[str(i) for i in range(n)], trace_pre=pre, trace_post=pre.copy(), metas=[{}]
    )
    return model_summary(trials, model, 0.01)


USABLE = {4: 3.0, 8: 1.0, 16: 0.05}  # reliable at T=16
NOISE = {4: 30.0, 8: 30.0, 16: 30.0}  # pure noise: failed everywhere


def _marginal_noise() -> dict[int, float]:
    return {4: 30.0, 8: 30.0, 16: 0.6}


def test_usable_proceeds():
    ov = overall_summary([_model("a", USABLE), _model("b", NOISE, seed=1)])
    assert ov["models"]["a"]["best_status"] == "usable"
    g = decide_gate(ov)
    assert g["decision"] == "proceed" and g["run_phase2"] is True
    assert g["usable_models"] == ["a"] and "a is usable (T=16" in g["reasons"][0]


def test_marginal_runs_sweep_and_force():
    m = _model("a", _marginal_noise())
    assert m["best_status"] == "marginal", m["reliability"]["pre"]["16"]
    ov = overall_summary([m, _model("b", NOISE, seed=1)])
    g = decide_gate(ov)
    assert g["decision"] == "convergence_sweep" and g["run_phase2"] is False and not g["judgment_call"]
    forced = decide_gate(ov, force=True)
    assert forced["decision"] == "convergence_sweep" and forced["run_phase2"] is True and forced["forced"]
    # the sweep finds a usable T -> proceed; still marginal -> judgment call, Phase 2 only if forced
    after = decide_gate(ov, sweep_summary=overall_summary([_model("a", USABLE)]))
    assert after["decision"] == "proceed" and after["run_phase2"] and after["sweep"]["usable_models"] == ["a"]
    still = decide_gate(ov, sweep_summary=ov)
    assert still["decision"] == "convergence_sweep" and still["judgment_call"] and not still["run_phase2"]


def test_all_failed_is_negative_result():
    ov = overall_summary([_model("a", NOISE), _model("b", NOISE, seed=2)])
    assert ov["all_failed_at_T_max"]
    g = decide_gate(ov)
    assert g["decision"] == "negative_result" and g["run_phase2"] is False
    note = negative_result_note(g)
    assert note.startswith("# Phase 1 gate: negative result")
    assert "| a |" in note and "| b |" in note and "failed / failed" in note
    assert decide_gate(ov, force=True)["run_phase2"] is True


def test_insufficient_trials_is_inconclusive():
    ov = overall_summary([_model("a", USABLE, k=1)])
    assert ov["best_status"] == "insufficient_trials"
    g = decide_gate(ov)
    assert g["decision"] == "inconclusive" and not g["run_phase2"]
    with pytest.raises(ValueError, match="missing 'models'"):
        decide_gate({"best_status": "usable"})


def test_knee():
    t = [4, 8, 16, 32, 64, 128, 256]
    assert knee(t, [0.3, 0.5, 0.7, 0.8, 0.85, 0.86, 0.865], tol=0.02) == 64
    assert knee(t, [0.3, 0.5, 0.7, 0.8, 0.85, 0.86, 0.865], tol=0.07) == 32
    # noisy plateau: a later small dip does not move the knee, a later rise does
    assert knee([4, 8, 16, 32, 64], [0.5, 0.7, 0.69, 0.71, 0.70], tol=0.02) == 8
    assert knee([4, 8, 16, 32, 64], [0.5, 0.7, 0.69, 0.75, 0.75], tol=0.02) == 32
    # still rising at the end, NaN/None dropped, unsorted input
    assert knee(t, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], tol=0.02) is None
    assert knee([64, 4, 16, 8], [0.9, 0.2, None, float("nan")], tol=0.02) is None
    assert knee([16, 4, 8], [0.8, 0.2, 0.79], tol=0.02) == 8
    # against a brute-force reading of the definition on a saturating curve
    ts = [2**i for i in range(2, 10)]
    vals = [1 - np.exp(-x / 40) for x in ts]
    expected = next(ts[i] for i in range(len(ts) - 1) if max(vals[i + 1 :]) - vals[i] < 0.01)
    assert knee(ts, vals, tol=0.01) == expected


def test_convergence_summary():
    m = _model("a", {4: 3.0, 8: 0.5, 16: 0.45})
    conv = convergence_summary(m, tol=0.05)
    rho = [m["reliability"]["pre"][str(t)]["spearman_median"] for t in T_LIST]
    assert conv["curves"]["pre"]["spearman_median"] == rho
    assert conv["knee"]["pre"] == knee(T_LIST, rho, 0.05)


def test_exp5_sanity_checks_are_recorded_not_blocking():
    from vlmrel.mcdo.ambiguity import exp5_overall_summary

    per_model = {
        "good": {"skipped": False, "rho_uncertainty_vs_entropy": 0.45, "auroc_high_entropy": 0.7, "sanity_ok": True},
        "weak": {"skipped": False, "rho_uncertainty_vs_entropy": 0.31, "auroc_high_entropy": 0.6, "sanity_ok": False},
        "none": {"skipped": True, "reason": "no text tower"},
    }
    check = {**exp5_overall_summary(per_model, {}), "experiment": "exp5_subset"}
    ov = overall_summary([_model("a", NOISE), _model("b", NOISE, seed=2)])
    plain, checked = decide_gate(ov), decide_gate(ov, checks=[check])
    assert checked["decision"] == plain["decision"] == "negative_result"
    assert checked["run_phase2"] is plain["run_phase2"] is False
    c = checked["checks"]["exp5_subset"]
    assert c["blocking"] is False and c["any_ok"] is True
    assert c["models"]["good"]["ok"] and c["models"]["good"]["rho_uncertainty_vs_entropy_ok"]
    assert not c["models"]["weak"]["ok"] and c["models"]["weak"]["rho_uncertainty_vs_entropy_ok"]
    assert not c["models"]["weak"]["auroc_high_entropy_ok"]  # 0.6 is not > 0.6
    assert c["models"]["none"] == {"skipped": True, "reason": "no text tower"}
    assert any("not a blocker" in r for r in checked["reasons"])
    assert plain["checks"] == {}

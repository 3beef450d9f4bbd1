"""The mcdo experiments, one declarative entry each (seed 002).

The rules (``rules/common.smk``, ``rules/mcdo.smk``) build every mcdo target, input function and
wildcard constraint from :data:`EXPERIMENTS`; no experiment name appears in a rule or a script.
An entry says:

- ``name``: the experiment and its config section (``mcdo.<name>``) and output folder
  (``results/{run}/mcdo/<name>/``);
- ``phase``: 1 (before the gate); 2 or 4 (after it, or forced by ``mcdo.gate.force_phase2``:
  :data:`GATED_PHASES`); 3 (after it, or forced by its own ``mcdo.gate.force_phase3``); or
  ``"sweep"`` (the convergence sweep, run when the gate asks for it);
- ``job``: what each MC-dropout job writes: ``"trials"`` (``trial{k}.npz``, the traces at every T),
  ``"geometry"`` (``geometry{k}.npz``, the per-image covariance geometry of the same passes),
  ``"semantic"`` (``semantic{k}.npz``, the per-image semantic decomposition of the passes, exp8),
  ``"text"`` (``text{k}.npz``: dropout in the text tower, a trace per prompt; exp10) or ``"search"``
  (``search0.npz``: a layer-wise rate search, every candidate's K trials; exp11); ``"mot"`` is no
  MC-dropout job at all but the tracking association of exp9 (one per experiment, no models);
- ``scores``: ``None``, or a per-model job with the model's deterministic features whose file
  ``{exp}/{model}/{scores}.npz`` the analysis and figure also receive (``"laplace"``: exp6's ridge
  leverage and last-layer Laplace; ``"aleatoric"``: exp7's degraded versions);
- ``summary``: how a model's files become ``summary.json``: ``"reliability"`` (reliability across
  trials at every T, then an overall summary over models: exp0 and the sweep), ``"ambiguity"``
  (the model's zero-shot ambiguity against its uncertainty, then an overall summary), or
  ``"analysis"`` (the entry's ``analysis`` function on its arms, and on its ``scores`` file when it
  has one), or ``"mot"`` (exp9's tracking association);
- ``figure``: the figure kind (``"reliability"``, ``"knee"`` (reliability against T with the sweep's
  knee), ``"geometry"``,
  ``"ambiguity"``, ``"mot"`` or ``"experiment"``, the last drawn by the entry's ``plot`` function);
- ``caption``: for ``"experiment"`` figures, the caption text's file under ``report/`` (the other
  figure kinds have one rule, and one caption, each);
- ``arms``: the explicit records of what varies inside the experiment (:class:`Arm`: dropout kind,
  rate, replicate), so that analyses receive the rates and kinds as values, never parsed back
  out of paths;
- ``pixels``: ``"natural"``, ``"synthetic"`` (exp2's natural + generated images) or ``"ablation"``
  (exp7's natural images + their degraded versions, ids ``<image_id>__<degradation>``).

Adding an experiment is an entry here, its analysis (and figure) function in
:mod:`vlmrel.mcdo.analyses`, its caption and its config section; ``docs/architecture.md`` walks
through an example.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmrel.mcdo import analyses

PHASES = (1, 2, 3, 4, "sweep")
#: the phases after the gate that mcdo.gate.force_phase2 forces (Phase 3 has its own flag, force_phase3)
GATED_PHASES = (2, 4)
JOBS = ("trials", "geometry", "semantic", "text", "search", "mot")
SCORES = (None, "laplace", "aleatoric")
PIXELS = ("natural", "synthetic", "ablation")
SUMMARIES = ("reliability", "ambiguity", "analysis", "mot")
FIGURES = ("reliability", "knee", "geometry", "ambiguity", "experiment", "mot")
#: mcdo config keys that are settings, not experiments
SETTINGS = ("seed", "precision", "batch_size", "dropout_kind", "depthwise_dropout", "mem_mb", "gate")


def fmt_p(p: float) -> str:
    """A dropout rate as it appears in paths and arm names: 0.01 -> '0.01'."""
    return f"{float(p):g}"


@dataclass(frozen=True)
class Arm:
    """One setting an experiment runs its K trials under, for each of its models."""

    name: str  # label in summaries and figures ('trials', 'p0.01', 'p0.01_rep2', 'dropconnect')
    kind: str  # dropout kind (a path component)
    p: float  # dropout rate (a path component)
    replicate: int = 1  # the n-th listing of the same (kind, p): same files, a check of the pairing

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "p": self.p, "replicate": self.replicate}


def single_arm(exp_cfg: Mapping[str, Any], mcdo_cfg: Mapping[str, Any]) -> list[Arm]:
    """One arm: the experiment's rate (default exp0's) and the configured dropout kind."""
    return [Arm("trials", mcdo_cfg["dropout_kind"], float(exp_rate(exp_cfg, mcdo_cfg)))]


def rate_arms(exp_cfg: Mapping[str, Any], mcdo_cfg: Mapping[str, Any]) -> list[Arm]:
    """One arm per listed rate; a rate listed again is a replicate arm of the same files."""
    arms, seen = [], {}
    for rate in exp_cfg["rates"]:
        key = fmt_p(rate)
        seen[key] = seen.get(key, 0) + 1
        name = f"p{key}" + (f"_rep{seen[key]}" if seen[key] > 1 else "")
        arms.append(Arm(name, mcdo_cfg["dropout_kind"], float(rate), seen[key]))
    return arms


def kind_arms(exp_cfg: Mapping[str, Any], mcdo_cfg: Mapping[str, Any]) -> list[Arm]:
    """One arm per dropout kind, at the experiment's rate."""
    p = float(exp_rate(exp_cfg, mcdo_cfg))
    return [Arm(kind, kind, p) for kind in exp_cfg["kinds"]]


def exp_rate(exp_cfg: Mapping[str, Any], mcdo_cfg: Mapping[str, Any]) -> float:
    """An experiment's dropout rate: its own ``p``, else the gate experiment's."""
    return exp_cfg.get("p", mcdo_cfg[GATE_INPUT]["p"])


@dataclass(frozen=True)
class Experiment:
    name: str
    phase: int | str
    job: str
    summary: str
    figure: str
    description: str
    caption: str | None = None
    arms: Callable[[Mapping[str, Any], Mapping[str, Any]], list[Arm]] = single_arm
    pixels: str = "natural"
    scores: str | None = None
    analysis: Callable[..., dict[str, Any]] | None = None
    plot: Callable[..., None] | None = None
    overall: Callable[..., dict[str, Any]] | None = None
    overall_plot: Callable[..., None] | None = None
    overall_caption: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr, allowed in (
            ("phase", PHASES),
            ("job", JOBS),
            ("summary", SUMMARIES),
            ("figure", FIGURES),
            ("pixels", PIXELS),
            ("scores", SCORES),
        ):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"experiment {self.name!r}: {attr} must be one of {allowed}")
        if self.summary == "analysis" and self.analysis is None:
            raise ValueError(f"experiment {self.name!r}: summary 'analysis' needs an analysis function")
        if self.overall is not None and (self.overall_plot is None or self.overall_caption is None):
            raise ValueError(
                f"experiment {self.name!r}: an overall analysis needs overall_plot and overall_caption"
            )
        if (self.job == "mot") != (self.summary == "mot") or (self.job == "mot") != (self.figure == "mot"):
            raise ValueError(f"experiment {self.name!r}: job, summary and figure 'mot' go together")
        if self.figure == "experiment" and (self.plot is None or self.caption is None):
            raise ValueError(
                f"experiment {self.name!r}: figure 'experiment' needs a plot function and a caption"
            )

    @property
    def has_overall(self) -> bool:
        """Whether the entry has an analysis over its models (``{exp}_overall_summary.json`` and a
        ``{exp}_matrix.png`` figure)."""
        return self.overall is not None

    @property
    def stem(self) -> str:
        """The MC-dropout job's file stem: 'trial', 'geometry', 'semantic', 'text' or 'search'."""
        return {"trials": "trial"}.get(self.job, self.job)

    def n_files(self, exp_cfg: Mapping[str, Any]) -> int:
        """Files per arm: one per trial, or one (``search``: the job runs the K trials of every candidate)."""
        return 1 if self.job == "search" else int(exp_cfg["trials"])


EXPERIMENTS: dict[str, Experiment] = {}


def register(exp: Experiment) -> Experiment:
    if exp.name in EXPERIMENTS:
        raise ValueError(f"experiment {exp.name!r} is registered twice")
    if exp.name in SETTINGS:
        raise ValueError(f"experiment name {exp.name!r} is an mcdo setting")
    EXPERIMENTS[exp.name] = exp
    return exp


#: The experiment whose overall summary the gate reads, and the sweep the gate may ask for.
GATE_INPUT = "exp0"
SWEEP = "convergence"

register(
    Experiment(
        name="exp0",
        phase=1,
        job="trials",
        summary="reliability",
        figure="reliability",
        description="nested-T reliability of the trace across K trials (the gate's input)",
    )
)
register(
    Experiment(
        name="exp0b",
        phase=1,
        job="geometry",
        summary="analysis",
        figure="geometry",
        description="covariance geometry (diagonality, angular variance, top-eigenvalue share)",
        analysis=analyses.geometry_summary,
    )
)
register(
    Experiment(
        name="exp4_subset",
        phase=1,
        job="geometry",
        summary="analysis",
        figure="experiment",
        caption="mcdo/recipes.rst",
        description="recipe validation, Phase 1 (trace vs angular variance)",
        analysis=analyses.recipe_summary,
        plot=analyses.recipe_figure,
    )
)
register(
    Experiment(
        name="exp5_subset",
        phase=1,
        job="trials",
        summary="ambiguity",
        figure="ambiguity",
        description="ambiguity prediction, Phase 1",
    )
)
register(
    Experiment(
        name="convergence",
        phase="sweep",
        job="trials",
        summary="reliability",
        figure="knee",
        description="exp0 on a small N at higher T, when the best Phase 1 status is marginal",
    )
)
register(
    Experiment(
        name="exp1",
        phase=2,
        job="trials",
        summary="analysis",
        figure="experiment",
        caption="mcdo/rates.rst",
        description="rank stability across dropout rates",
        arms=rate_arms,
        analysis=analyses.rates_summary,
        plot=analyses.rates_figure,
    )
)
register(
    Experiment(
        name="exp2",
        phase=2,
        job="trials",
        summary="analysis",
        figure="experiment",
        caption="mcdo/synthetic.rst",
        description="synthetic baselines (noise, flat colour, blur, shuffled patches) against natural images",
        pixels="synthetic",
        analysis=analyses.synthetic_summary,
        plot=analyses.synthetic_figure,
    )
)
register(
    Experiment(
        name="exp3",
        phase=2,
        job="trials",
        summary="analysis",
        figure="experiment",
        caption="mcdo/kinds.rst",
        description="dropout types (input dropout, DropConnect, matched-variance Gaussian noise)",
        arms=kind_arms,
        analysis=analyses.kinds_summary,
        plot=analyses.kinds_figure,
    )
)
register(
    Experiment(
        name="exp4_full",
        phase=2,
        job="geometry",
        summary="analysis",
        figure="experiment",
        caption="mcdo/recipes.rst",
        description="recipe validation over the full model matrix, Phase 2",
        analysis=analyses.recipe_summary,
        plot=analyses.recipe_figure,
        overall=analyses.model_matrix_summary,
        overall_plot=analyses.model_matrix_figure,
        overall_caption="mcdo/model_matrix.rst",
    )
)
register(
    Experiment(
        name="exp5_full",
        phase=2,
        job="trials",
        summary="ambiguity",
        figure="ambiguity",
        description="ambiguity prediction at scale, Phase 2",
    )
)

register(
    Experiment(
        name="exp6",
        phase=3,
        job="trials",
        summary="analysis",
        figure="experiment",
        caption="mcdo/laplace.rst",
        description="MC dropout vs ridge leverage vs a last-layer Laplace as predictors of ambiguity",
        scores="laplace",
        analysis=analyses.laplace_summary,
        plot=analyses.laplace_figure,
    )
)
register(
    Experiment(
        name="exp7",
        phase=3,
        job="trials",
        summary="analysis",
        figure="experiment",
        caption="mcdo/aleatoric.rst",
        description="aleatoric (degraded versions) vs epistemic (MC dropout) uncertainty, degradation ablation",
        pixels="ablation",
        scores="aleatoric",
        analysis=analyses.aleatoric_summary,
        plot=analyses.aleatoric_figure,
    )
)
register(
    Experiment(
        name="exp8",
        phase=3,
        job="semantic",
        summary="analysis",
        figure="experiment",
        caption="mcdo/semantic.rst",
        description="semantic space: the MC-dropout variance along and across the directions of text prompts",
        analysis=analyses.semantic_summary,
        plot=analyses.semantic_figure,
    )
)
register(
    Experiment(
        name="exp9",
        phase=3,
        job="mot",
        summary="mot",
        figure="mot",
        description="uncertainty-adaptive MOT association (motmetrics on a cost JSON)",
    )
)


# Phase 4 (seed 002, section 10)
register(
    Experiment(
        name="exp10",
        phase=4,
        job="text",
        summary="analysis",
        figure="experiment",
        caption="mcdo/text.rst",
        description="text-encoder MC dropout: do general prompts get a higher variance?",
        analysis=analyses.text_summary,
        plot=analyses.text_figure,
    )
)
register(
    Experiment(
        name="exp11",
        phase=4,
        job="search",
        summary="analysis",
        figure="experiment",
        caption="mcdo/concrete.rst",
        description="concrete-dropout proxy: a layer-wise dropout-rate search, chosen on one split, reported on another",
        analysis=analyses.search_summary,
        plot=analyses.search_figure,
    )
)


# ---- what the rules ask of the registry ----------------------------------------------------------


def configured(mcdo_cfg: Mapping[str, Any]) -> list[Experiment]:
    """The registered experiments that have a config section, in registry order."""
    unknown = [k for k in mcdo_cfg if k not in SETTINGS and k not in EXPERIMENTS]
    if unknown:
        raise ValueError(
            f"config mcdo: {unknown} not an mcdo setting or registered experiment "
            f"(settings: {list(SETTINGS)}; experiments: {list(EXPERIMENTS)})"
        )
    return [e for e in EXPERIMENTS.values() if e.name in mcdo_cfg]


def names(experiments: Sequence[Experiment], **where: Any) -> list[str]:
    """Names of the experiments whose attributes equal ``where`` (e.g. ``job="geometry"``)."""
    return [e.name for e in experiments if all(getattr(e, k) == v for k, v in where.items())]


def arm_files(results: str, exp: str, model: str, arm: Arm, stem: str, trials: int) -> list[str]:
    """The K files of one arm of one model: ``{results}/mcdo/{exp}/{model}/{kind}/p{p}/{stem}{k}.npz``."""
    return [f"{results}/mcdo/{exp}/{model}/{arm.kind}/p{fmt_p(arm.p)}/{stem}{k}.npz" for k in range(trials)]


def outputs(results: str, exp: Experiment, models: Sequence[str]) -> list[str]:
    """The files that complete one experiment: per-model summaries, overall summary and figures."""
    if exp.job == "mot":  # no models: one association study per experiment
        return [
            f"{results}/mcdo/{exp.name}/summary.json",
            f"{results}/mcdo/{exp.name}/per_frame.npz",
            f"{results}/figures/mcdo/{exp.name}.png",
        ]
    out = [f"{results}/mcdo/{exp.name}/{m}/summary.json" for m in models]
    if exp.summary == "reliability":
        out.append(f"{results}/mcdo/{exp.name}/overall_summary.json")
    elif exp.summary == "ambiguity":
        out.append(f"{results}/mcdo/{exp.name}/{exp.name}_overall_summary.json")
    fig = f"{results}/figures/mcdo/{exp.name}"
    if exp.has_overall:
        out += [f"{results}/mcdo/{exp.name}/{exp.name}_overall_summary.json", f"{fig}_matrix.png"]
    if exp.figure == "reliability":
        out.append(f"{fig}_scores.png")
        out += [f"{fig}_reliability_{m}.png" for m in models]
    elif exp.figure == "geometry":
        out.append(f"{fig}_geometry.png")
    elif exp.figure == "ambiguity":
        out += [f"{fig}_ambiguity_{m}.png" for m in models]
    else:  # knee, experiment: one figure per model
        out += [f"{fig}_{m}.png" for m in models]
    return out

# Config validation, input functions and wildcard constraints. Rule files hold rules only.

import re
from pathlib import Path

from snakemake.utils import validate

from vlmrel.configcheck import ConfigInvalid, short_error
from vlmrel.grounding.pipeline import resolve_coords
from vlmrel.images import list_images
from vlmrel.io import read_json
from vlmrel.models import REGISTRY, preprocess_spec
from vlmrel.pixels import preproc_key


# A chain listed in `chains` needs its own section; the schema's defaults only keep the others parsing.
for _chain in ("anomaly", "teacher", "grounding"):
    if _chain in config.get("chains", []) and _chain not in config:
        raise ValueError(f"config: chains lists {_chain!r} but the config has no '{_chain}:' section")

try:
    validate(config, schema="../config/schema.yaml", set_default=True)
except Exception as _exc:  # a few lines naming the key, not the whole schema
    _short = short_error(_exc)
    if _short is None:
        raise
    raise ConfigInvalid(f"invalid config (checked against config/schema.yaml):\n{_short}") from None

RUN = config["run"]
RESULTS = f"results/{RUN}"
MCDO = config["mcdo"]
EXP0 = MCDO["exp0"]

GPU = 1 if config["device"].startswith("cuda") else 0
DEMO_IMAGES = config["images"]["source"] == "demo"


def fmt_p(p):
    """Dropout rate as it appears in paths: 0.01 -> '0.01'."""
    return f"{float(p):g}"


# mcdo experiments. Trial experiments store traces (trial{k}.npz); geometry experiments store
# the per-image covariance geometry of the same passes (geometry{k}.npz).
PHASE1 = [e for e in ("exp0", "exp0b", "exp4_subset", "exp5_subset") if e in MCDO]
PHASE2 = [e for e in ("exp1", "exp2", "exp3", "exp4_full", "exp5_full") if e in MCDO]
TRIAL_EXPS = ("exp0", "convergence", "exp1", "exp2", "exp3", "exp5_subset", "exp5_full")
GEOMETRY_EXPS = ("exp0b", "exp4_subset", "exp4_full")
EXPERIMENTS = [e for e in (*TRIAL_EXPS, *GEOMETRY_EXPS) if e in MCDO]
FORCE_PHASE2 = MCDO.get("gate", {}).get("force_phase2", False)

# teacher: heads on the image embeddings of registry models; the audited human truth when configured
TEACHER = config["teacher"]
TEACHER_DIR = f"{RESULTS}/teacher"
TEACHER_MODELS = TEACHER["models"]
TEACHER_AUDITED = TEACHER["human"]["audited"]
TEACHER_TRUTH_KIND = "human_audited" if TEACHER_AUDITED else "auto"

# grounding: referring expressions x perturbations through the VLM client (demo: the simulator)
GROUNDING = config["grounding"]
GSUBSET = GROUNDING["subset"]["name"]
GDATA = GROUNDING["data"]
GDEMO = GDATA["source"] == "demo"
GSIM = bool(config["vlm"]["simulator"]["enabled"])

# Models that preprocess identically share one pixel file, keyed by the preprocessing signature
# (mcdo's experiments and the teacher's embedding models read the same pixel files).
MODELS_USED = list(dict.fromkeys([*(m for e in EXPERIMENTS for m in MCDO[e]["models"]), *TEACHER_MODELS]))
PREPROC_OF = {m: preproc_key(preprocess_spec(m)) for m in MODELS_USED}
SPEC_OF_PREPROC = {PREPROC_OF[m]: preprocess_spec(m) for m in MODELS_USED}


wildcard_constraints:
    run=re.escape(RUN),
    model="|".join(map(re.escape, REGISTRY)),
    preproc="|".join(map(re.escape, SPEC_OF_PREPROC)) or "NONE",
    k=r"\d+",
    p=r"[0-9][0-9.e-]*",
    exp="|".join(EXPERIMENTS),
    kind="input|dropconnect|gaussian",
    subset=re.escape(GSUBSET),


# ---- images -------------------------------------------------------------------------------------


def image_root(wildcards=None):
    """The folder image paths in the manifest are relative to."""
    return f"{RESULTS}/images/demo" if DEMO_IMAGES else config["images"]["source"]


def image_inputs(wildcards):
    """The demo folder (a rule's output) or the selected files of the user's folder."""
    if DEMO_IMAGES:
        return [f"{RESULTS}/images/demo"]
    cfg = config["images"]
    if not Path(cfg["source"]).is_dir():  # checked here, when a job needs the images, so --lint works
        raise ValueError(
            f"config images.source: {cfg['source']!r} is not a folder "
            "(use 'demo' for the built-in demo images, or the path of your image folder)"
        )
    return [str(p) for p in list_images(cfg["source"], cfg["glob"], cfg["limit"], cfg["subset_seed"])]


def preproc_spec(wildcards):
    return SPEC_OF_PREPROC[wildcards.preproc]


def pixels_for_model(wildcards):
    return f"{RESULTS}/pixels/{PREPROC_OF[wildcards.model]}.h5"


# ---- mcdo ---------------------------------------------------------------------------------------


def exp_p(exp):
    return MCDO[exp].get("p", EXP0["p"])


def exp_rates(exp):
    return MCDO[exp]["rates"] if exp == "exp1" else [exp_p(exp)]


def exp_kinds(exp):
    return MCDO[exp]["kinds"] if exp == "exp3" else [MCDO["dropout_kind"]]


def run_files(exp, model, stem):
    """Every trial (or geometry) file of one experiment and model, grouped by what varies:
    the dropout rate for exp1, the dropout kind for exp3, nothing otherwise."""
    groups = {}
    for kind in exp_kinds(exp):
        for i, rate in enumerate(exp_rates(exp)):
            group = "trials"
            if exp == "exp1":  # a rate listed twice is a replicate arm ('p0.01_rep2')
                group = f"p{fmt_p(rate)}"
                n = [fmt_p(r) for r in exp_rates(exp)[: i + 1]].count(fmt_p(rate))
                group += f"_rep{n}" if n > 1 else ""
            elif exp == "exp3":
                group = kind
            groups.setdefault(group, []).extend(
                f"{RESULTS}/mcdo/{exp}/{model}/{kind}/p{fmt_p(rate)}/{stem}{k}.npz"
                for k in range(MCDO[exp]["trials"])
            )
    return groups


def trial_files(wildcards):
    return run_files(wildcards.exp, wildcards.model, "trial")["trials"]


def trial_groups(wildcards):
    return run_files(wildcards.exp, wildcards.model, "trial")


def geometry_files(wildcards):
    return run_files(wildcards.exp, wildcards.model, "geometry")["trials"]


def trials_by_model(wildcards):
    """exp0 trial files of every model, keyed by model (the score-distribution figure)."""
    return {m: run_files("exp0", m, "trial")["trials"] for m in MCDO["exp0"]["models"]}


def geometry_by_model(wildcards):
    return {m: run_files(wildcards.exp, m, "geometry")["trials"] for m in MCDO[wildcards.exp]["models"]}


def figure_runs(wildcards):
    """The trial (or, for exp4, geometry) files a per-model figure reads, flat."""
    stem = "geometry" if wildcards.exp in GEOMETRY_EXPS else "trial"
    return [f for files in run_files(wildcards.exp, wildcards.model, stem).values() for f in files]


def exp_rate(wildcards):
    return exp_p(wildcards.exp)


def exp_settings(wildcards):
    return MCDO[wildcards.exp]


def exp_T(wildcards):
    return sorted(MCDO[wildcards.exp]["T"])


def exp_num_images(wildcards):
    """exp2's pixel file already holds only its images (natural + synthetic): use all of it."""
    return None if wildcards.exp == "exp2" else MCDO[wildcards.exp].get("num_images")


def exp_setting(key):
    """A param function reading one key of the wildcard's experiment config."""
    return lambda wildcards: MCDO[wildcards.exp].get(key)


def run_pixels(wildcards):
    """exp2 runs on natural + synthetic images; every other experiment on the natural ones."""
    sub = "synthetic/" if wildcards.exp == "exp2" else ""
    return f"{RESULTS}/pixels/{sub}{PREPROC_OF[wildcards.model]}.h5"


def model_summaries(wildcards):
    return expand("{results}/mcdo/{exp}/{model}/summary.json", results=RESULTS, exp=wildcards.exp, model=MCDO[wildcards.exp]["models"])


def exp_outputs(exp):
    """The files that complete one experiment: summaries and figures."""
    models = MCDO[exp]["models"]
    out = expand("{r}/mcdo/{exp}/{model}/summary.json", r=RESULTS, exp=exp, model=models)
    fig = f"{RESULTS}/figures/mcdo/{exp}"
    if exp == "exp0":
        out += [f"{RESULTS}/mcdo/exp0/overall_summary.json", f"{fig}_scores.png"]
        out += expand("{fig}_reliability_{model}.png", fig=fig, model=models)
    elif exp == "convergence":
        out += [f"{RESULTS}/mcdo/convergence/overall_summary.json"]
        out += expand("{fig}_{model}.png", fig=fig, model=models)
    elif exp == "exp0b":
        out += [f"{fig}_geometry.png"]
    elif exp in ("exp5_subset", "exp5_full"):
        out += [f"{RESULTS}/mcdo/{exp}/{exp}_overall_summary.json"]
        out += expand("{fig}_ambiguity_{model}.png", fig=fig, model=models)
    else:  # exp1, exp2, exp3, exp4_*: one figure per model
        out += expand("{fig}_{model}.png", fig=fig, model=models)
    return out


def exp0_targets():
    return exp_outputs("exp0")


def phase1_targets():
    return [t for e in PHASE1 for t in exp_outputs(e)] + [f"{RESULTS}/mcdo/gate.json"]


def final_gate(wildcards):
    """gate.json, or the gate after the convergence sweep when the first gate asked for one."""
    gate = read_json(checkpoints.mcdo_gate.get(run=RUN).output[0])
    if gate["decision"] == "convergence_sweep" and not gate["run_phase2"] and "convergence" in MCDO:
        return checkpoints.mcdo_gate_sweep.get(run=RUN).output[0]
    return f"{RESULTS}/mcdo/gate.json"


def phase2_targets(wildcards):
    """Data-dependent: Phase 2 enters the DAG only when the gate (or the config's force flag) says so."""
    gate = read_json(checkpoints.mcdo_gate.get(run=RUN).output[0])
    targets = [f"{RESULTS}/mcdo/gate.json"]
    if gate["decision"] == "convergence_sweep" and "convergence" in MCDO:
        targets += exp_outputs("convergence")
    final = read_json(final_gate(wildcards))
    if final["run_phase2"]:
        targets += [t for e in PHASE2 for t in exp_outputs(e)]
    else:
        targets.append(f"{RESULTS}/mcdo/phase2_not_run.md")
    return targets


# `all` builds every chain in config["chains"]: the static targets are listed up front (a dry run shows
# their jobs); the mcdo chain's Phase 2 comes from the gate checkpoint once it has run.
def anomaly_targets():
    out = f"{RESULTS}/anomaly"
    targets = [
        f"{out}/{name}"
        for name in (
            "metrics.json",
            "per_image.tsv",
            "threshold_sensitivity.tsv",
            "subsampling.tsv",
            "comparison.csv",
            "comparison.md",
            "figures/roc_pr.png",
            "figures/threshold_sensitivity.png",
            "figures/subsampling.png",
        )
    ]
    if config["anomaly"]["classification"]["source"] != "none":
        targets.append(f"{out}/classification/metrics.json")
    return targets


def teacher_truth(wildcards):
    """The truth the heads are evaluated against: the audited human truth when configured."""
    if TEACHER_AUDITED:
        return f"{TEACHER_DIR}/ground_truth_human.json"
    return f"{TEACHER_DIR}/ground_truth_auto.jsonl"


def teacher_targets():
    targets = [
        f"{TEACHER_DIR}/raw.jsonl",
        f"{TEACHER_DIR}/ground_truth_auto.jsonl",
        f"{TEACHER_DIR}/human_sample.json",
        f"{TEACHER_DIR}/label_studio/tasks.json",
        f"{TEACHER_DIR}/label_studio/config.xml",
    ]
    for model in TEACHER_MODELS:
        out = f"{TEACHER_DIR}/{model}"
        targets += [f"{out}/eval.json", f"{out}/figures/confusion.png", f"{out}/figures/attributes.png"]
    return targets


def grounding_dataset(wildcards=None):
    """The dataset files a grounding job reads: the generated demo parquet or the configured local files."""
    if GDEMO:
        return [f"{RESULTS}/grounding/data/demo.parquet"]
    if GDATA["source"] == "parquet":
        path = GDATA["parquet"]["path"]
        if not path:
            raise ValueError("config grounding.data.parquet.path: not set (the RefCOCO parquet file or folder)")
        if not Path(path).exists():
            raise ValueError(f"config grounding.data.parquet.path: {path!r} does not exist")
        return [path]
    cc = GDATA["classic"]
    missing = [k for k in ("refs", "instances", "images") if not cc[k] or not Path(cc[k]).exists()]
    if missing:
        raise ValueError(f"config grounding.data.classic: {missing} not set or not found")
    return [cc["refs"], cc["instances"]]


def grounding_indices_file(wildcards=None):
    """A saved subset to reuse (grounding.subset.indices), or nothing."""
    return [GROUNDING["subset"]["indices"]] if GROUNDING["subset"]["indices"] else []


def grounding_sim_metadata(wildcards=None):
    """The simulator's metadata of the demo scenes, when the demo talks to the simulator."""
    return [f"{RESULTS}/grounding/data/demo_sim"] if GDEMO and GSIM else []


def grounding_coords():
    return resolve_coords(GROUNDING["coords"], config["vlm"]["model"])


def grounding_drift_input(wildcards):
    """drift.parquet when semantic drift is enabled (thresholds, boundary and figures use it if there)."""
    if GROUNDING["drift"]["enabled"]:
        return [f"{RESULTS}/grounding/{wildcards.subset}/drift.parquet"]
    return []


def grounding_targets():
    out = f"{RESULTS}/grounding/{GSUBSET}"
    return [
        f"{RESULTS}/grounding/subsets/{GSUBSET}.json",
        f"{out}/predictions.parquet",
        f"{out}/ious.parquet",
        f"{out}/thresholds.json",
        f"{out}/boundary.json",
        f"{out}/figures/validation.png",
        f"{out}/figures/thresholds.png",
        f"{out}/figures/timing.png",
    ]


def static_targets():
    targets = {
        "mcdo": phase1_targets,
        "anomaly": anomaly_targets,
        "teacher": teacher_targets,
        "grounding": grounding_targets,
    }
    return [t for chain in config["chains"] for t in targets[chain]()]


def gated_targets(wildcards):
    return phase2_targets(wildcards) if "mcdo" in config["chains"] else []

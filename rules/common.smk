# Config validation, input functions and wildcard constraints. Rule files hold rules only.

import re
from pathlib import Path

from snakemake.utils import validate

from vlmrel.configcheck import ConfigInvalid, short_error
from vlmrel.grounding.pipeline import resolve_coords
from vlmrel.images import list_images
from vlmrel.io import read_json
from vlmrel.mcdo import registry as mcdo_registry
from vlmrel.models import REGISTRY, preprocess_spec
from vlmrel.pixels import preproc_key
from vlmrel.mcdo.dropout import KINDS


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

GPU = 1 if config["device"].startswith("cuda") else 0
DEMO_IMAGES = config["images"]["source"] == "demo"


# mcdo: every experiment, target and input function comes from the registry (src/vlmrel/mcdo/registry.py).
MCDO_EXPS = mcdo_registry.configured(MCDO)
EXPERIMENTS = [e.name for e in MCDO_EXPS]
PHASE1 = mcdo_registry.names(MCDO_EXPS, phase=1)
PHASE2 = mcdo_registry.names(MCDO_EXPS, phase=2)
PHASE3 = mcdo_registry.names(MCDO_EXPS, phase=3)
SWEEPS = mcdo_registry.names(MCDO_EXPS, phase="sweep")
GATE_INPUT = mcdo_registry.GATE_INPUT
SWEEP = mcdo_registry.SWEEP
FORCE_PHASE2 = MCDO.get("gate", {}).get("force_phase2", False)
FORCE_PHASE3 = MCDO.get("gate", {}).get("force_phase3", False)
if GATE_INPUT not in MCDO:
    raise ValueError(f"config mcdo: the gate's experiment {GATE_INPUT!r} has no section")


def exps_where(**where):
    """A wildcard constraint: the configured experiments whose registry entry matches ``where``."""
    return "|".join(mcdo_registry.names(MCDO_EXPS, **where)) or "NONE"


# teacher: heads on the image embeddings of registry models; the audited human truth when configured
TEACHER = config["teacher"]
TEACHER_DIR = f"{RESULTS}/teacher"
TEACHER_MODELS = TEACHER["models"]
TEACHER_AUDITED = TEACHER["human"]["audited"]
TEACHER_TRUTH_KIND = "human_audited" if TEACHER_AUDITED else "auto"

# grounding: referring expressions x perturbations through the VLM client (demo: the simulator)
GROUNDING = config["grounding"]
GSUBSET = GROUNDING["subset"]["name"]  # the subset judged (the validation subset with a threshold subset)
GTSUBSET = GROUNDING.get("threshold_subset", {}).get("name")  # where thresholds are chosen; None: GSUBSET
if GTSUBSET == GSUBSET:
    raise ValueError(f"config grounding.threshold_subset.name: {GTSUBSET!r} is also grounding.subset.name")
GDATA = GROUNDING["data"]
GDEMO = GDATA["source"] == "demo"
GSIM = bool(config["vlm"]["simulator"]["enabled"])

# Models that preprocess identically share one pixel file, keyed by the preprocessing signature
# (mcdo's experiments and the teacher's embedding models read the same pixel files).
MODELS_USED = list(dict.fromkeys([*(m for e in EXPERIMENTS for m in MCDO[e].get("models", [])), *TEACHER_MODELS]))
PREPROC_OF = {m: preproc_key(preprocess_spec(m)) for m in MODELS_USED}
SPEC_OF_PREPROC = {PREPROC_OF[m]: preprocess_spec(m) for m in MODELS_USED}


wildcard_constraints:
    run=re.escape(RUN),
    model="|".join(map(re.escape, REGISTRY)),
    preproc="|".join(map(re.escape, SPEC_OF_PREPROC)) or "NONE",
    k=r"\d+",
    p=r"[0-9][0-9.e-]*",
    exp="|".join(EXPERIMENTS),
    kind="|".join(KINDS),
    subset="|".join(re.escape(n) for n in (GSUBSET, GTSUBSET) if n),


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


def exp_arms(exp, model):
    """The experiment's arms for one model, each record with its K trial (or geometry) files."""
    entry = mcdo_registry.EXPERIMENTS[exp]
    return [
        {
            **arm.record(),
            "files": mcdo_registry.arm_files(RESULTS, exp, model, arm, entry.stem, entry.n_files(MCDO[exp])),
        }
        for arm in entry.arms(MCDO[exp], MCDO)
    ]


def exp_files(exp, model):
    """Every distinct trial (or geometry) file of one experiment and model (replicate arms share files)."""
    return list(dict.fromkeys(f for arm in exp_arms(exp, model) for f in arm["files"]))


def run_files(wildcards):
    return exp_files(wildcards.exp, wildcards.model)


def arms_param(wildcards):
    return exp_arms(wildcards.exp, wildcards.model)


def runs_by_model(wildcards):
    """Every model's files of the wildcard's experiment, keyed by model (the over-model figures)."""
    return {m: exp_files(wildcards.exp, m) for m in MCDO[wildcards.exp]["models"]}


def exp_models(wildcards):
    return MCDO[wildcards.exp]["models"]


def exp_rate(wildcards):
    return mcdo_registry.exp_rate(MCDO[wildcards.exp], MCDO)


def exp_settings(wildcards):
    return MCDO[wildcards.exp]


def exp_T(wildcards):
    return sorted(MCDO[wildcards.exp]["T"])


def exp_num_images(wildcards):
    """A synthetic or ablation pixel file already holds only its experiment's images (natural + their
    versions): use all."""
    if mcdo_registry.EXPERIMENTS[wildcards.exp].pixels != "natural":
        return None
    return MCDO[wildcards.exp].get("num_images")


def exp_prompt_file(wildcards):
    """A text experiment's user prompt file, an input when configured (its content then triggers reruns)."""
    path = MCDO[wildcards.exp].get("prompt_file")
    return [path] if path else []


def exp_is_geometry(wildcards):
    return mcdo_registry.EXPERIMENTS[wildcards.exp].job == "geometry"


def exp_setting(key):
    """A param function reading one key of the wildcard's experiment config."""
    return lambda wildcards: MCDO[wildcards.exp].get(key)


def synthetic_setting(key):
    """One key of the config of the experiment that runs on synthetic pixels (None without one)."""
    exps = mcdo_registry.names(MCDO_EXPS, pixels="synthetic")
    return MCDO[exps[0]].get(key) if exps else None


def experiment_caption(wildcards):
    """The caption text of an experiment's own figure (its registry entry names the file)."""
    return Path(workflow.basedir, "report", mcdo_registry.EXPERIMENTS[wildcards.exp].caption).read_text().strip()


def overall_caption(wildcards):
    """The caption text of an experiment's figure over models."""
    return Path(workflow.basedir, "report", mcdo_registry.EXPERIMENTS[wildcards.exp].overall_caption).read_text().strip()


def run_pixels(wildcards):
    """The pixel file of the wildcard's experiment: natural, natural + synthetic, or natural + ablation."""
    kind = mcdo_registry.EXPERIMENTS[wildcards.exp].pixels
    sub = "" if kind == "natural" else f"{kind}/"
    return f"{RESULTS}/pixels/{sub}{PREPROC_OF[wildcards.model]}.h5"


def ablation_setting(key):
    """One key of the config of the experiment that runs on ablation pixels (None without one)."""
    exps = mcdo_registry.names(MCDO_EXPS, pixels="ablation")
    return MCDO[exps[0]].get(key) if exps else None


def scores_input(wildcards):
    """The per-model scores file of an experiment with a scores job (registry `scores`), else nothing."""
    kind = mcdo_registry.EXPERIMENTS[wildcards.exp].scores
    return [f"{RESULTS}/mcdo/{wildcards.exp}/{wildcards.model}/{kind}.npz"] if kind else []


def mot_costs(wildcards):
    """The MOT experiment's cost JSON: the user's (config cost_json) or the generated demo sequence."""
    path = MCDO[wildcards.exp].get("cost_json")
    if path:
        if not Path(path).is_file():
            raise ValueError(f"config mcdo.{wildcards.exp}.cost_json: {path!r} is not a file")
        return path
    return f"{RESULTS}/mcdo/{wildcards.exp}/demo_costs.json"


def model_summaries(wildcards):
    return expand("{results}/mcdo/{exp}/{model}/summary.json", results=RESULTS, exp=wildcards.exp, model=MCDO[wildcards.exp]["models"])


def exp_outputs(exp):
    """The files that complete one experiment: summaries and figures."""
    return mcdo_registry.outputs(RESULTS, mcdo_registry.EXPERIMENTS[exp], MCDO[exp].get("models", []))


def exp0_targets():
    return exp_outputs(GATE_INPUT)


def phase1_targets():
    return [t for e in PHASE1 for t in exp_outputs(e)] + [f"{RESULTS}/mcdo/gate.json"]


def gate_input(wildcards=None):
    return f"{RESULTS}/mcdo/{GATE_INPUT}/overall_summary.json"


def gate_checks(wildcards=None):
    """The overall summaries of Phase 1's ambiguity experiments: recorded by the gate as checks, not blockers."""
    return [f"{RESULTS}/mcdo/{e}/{e}_overall_summary.json" for e in mcdo_registry.names(MCDO_EXPS, phase=1, summary="ambiguity")]


def sweep_input(wildcards=None):
    return f"{RESULTS}/mcdo/{SWEEP}/overall_summary.json"


def final_gate(wildcards):
    """gate.json, or the gate after the sweep when the first gate asked for one."""
    gate = read_json(checkpoints.mcdo_gate.get(run=RUN).output[0])
    if gate["decision"] == "convergence_sweep" and SWEEP in MCDO:  # forced or not: the sweep is recorded
        return checkpoints.mcdo_gate_sweep.get(run=RUN).output[0]
    return f"{RESULTS}/mcdo/gate.json"


def gated_targets_of(phases):
    """Data-dependent targets of the gated phases: they enter the DAG only when the gate (or the config's
    force flag) says so; the sweep and its gate when the first gate asked for one."""

    def targets(wildcards):
        gate = read_json(checkpoints.mcdo_gate.get(run=RUN).output[0])
        out = [f"{RESULTS}/mcdo/gate.json"]
        if gate["decision"] == "convergence_sweep":
            out += [t for e in SWEEPS for t in exp_outputs(e)]
        final_path = final_gate(wildcards)
        out.append(final_path)
        if read_json(final_path)["run_phase2"]:
            out += [t for ph in phases for e in mcdo_registry.names(MCDO_EXPS, phase=ph) for t in exp_outputs(e)]
        else:
            out.append(f"{RESULTS}/mcdo/phase2_not_run.md")
        return list(dict.fromkeys(out))

    return targets


phase2_targets = gated_targets_of([2])
phase4_targets = gated_targets_of([4])


def run_phase3(wildcards):
    """Phase 3 runs when the (final) gate's own decision is to proceed, or when mcdo.gate.force_phase3 forces it."""
    return read_json(final_gate(wildcards))["decision"] == "proceed" or FORCE_PHASE3


def phase3_targets(wildcards):
    """Data-dependent, like Phase 2: Phase 3 enters the DAG only when the gate (or its force flag) says so."""
    if run_phase3(wildcards):
        return [f"{RESULTS}/mcdo/gate.json"] + [t for e in PHASE3 for t in exp_outputs(e)]
    return [f"{RESULTS}/mcdo/gate.json", f"{RESULTS}/mcdo/phase3_not_run.md"]


def later_targets(wildcards):
    """Every phase after the gate (registry.GATED_PHASES, and Phase 3): what `mcdo` and `all` build."""
    return list(dict.fromkeys(gated_targets_of(mcdo_registry.GATED_PHASES)(wildcards) + phase3_targets(wildcards)))


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
    for model in config["anomaly"]["image_ood"]["models"]:
        targets += [f"{out}/image_ood/{model}/metrics.json", f"{out}/image_ood/{model}/per_image.tsv"]
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


def grounding_subset_cfg(name):
    """A named subset's settings (n, seed, allocation, indices, perturbations): subset or threshold_subset."""
    if name == GSUBSET:
        return {**GROUNDING["subset"], "perturbations": GROUNDING["perturbations"]}
    if name == GTSUBSET:
        return GROUNDING["threshold_subset"]
    known = [n for n in (GSUBSET, GTSUBSET) if n]
    raise ValueError(f"grounding: no subset named {name!r} in config (configured: {known})")


def grounding_indices_file(wildcards):
    """A saved subset to reuse (the subset's `indices`), or nothing."""
    indices = grounding_subset_cfg(wildcards.subset)["indices"]
    return [indices] if indices else []


def grounding_exclude_file(wildcards):
    """The threshold subset, which the validation subset is drawn apart from (disjoint)."""
    if GTSUBSET and wildcards.subset == GSUBSET:
        return [f"{RESULTS}/grounding/subsets/{GTSUBSET}.json"]
    return []


def grounding_thresholds_input(wildcards):
    """The thresholds.json a subset is classified with: the threshold subset's (out-of-sample) or its own."""
    chosen_on = GTSUBSET if GTSUBSET and wildcards.subset == GSUBSET else wildcards.subset
    return f"{RESULTS}/grounding/{chosen_on}/thresholds.json"


def grounding_predict_after(wildcards):
    """The validation subset's requests start after the threshold subset's: one job at a time talks to
    the VLM server (vlm.concurrency holds per job) and opens the response cache (two jobs creating
    the SQLite cache at once fail with 'database is locked')."""
    if GTSUBSET and wildcards.subset == GSUBSET:
        return [f"{RESULTS}/grounding/{GTSUBSET}/vlm_stats.json"]
    return []


def grounding_own_thresholds(wildcards):
    """A subset's own thresholds.json when it is classified out-of-sample (its in-sample rates beside)."""
    if GTSUBSET and wildcards.subset == GSUBSET:
        return [f"{RESULTS}/grounding/{wildcards.subset}/thresholds.json"]
    return []


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
    targets = []
    for name in (GTSUBSET, GSUBSET):
        if not name:
            continue
        out = f"{RESULTS}/grounding/{name}"
        targets += [
            f"{RESULTS}/grounding/subsets/{name}.json",
            f"{out}/predictions.parquet",
            f"{out}/ious.parquet",
            f"{out}/thresholds.json",
            f"{out}/boundary.json",
            f"{out}/figures/validation.png",
            f"{out}/figures/thresholds.png",
            f"{out}/figures/timing.png",
            f"{out}/tables/thresholds.html",
            f"{out}/tables/boundary.html",
            f"{out}/tables/checks.html",
        ]
    targets.append(f"{RESULTS}/grounding/{GSUBSET}/tables/in_vs_out_of_sample.html")
    return targets


def static_targets():
    targets = {
        "mcdo": phase1_targets,
        "anomaly": anomaly_targets,
        "teacher": teacher_targets,
        "grounding": grounding_targets,
    }
    return [t for chain in config["chains"] for t in targets[chain]()]


def gated_targets(wildcards):
    return later_targets(wildcards) if "mcdo" in config["chains"] else []


# ---- anomaly ----------------------------------------------------------------------------------------
# Where the anomaly chain's inputs come from is decided once, here, from anomaly.source:
#   logits                        - anomaly.logits: HDF5 logits + labels per split made elsewhere (no
#                                   model here, so HEAT falls back to the energy score)
#   demo | images | streethazards - images + labels per split (generated, anomaly.images, or imported
#                                   from the published layout); logits from the model run here
ANOMALY = config["anomaly"]
ANOMALY_HAS_MODEL = ANOMALY["source"] != "logits"
ANOMALY_LOGITS = ANOMALY["logits"] if not ANOMALY_HAS_MODEL else "results/{run}/anomaly/logits/{split}.h5"
ANOMALY_DATA = {
    "demo": "results/{run}/anomaly/data/{split}.h5",
    "streethazards": "results/{run}/anomaly/streethazards/{split}.h5",
    "images": ANOMALY["images"],
    "logits": None,
}[ANOMALY["source"]]


def _anomaly_path(pattern, wildcards, split):
    return pattern.replace("{run}", wildcards.run).replace("{split}", split)


def anomaly_logits(split=None):
    """Input function: the logits file of `split` (default: the rule's {split} wildcard)."""

    def inner(wildcards):
        return _anomaly_path(ANOMALY_LOGITS, wildcards, split or wildcards.split)

    return inner


def anomaly_data(wildcards):
    """Images + labels of the rule's {split}, for the model run here."""
    return _anomaly_path(ANOMALY_DATA, wildcards, wildcards.split)


def anomaly_checkpoint(wildcards):
    if ANOMALY["source"] == "demo":
        return f"results/{wildcards.run}/anomaly/model/segnet.safetensors"
    return ANOMALY["model"]["checkpoint"] or []


def anomaly_subsampling_methods():
    return ANOMALY["subsampling"]["methods"] or ANOMALY["methods"]


def anomaly_sml(methods):
    """Input function: the SML statistics when `methods` has sml."""

    def inner(wildcards):
        return f"results/{wildcards.run}/anomaly/sml_stats.json" if "sml" in methods else []

    return inner


def anomaly_heat_stats(wildcards):
    """HEAT's feature statistics for the test logits when HEAT is scored and a model runs here."""
    wanted = "heat" in ANOMALY["methods"] + anomaly_subsampling_methods()
    if wildcards.split == "test" and wanted and ANOMALY_HAS_MODEL:
        return f"results/{wildcards.run}/anomaly/heat/feature_stats.safetensors"
    return []


def anomaly_heat_stats_data(wildcards):
    return _anomaly_path(ANOMALY_DATA, wildcards, ANOMALY["heat"]["stats_split"])


def anomaly_classification_logits(split):
    """Input function: per-image logits of `split` (val only when sml is scored)."""

    def inner(wildcards):
        cl = ANOMALY["classification"]
        if split == "val" and "sml" not in ANOMALY["methods"]:
            return []
        if cl["source"] == "file":
            return cl["logits"].replace("{split}", split)
        return f"results/{wildcards.run}/anomaly/classification/image_logits_{split}.h5"

    return inner

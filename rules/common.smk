# Config validation, input functions and wildcard constraints. Rule files hold rules only.

import re
from pathlib import Path

from snakemake.utils import validate

from vlmrel.images import list_images
from vlmrel.models import REGISTRY, preprocess_spec
from vlmrel.pixels import preproc_key


validate(config, schema="../config/schema.yaml", set_default=True)

RUN = config["run"]
RESULTS = f"results/{RUN}"
MCDO = config["mcdo"]
EXP0 = MCDO["exp0"]
GPU = 1 if config["device"].startswith("cuda") else 0
DEMO_IMAGES = config["images"]["source"] == "demo"

if not DEMO_IMAGES and not Path(config["images"]["source"]).is_dir():
    raise ValueError(
        f"config images.source: {config['images']['source']!r} is not a folder "
        "(use 'demo' for the built-in demo images, or the path of your image folder)"
    )


def fmt_p(p):
    """Dropout rate as it appears in paths: 0.01 -> '0.01'."""
    return f"{float(p):g}"


# Models that preprocess identically share one pixel file, keyed by the preprocessing signature.
MODELS_USED = list(dict.fromkeys(EXP0["models"]))
PREPROC_OF = {m: preproc_key(preprocess_spec(m)) for m in MODELS_USED}
SPEC_OF_PREPROC = {PREPROC_OF[m]: preprocess_spec(m) for m in MODELS_USED}


wildcard_constraints:
    run=re.escape(RUN),
    model="|".join(map(re.escape, REGISTRY)),
    preproc="|".join(map(re.escape, SPEC_OF_PREPROC)) or "NONE",
    k=r"\d+",
    p=r"[0-9][0-9.e-]*",


# ---- images -------------------------------------------------------------------------------------


def image_root(wildcards=None):
    """The folder image paths in the manifest are relative to."""
    return f"{RESULTS}/images/demo" if DEMO_IMAGES else config["images"]["source"]


def image_inputs(wildcards):
    """The demo folder (a rule's output) or the selected files of the user's folder."""
    if DEMO_IMAGES:
        return [f"{RESULTS}/images/demo"]
    cfg = config["images"]
    return [str(p) for p in list_images(cfg["source"], cfg["glob"], cfg["limit"], cfg["subset_seed"])]


def preproc_spec(wildcards):
    return SPEC_OF_PREPROC[wildcards.preproc]


def pixels_for_model(wildcards):
    return f"{RESULTS}/pixels/{PREPROC_OF[wildcards.model]}.h5"


# ---- mcdo ---------------------------------------------------------------------------------------


def exp0_trials(wildcards):
    return exp0_trials_by_model(wildcards)[wildcards.model]


def exp0_trials_by_model(wildcards):
    """Trial files of every exp0 model, keyed by model (the score-distribution figure reads them all)."""
    return {
        m: expand("{results}/mcdo/exp0/{m}/p{p}/trial{k}.npz", results=RESULTS, m=m, p=fmt_p(EXP0["p"]), k=range(EXP0["trials"]))
        for m in MODELS_USED
    }


def exp0_summaries(wildcards=None):
    return expand("{results}/mcdo/exp0/{model}/summary.json", results=RESULTS, model=MODELS_USED)


def exp0_figures():
    return expand(
        "{results}/figures/mcdo/exp0_reliability_{model}.png", results=RESULTS, model=MODELS_USED
    ) + [f"{RESULTS}/figures/mcdo/exp0_scores.png"]


def mcdo_targets():
    return [f"{RESULTS}/mcdo/exp0/overall_summary.json", *exp0_figures()]


def phase1_targets():
    return mcdo_targets()


def all_targets():
    targets = {"mcdo": mcdo_targets}
    return [t for chain in config["chains"] for t in targets[chain]()]

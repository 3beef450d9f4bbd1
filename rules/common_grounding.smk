# Input functions of the grounding chain. Written while the chain is built; merged into common.smk after.

from vlmrel.grounding.pipeline import resolve_coords

if "grounding" not in config:
    # a config without the section still gets every default (the demo grid, the demo data)
    config["grounding"] = {}
    validate(config, schema="../config/schema.yaml", set_default=True)

GROUNDING = config["grounding"]
GSUBSET = GROUNDING["subset"]["name"]
GDATA = GROUNDING["data"]
GDEMO = GDATA["source"] == "demo"
GSIM = bool(config.get("vlm", {}).get("simulator", {}).get("enabled", False))


wildcard_constraints:
    subset=re.escape(GSUBSET),


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
    return resolve_coords(GROUNDING["coords"], config.get("vlm", {}).get("model", ""))


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

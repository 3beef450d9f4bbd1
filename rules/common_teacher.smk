# Input functions of the teacher chain. Written while the chain is built; merged into common.smk after.

import yaml


# A config without a teacher section still parses (other chains' runs): fill it with the defaults.
def _schema_defaults(node):
    """The defaults a schema object node declares, nested objects included."""
    out = {}
    for key, sub in node.get("properties", {}).items():
        if "default" in sub:
            value = sub["default"]
            out[key] = {**value, **_schema_defaults(sub)} if isinstance(value, dict) and "properties" in sub else value
    return out


if "teacher" not in config:
    with open(Path(workflow.basedir) / "config" / "schemas" / "teacher.yaml") as _fh:
        config["teacher"] = _schema_defaults(yaml.safe_load(_fh)["$defs"]["teacher"])

TEACHER = config["teacher"]
TEACHER_DIR = f"{RESULTS}/teacher"
TEACHER_MODELS = TEACHER["models"]
TEACHER_AUDITED = TEACHER["human"]["audited"]
TEACHER_TRUTH_KIND = "human_audited" if TEACHER_AUDITED else "auto"

# The embedding models read the pixel files of images.smk; models the mcdo chain does not use add
# their preprocessing here (the preproc wildcard's constraint is widened to match).
for _m in TEACHER_MODELS:
    if _m not in PREPROC_OF:
        PREPROC_OF[_m] = preproc_key(preprocess_spec(_m))
        SPEC_OF_PREPROC[PREPROC_OF[_m]] = preprocess_spec(_m)


wildcard_constraints:
    preproc="|".join(map(re.escape, SPEC_OF_PREPROC)) or "NONE",


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

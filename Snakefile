# vlmrel: how far the answers of vision and vision-language models can be trusted.
#
#   snakemake -c2 --configfile config/demo.yaml            # everything the config's chains ask for
#   snakemake -c2 mcdo --configfile config/demo.yaml       # one chain (targets below); targets go
#                                                          # before --configfile, which takes every
#                                                          # word after it as a config file
#   snakemake -n / --rulegraph / --dag / --report report.html
#
# Rules are wiring; the logic lives in src/vlmrel (see docs/architecture.md).

import os

from snakemake.utils import min_version

from vlmrel.vlm.config import redacted as redacted_vlm  # params carry no endpoint secret

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/images.smk"
include: "rules/mcdo.smk"
include: "rules/anomaly.smk"
include: "rules/teacher.smk"
include: "rules/grounding.smk"


report: "report/workflow.rst"


# ---- cluster execution (profiles/slurm/README.md) ----------------------------------------------
# Figures, summaries and notes take seconds: on a cluster they run inside snakemake's own process
# instead of waiting for a scheduler slot. The gate checkpoint stays a cluster job (it is one job).
localrules:
    mcdo_summary,
    mcdo_experiment_summary,
    mcdo_overall,
    mcdo_ambiguity_overall,
    mcdo_phase2_note,
    mcdo_figure_reliability,
    mcdo_figure_scores,
    mcdo_figure_convergence,
    mcdo_figure_geometry,
    mcdo_figure_experiment,
    mcdo_figure_ambiguity,
    anomaly_comparison,
    anomaly_figure_roc_pr,
    anomaly_figure_threshold,
    anomaly_figure_subsampling,
    teacher_eval,
    teacher_figures,
    grounding_figures,
    grounding_tables,
    grounding_in_vs_out,


# With device cuda, every rule that asks for a GPU (resources: gpu) goes to the site's GPU
# partition, with its GPU model and CPUs per GPU; the site names them in the environment, never
# here. With device cpu nothing is added: no job asks for the GPU partition or a GPU model.
if GPU:
    _site_gpu = {
        "slurm_partition": os.environ.get("VLMREL_SLURM_GPU_PARTITION"),
        "gpu_model": os.environ.get("VLMREL_SLURM_GPU_MODEL"),
        "cpus_per_gpu": int(os.environ.get("VLMREL_SLURM_CPUS_PER_GPU") or 8),
    }
    for _rule in workflow.rules:
        _gpu = _rule.resources.get("gpu")
        if _gpu.is_evaluable() or _gpu.value:  # a callable is taken to ask for one
            _rule.resources.update({k: v for k, v in _site_gpu.items() if v})


rule all:
    default_target: True
    input:
        static_targets(),
        gated_targets,


rule exp0:
    input:
        exp0_targets(),


rule phase1:
    input:
        phase1_targets(),


rule phase2:
    input:
        phase2_targets,


rule phase3:
    input:
        phase3_targets,


rule phase4:
    input:
        phase4_targets,


rule mcdo:
    input:
        phase1_targets(),
        later_targets,


rule anomaly:
    input:
        anomaly_targets(),


rule teacher:
    input:
        teacher_targets(),


rule grounding:
    input:
        grounding_targets(),

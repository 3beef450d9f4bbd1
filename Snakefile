# vlmrel: how far the answers of vision and vision-language models can be trusted.
#
#   snakemake -c2 --configfile config/demo.yaml            # everything the config's chains ask for
#   snakemake -c2 --configfile config/demo.yaml mcdo       # one chain (targets below)
#   snakemake -n / --rulegraph / --dag / --report report.html
#
# Rules are wiring; the logic lives in src/vlmrel (see docs/architecture.md).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/images.smk"
include: "rules/mcdo.smk"
include: "rules/anomaly.smk"
include: "rules/teacher.smk"
include: "rules/grounding.smk"


report: "report/workflow.rst"


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


rule mcdo:
    input:
        phase1_targets(),
        phase2_targets,
        phase3_targets,


rule anomaly:
    input:
        anomaly_targets(),


rule teacher:
    input:
        teacher_targets(),


rule grounding:
    input:
        grounding_targets(),

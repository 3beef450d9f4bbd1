# grounding (seeds 000, 001): refexp samples x perturbation grid -> predictions.parquet -> ious ->
# thresholds.json (exact MI optimum vs the seed's L-BFGS-B vs baseline) -> boundary.json -> figures.
#
# Sources (config grounding.data.source):
#   demo    - generated scenes with referring expressions and exact boxes (SYNTHETIC), registered with
#             the VLM simulator so it can answer (the simulator is not a model)
#   parquet - the Hugging Face RefCOCO parquet layout (lmms-lab/RefCOCO val)
#   classic - refs(unc).p + instances.json + COCO images
# Paths: results/{run}/grounding/subsets/{subset}.json (the named subset, as indices) and
# results/{run}/grounding/{subset}/... for everything computed on it (its grid included).
# Two named subsets (config grounding.threshold_subset and grounding.subset): thresholds are chosen on
# the threshold subset (seed 001: 51 x 5x5); the validation subset (seed 000: 99 others x 10x10) is
# drawn disjoint from it and its boundary.json, tables and figures read the threshold subset's
# thresholds.json (out-of-sample), with its own optimum's rates beside (in-sample, optimistic).


rule grounding_demo_data:
    output:
        parquet="results/{run}/grounding/data/demo.parquet",
        sim=directory("results/{run}/grounding/data/demo_sim"),
    params:
        n=GDATA["demo"]["n_scenes"],
        seed=GDATA["demo"]["seed"],
        size=[GDATA["demo"]["width"], GDATA["demo"]["height"]],
    log:
        "results/{run}/logs/grounding/demo_data.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_demo_data.py"


rule grounding_subset:
    input:
        dataset=grounding_dataset,
        indices=grounding_indices_file,
        exclude=grounding_exclude_file,
    output:
        "results/{run}/grounding/subsets/{subset}.json",
    wildcard_constraints:
        subset=re.escape(GSUBSET),
    params:
        data=GDATA,
        n=lambda wildcards: grounding_subset_cfg(wildcards.subset)["n"],
        seed=lambda wildcards: grounding_subset_cfg(wildcards.subset)["seed"],
        allocation=lambda wildcards: grounding_subset_cfg(wildcards.subset)["allocation"],
        difficulty=GROUNDING["difficulty"],
    log:
        "results/{run}/logs/grounding/subset_{subset}.log",
    threads: 1
    resources:
        mem_mb=GROUNDING["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_subset.py"


# The threshold subset: the same job without the exclusion (a rule cannot need its own output)
use rule grounding_subset as grounding_threshold_subset with:
    input:
        dataset=grounding_dataset,
        indices=grounding_indices_file,
        exclude=[],
    wildcard_constraints:
        subset=re.escape(GTSUBSET) if GTSUBSET else "(?!x)x",


rule grounding_grid:
    output:
        "results/{run}/grounding/{subset}/grid.tsv",
    params:
        perturbations=lambda wildcards: grounding_subset_cfg(wildcards.subset)["perturbations"],
    log:
        "results/{run}/logs/grounding/{subset}/grid.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_grid.py"


rule grounding_predict:
    input:
        dataset=grounding_dataset,
        subset="results/{run}/grounding/subsets/{subset}.json",
        grid="results/{run}/grounding/{subset}/grid.tsv",
        sim=grounding_sim_metadata,
        after=grounding_predict_after,
    output:
        predictions="results/{run}/grounding/{subset}/predictions.parquet",
        stats="results/{run}/grounding/{subset}/vlm_stats.json",
    params:
        data=GDATA,
        vlm=config.get("vlm", {}),
        prompt=lambda wildcards: GROUNDING["prompt"],  # a function: the template holds {expression}
        schema=GROUNDING["schema"],
        coords=grounding_coords(),
        smart_resize=GROUNDING["coords"]["smart_resize"],
        seed=GROUNDING["seed"],
        chunk_samples=GROUNDING["chunk_samples"],
    log:
        "results/{run}/logs/grounding/{subset}/predict.log",
    benchmark:
        "results/{run}/benchmarks/grounding/{subset}/predict.tsv"
    threads: 1
    resources:
        mem_mb=GROUNDING["mem_mb"],
    conda:
        "../envs/vlm.yaml"
    script:
        "../scripts/grounding_predict.py"


rule grounding_ious:
    input:
        predictions="results/{run}/grounding/{subset}/predictions.parquet",
        subset="results/{run}/grounding/subsets/{subset}.json",
        grid="results/{run}/grounding/{subset}/grid.tsv",
    output:
        "results/{run}/grounding/{subset}/ious.parquet",
    log:
        "results/{run}/logs/grounding/{subset}/ious.log",
    threads: 1
    resources:
        mem_mb=GROUNDING["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_ious.py"


rule grounding_drift:
    input:
        predictions="results/{run}/grounding/{subset}/predictions.parquet",
        subset="results/{run}/grounding/subsets/{subset}.json",
        grid="results/{run}/grounding/{subset}/grid.tsv",
        dataset=grounding_dataset if GROUNDING["drift"]["region"]["enabled"] else [],
    output:
        drift="results/{run}/grounding/{subset}/drift.parquet",
        summary="results/{run}/grounding/{subset}/drift.json",
    params:
        embedder=GROUNDING["drift"]["embedder"],
        text=GROUNDING["drift"]["text"],
        vlm=config.get("vlm", {}) if GROUNDING["drift"]["embedder"]["kind"] != "minilm" else {},
        region=GROUNDING["drift"]["region"],
        data=GDATA,
        seed=GROUNDING["seed"],
    log:
        "results/{run}/logs/grounding/{subset}/drift.log",
    benchmark:
        "results/{run}/benchmarks/grounding/{subset}/drift.tsv"
    threads: 1
    resources:
        mem_mb=GROUNDING["mem_mb"],
    conda:
        "../envs/vlm.yaml"
    script:
        "../scripts/grounding_drift.py"


rule grounding_thresholds:
    input:
        ious="results/{run}/grounding/{subset}/ious.parquet",
        drift=grounding_drift_input,
    output:
        "results/{run}/grounding/{subset}/thresholds.json",
    params:
        signals=GROUNDING["thresholds"]["signals"],
        k=GROUNDING["thresholds"]["k"],
        n_bins=GROUNDING["thresholds"]["n_bins"],
        binning=GROUNDING["thresholds"]["binning"],
        lbfgsb_restarts=GROUNDING["thresholds"]["lbfgsb_restarts"],
        seed=GROUNDING["thresholds"]["seed"],
    log:
        "results/{run}/logs/grounding/{subset}/thresholds.log",
    benchmark:
        "results/{run}/benchmarks/grounding/{subset}/thresholds.tsv"
    threads: 1
    resources:
        mem_mb=GROUNDING["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_thresholds.py"


rule grounding_boundary:
    input:
        ious="results/{run}/grounding/{subset}/ious.parquet",
        drift=grounding_drift_input,
        thresholds=grounding_thresholds_input,
        own_thresholds=grounding_own_thresholds,
    output:
        "results/{run}/grounding/{subset}/boundary.json",
    params:
        source=GROUNDING["boundary"]["thresholds"],
        semantic_source=GROUNDING["boundary"]["semantic_thresholds"],
        thresholds_subset=lambda wildcards: GTSUBSET if wildcards.subset == GSUBSET else None,
    log:
        "results/{run}/logs/grounding/{subset}/boundary.log",
    threads: 1
    resources:
        mem_mb=GROUNDING["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_boundary.py"


rule grounding_figures:
    input:
        ious="results/{run}/grounding/{subset}/ious.parquet",
        drift=grounding_drift_input,
        thresholds=grounding_thresholds_input,
        boundary="results/{run}/grounding/{subset}/boundary.json",
        predictions="results/{run}/grounding/{subset}/predictions.parquet",
        stats="results/{run}/grounding/{subset}/vlm_stats.json",
    output:
        validation=report(
            "results/{run}/grounding/{subset}/figures/validation.png",
            caption="../report/grounding/validation.rst",
            category="grounding",
            subcategory="{subset}",
            labels={"figure": "validation (six panels)"},
        ),
        thresholds=report(
            "results/{run}/grounding/{subset}/figures/thresholds.png",
            caption="../report/grounding/thresholds.rst",
            category="grounding",
            subcategory="{subset}",
            labels={"figure": "threshold comparison"},
        ),
        timing=report(
            "results/{run}/grounding/{subset}/figures/timing.png",
            caption="../report/grounding/timing.rst",
            category="grounding",
            subcategory="{subset}",
            labels={"figure": "request timing"},
        ),
    params:
        definition=GROUNDING["boundary"]["figure_definition"],
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/grounding/{subset}/figures.log",
    threads: 1
    resources:
        mem_mb=GROUNDING["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_figures.py"


rule grounding_tables:
    input:
        thresholds=grounding_thresholds_input,
        boundary="results/{run}/grounding/{subset}/boundary.json",
    output:
        thresholds=report(
            "results/{run}/grounding/{subset}/tables/thresholds.html",
            caption="../report/grounding/thresholds_table.rst",
            category="grounding",
            subcategory="{subset}",
            labels={"table": "thresholds.json"},
        ),
        boundary=report(
            "results/{run}/grounding/{subset}/tables/boundary.html",
            caption="../report/grounding/boundary_table.rst",
            category="grounding",
            subcategory="{subset}",
            labels={"table": "boundary.json"},
        ),
        checks=report(
            "results/{run}/grounding/{subset}/tables/checks.html",
            caption="../report/grounding/checks_table.rst",
            category="grounding",
            subcategory="{subset}",
            labels={"table": "the seeds' checks"},
        ),
    log:
        "results/{run}/logs/grounding/{subset}/tables.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_tables.py"


rule grounding_in_vs_out:
    input:
        validation=f"results/{{run}}/grounding/{GSUBSET}/boundary.json",
        threshold=[f"results/{{run}}/grounding/{GTSUBSET}/boundary.json"] if GTSUBSET else [],
        subsets=[f"results/{{run}}/grounding/subsets/{n}.json" for n in (GTSUBSET, GSUBSET) if n],
    output:
        json=f"results/{{run}}/grounding/{GSUBSET}/in_vs_out_of_sample.json",
        html=report(
            f"results/{{run}}/grounding/{GSUBSET}/tables/in_vs_out_of_sample.html",
            caption="../report/grounding/in_vs_out.rst",
            category="grounding",
            labels={"table": "in-sample vs out-of-sample"},
        ),
    log:
        "results/{run}/logs/grounding/in_vs_out.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/grounding_in_vs_out.py"

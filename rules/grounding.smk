# grounding (seeds 000, 001): refexp samples x perturbation grid -> predictions.parquet -> ious ->
# thresholds.json (exact MI optimum vs the seed's L-BFGS-B vs baseline) -> boundary.json -> figures.
#
# Sources (config grounding.data.source):
#   demo    - generated scenes with referring expressions and exact boxes (SYNTHETIC), registered with
#             the VLM simulator so it can answer (the simulator is not a model)
#   parquet - the Hugging Face RefCOCO parquet layout (lmms-lab/RefCOCO val)
#   classic - refs(unc).p + instances.json + COCO images
# Paths: results/{run}/grounding/subsets/{subset}.json (the named subset, as indices) and
# results/{run}/grounding/{subset}/... for everything computed on it.


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
    output:
        "results/{run}/grounding/subsets/{subset}.json",
    params:
        data=GDATA,
        n=GROUNDING["subset"]["n"],
        seed=GROUNDING["subset"]["seed"],
        allocation=GROUNDING["subset"]["allocation"],
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


rule grounding_grid:
    output:
        "results/{run}/grounding/grid.tsv",
    params:
        perturbations=GROUNDING["perturbations"],
    log:
        "results/{run}/logs/grounding/grid.log",
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
        grid="results/{run}/grounding/grid.tsv",
        sim=grounding_sim_metadata,
    output:
        predictions="results/{run}/grounding/{subset}/predictions.parquet",
        stats="results/{run}/grounding/{subset}/vlm_stats.json",
    params:
        data=GDATA,
        vlm=redacted_vlm(config.get("vlm")),
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
        grid="results/{run}/grounding/grid.tsv",
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
        grid="results/{run}/grounding/grid.tsv",
        dataset=grounding_dataset if GROUNDING["drift"]["region"]["enabled"] else [],
    output:
        drift="results/{run}/grounding/{subset}/drift.parquet",
        summary="results/{run}/grounding/{subset}/drift.json",
    params:
        embedder=GROUNDING["drift"]["embedder"],
        text=GROUNDING["drift"]["text"],
        vlm=redacted_vlm(config.get("vlm")) if GROUNDING["drift"]["embedder"]["kind"] != "minilm" else {},
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
        thresholds="results/{run}/grounding/{subset}/thresholds.json",
    output:
        "results/{run}/grounding/{subset}/boundary.json",
    params:
        source=GROUNDING["boundary"]["thresholds"],
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
        thresholds="results/{run}/grounding/{subset}/thresholds.json",
        boundary="results/{run}/grounding/{subset}/boundary.json",
        predictions="results/{run}/grounding/{subset}/predictions.parquet",
        stats="results/{run}/grounding/{subset}/vlm_stats.json",
    output:
        validation=report(
            "results/{run}/grounding/{subset}/figures/validation.png",
            caption="../report/grounding/validation.rst",
            category="grounding",
            labels={"figure": "validation (six panels)"},
        ),
        thresholds=report(
            "results/{run}/grounding/{subset}/figures/thresholds.png",
            caption="../report/grounding/thresholds.rst",
            category="grounding",
            labels={"figure": "threshold comparison"},
        ),
        timing=report(
            "results/{run}/grounding/{subset}/figures/timing.png",
            caption="../report/grounding/timing.rst",
            category="grounding",
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

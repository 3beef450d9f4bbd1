# mcdo: pixels -> MC-dropout trials -> reliability summaries -> figures (seed 002)


rule mcdo_trial:
    input:
        pixels=pixels_for_model,
    output:
        "results/{run}/mcdo/exp0/{model}/p{p}/trial{k}.npz",
    params:
        seed=MCDO["seed"],
        T=EXP0["T"],
        precision=MCDO["precision"],
        kind=MCDO["dropout_kind"],
        batch_size=MCDO["batch_size"],
        num_images=EXP0["num_images"],
        device=config["device"],
    log:
        "results/{run}/logs/mcdo/exp0/{model}/p{p}/trial{k}.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/exp0/{model}/p{p}/trial{k}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_trial.py"


rule mcdo_summary:
    input:
        exp0_trials,
    output:
        "results/{run}/mcdo/exp0/{model}/summary.json",
    params:
        p=EXP0["p"],
    log:
        "results/{run}/logs/mcdo/exp0/{model}/summary.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_summary.py"


rule mcdo_overall:
    input:
        exp0_summaries,
    output:
        report(
            "results/{run}/mcdo/exp0/overall_summary.json",
            caption="../report/mcdo/overall_summary.rst",
            category="mcdo",
            subcategory="exp0",
        ),
    log:
        "results/{run}/logs/mcdo/exp0/overall_summary.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_overall.py"


rule mcdo_figure_reliability:
    input:
        "results/{run}/mcdo/exp0/{model}/summary.json",
    output:
        report(
            "results/{run}/figures/mcdo/exp0_reliability_{model}.png",
            caption="../report/mcdo/reliability_vs_T.rst",
            category="mcdo",
            subcategory="exp0",
            labels={"model": "{model}", "figure": "reliability vs T"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/figures/mcdo/exp0_reliability_{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure_reliability.py"


rule mcdo_figure_scores:
    input:
        unpack(exp0_trials_by_model),
    output:
        report(
            "results/{run}/figures/mcdo/exp0_scores.png",
            caption="../report/mcdo/scores.rst",
            category="mcdo",
            subcategory="exp0",
            labels={"model": "all", "figure": "score distribution"},
        ),
    params:
        dpi=config["figures"]["dpi"],
        models=MODELS_USED,
    log:
        "results/{run}/logs/figures/mcdo/exp0_scores.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure_scores.py"

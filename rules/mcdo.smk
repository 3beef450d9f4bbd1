# mcdo (seed 002): pixels -> MC-dropout trials -> reliability summaries -> gate -> Phase 2 -> figures
#
# Paths: results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/trial{k}.npz (traces) or geometry{k}.npz
# (per-image covariance geometry of the same passes); {kind} is the dropout kind.


rule mcdo_trial:
    input:
        pixels=run_pixels,
    output:
        "results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/trial{k}.npz",
    wildcard_constraints:
        exp="|".join(TRIAL_EXPS),
    params:
        seed=MCDO["seed"],
        T=exp_T,
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        num_images=exp_num_images,
        device=config["device"],
        geometry=False,
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/{kind}/p{p}/trial{k}.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/{kind}/p{p}/trial{k}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_trial.py"


use rule mcdo_trial as mcdo_geometry with:
    output:
        "results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/geometry{k}.npz",
    wildcard_constraints:
        exp="|".join(GEOMETRY_EXPS),
    params:
        seed=MCDO["seed"],
        T=exp_T,
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        num_images=exp_num_images,
        device=config["device"],
        geometry=True,
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/{kind}/p{p}/geometry{k}.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/{kind}/p{p}/geometry{k}.tsv"


rule pixels_synthetic:
    input:
        manifest="results/{run}/images/manifest.tsv",
        images=image_inputs,
    output:
        "results/{run}/pixels/synthetic/{preproc}.h5",
    params:
        root=image_root,
        spec=preproc_spec,
        seed=MCDO["seed"],
        kinds=MCDO.get("exp2", {}).get("kinds"),
        blur_frac=MCDO.get("exp2", {}).get("blur_frac"),
        shuffle_grid=MCDO.get("exp2", {}).get("shuffle_grid"),
        num_images=MCDO.get("exp2", {}).get("num_images"),
    log:
        "results/{run}/logs/pixels/synthetic/{preproc}.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/pixels_synthetic.py"


# ---- summaries ------------------------------------------------------------------------------


rule mcdo_summary:
    input:
        trial_files,
    output:
        "results/{run}/mcdo/{exp}/{model}/summary.json",
    wildcard_constraints:
        exp="exp0|convergence",
    params:
        p=exp_rate,
        tol=exp_setting("tol"),
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/summary.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_summary.py"


rule mcdo_overall:
    input:
        model_summaries,
    output:
        report(
            "results/{run}/mcdo/{exp}/overall_summary.json",
            caption="../report/mcdo/overall_summary.rst",
            category="mcdo",
            subcategory="{exp}",
        ),
    wildcard_constraints:
        exp="exp0|convergence",
    log:
        "results/{run}/logs/mcdo/{exp}/overall_summary.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_overall.py"


rule mcdo_geometry_summary:
    input:
        geometry_files,
    output:
        "results/{run}/mcdo/{exp}/{model}/summary.json",
    wildcard_constraints:
        exp="|".join(GEOMETRY_EXPS),
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/summary.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_experiment_summary.py"


use rule mcdo_geometry_summary as mcdo_group_summary with:
    input:
        unpack(trial_groups),
    wildcard_constraints:
        exp="exp1|exp2|exp3",


rule mcdo_ambiguity:
    input:
        trials=trial_files,
        pixels=pixels_for_model,
    output:
        summary="results/{run}/mcdo/{exp}/{model}/summary.json",
        per_image="results/{run}/mcdo/{exp}/{model}/per_image.tsv",
    wildcard_constraints:
        exp="exp5_subset|exp5_full",
    params:
        class_names=exp_setting("class_names"),
        prompt_template=exp_setting("prompt_template"),
        high_entropy_quantile=exp_setting("high_entropy_quantile"),
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        device=config["device"],
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/ambiguity.log",
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_ambiguity.py"


rule mcdo_ambiguity_overall:
    input:
        model_summaries,
    output:
        report(
            "results/{run}/mcdo/{exp}/{exp}_overall_summary.json",
            caption="../report/mcdo/ambiguity_overall.rst",
            category="mcdo",
            subcategory="{exp}",
        ),
    wildcard_constraints:
        exp="exp5_subset|exp5_full",
    params:
        settings=exp_settings,
    log:
        "results/{run}/logs/mcdo/{exp}/overall_summary.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_ambiguity_overall.py"


# ---- the go/no-go gate (seed 002, section 6) --------------------------------------------------


checkpoint mcdo_gate:
    input:
        "results/{run}/mcdo/exp0/overall_summary.json",
    output:
        report(
            "results/{run}/mcdo/gate.json",
            caption="../report/mcdo/gate.rst",
            category="mcdo",
            subcategory="gate",
        ),
    params:
        force=FORCE_PHASE2,
    log:
        "results/{run}/logs/mcdo/gate.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_gate.py"


checkpoint mcdo_gate_sweep:
    input:
        overall="results/{run}/mcdo/exp0/overall_summary.json",
        sweep="results/{run}/mcdo/convergence/overall_summary.json",
    output:
        "results/{run}/mcdo/gate_after_sweep.json",
    params:
        force=FORCE_PHASE2,
    log:
        "results/{run}/logs/mcdo/gate_after_sweep.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_gate.py"


rule mcdo_phase2_note:
    input:
        final_gate,
    output:
        report(
            "results/{run}/mcdo/phase2_not_run.md",
            caption="../report/mcdo/gate.rst",
            category="mcdo",
            subcategory="gate",
        ),
    log:
        "results/{run}/logs/mcdo/phase2_not_run.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_phase2_note.py"


# ---- figures --------------------------------------------------------------------------------


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
        unpack(trials_by_model),
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
        models=MCDO["exp0"]["models"],
    log:
        "results/{run}/logs/figures/mcdo/exp0_scores.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure_scores.py"


rule mcdo_figure_convergence:
    input:
        "results/{run}/mcdo/convergence/{model}/summary.json",
    output:
        report(
            "results/{run}/figures/mcdo/convergence_{model}.png",
            caption="../report/mcdo/convergence.rst",
            category="mcdo",
            subcategory="convergence",
            labels={"model": "{model}", "figure": "convergence sweep"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/figures/mcdo/convergence_{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure_experiment.py"


rule mcdo_figure_geometry:
    input:
        unpack(geometry_by_model),
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_geometry.png",
            caption="../report/mcdo/geometry.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "all", "figure": "covariance geometry"},
        ),
    wildcard_constraints:
        exp="exp0b",
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/figures/mcdo/{exp}_geometry.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure_experiment.py"


rule mcdo_figure_experiment:
    input:
        summary="results/{run}/mcdo/{exp}/{model}/summary.json",
        runs=figure_runs,
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_{model}.png",
            caption="../report/mcdo/experiment.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "{model}", "figure": "{exp}"},
        ),
    wildcard_constraints:
        exp="exp1|exp2|exp3|exp4_subset|exp4_full",
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/figures/mcdo/{exp}_{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure_experiment.py"


rule mcdo_figure_ambiguity:
    input:
        summary="results/{run}/mcdo/{exp}/{model}/summary.json",
        per_image="results/{run}/mcdo/{exp}/{model}/per_image.tsv",
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_ambiguity_{model}.png",
            caption="../report/mcdo/ambiguity.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "{model}", "figure": "ambiguity"},
        ),
    wildcard_constraints:
        exp="exp5_subset|exp5_full",
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/figures/mcdo/{exp}_ambiguity_{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure_experiment.py"

# mcdo (seed 002): pixels -> MC-dropout trials -> reliability summaries -> gate -> Phase 2 -> figures
#
# One rule per kind of job; which experiment each job serves, and how, comes from the registry
# (src/vlmrel/mcdo/registry.py) through the input functions and constraints of common.smk.
# Paths: results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/trial{k}.npz (traces) or geometry{k}.npz
# (per-image covariance geometry of the same passes); {kind} is the dropout kind.


rule mcdo_trial:
    input:
        pixels=run_pixels,
    output:
        "results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/trial{k}.npz",
    wildcard_constraints:
        exp=exps_where(job="trials"),
    params:
        seed=MCDO["seed"],
        T=exp_T,
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        num_images=exp_num_images,
        device=config["device"],
        geometry=exp_is_geometry,
        depthwise=MCDO["depthwise_dropout"],
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
        exp=exps_where(job="geometry"),
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/{kind}/p{p}/geometry{k}.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/{kind}/p{p}/geometry{k}.tsv"


rule mcdo_text_trial:
    input:
        prompts=exp_prompt_file,
    output:
        "results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/text{k}.npz",
    wildcard_constraints:
        exp=exps_where(job="text"),
    params:
        seed=MCDO["seed"],
        T=exp_T,
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        device=config["device"],
        num_prompts=exp_setting("num_prompts"),
        class_names=exp_setting("class_names"),
        prompt_file=exp_setting("prompt_file"),
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/{kind}/p{p}/text{k}.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/{kind}/p{p}/text{k}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_text_trial.py"


rule mcdo_rate_search:
    input:
        pixels=run_pixels,
    output:
        "results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/search{k}.npz",
    wildcard_constraints:
        exp=exps_where(job="search"),
        k="0",
    params:
        seed=MCDO["seed"],
        T=exp_T,
        trials=exp_setting("trials"),
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        num_images=exp_num_images,
        device=config["device"],
        class_names=exp_setting("class_names"),
        groups=exp_setting("groups"),
        candidates=exp_setting("candidates"),
        rate_range=exp_setting("rate_range"),
        search_fraction=exp_setting("search_fraction"),
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/{kind}/p{p}/search{k}.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/{kind}/p{p}/search{k}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_rate_search.py"


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
        kinds=synthetic_setting("kinds"),
        blur_frac=synthetic_setting("blur_frac"),
        shuffle_grid=synthetic_setting("shuffle_grid"),
        num_images=synthetic_setting("num_images"),
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
        run_files,
    output:
        "results/{run}/mcdo/{exp}/{model}/summary.json",
    wildcard_constraints:
        exp=exps_where(summary="reliability"),
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


use rule mcdo_summary as mcdo_experiment_summary with:
    input:
        runs=run_files,
        scores=scores_input,
    wildcard_constraints:
        exp=exps_where(summary="analysis"),
    params:
        arms=arms_param,


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
        exp=exps_where(summary="reliability"),
    log:
        "results/{run}/logs/mcdo/{exp}/overall_summary.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_overall.py"


rule mcdo_ambiguity:
    input:
        trials=run_files,
        pixels=pixels_for_model,
        manifest="results/{run}/images/manifest.tsv",
    output:
        summary="results/{run}/mcdo/{exp}/{model}/summary.json",
        per_image="results/{run}/mcdo/{exp}/{model}/per_image.tsv",
    wildcard_constraints:
        exp=exps_where(summary="ambiguity"),
    params:
        class_names=exp_setting("class_names"),
        prompt_template=exp_setting("prompt_template"),
        high_entropy_quantile=exp_setting("high_entropy_quantile"),
        class_map=exp_setting("class_map"),
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
        exp=exps_where(summary="ambiguity"),
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
        "../scripts/mcdo_overall.py"


rule mcdo_experiment_overall:
    input:
        unpack(runs_by_model),
    output:
        report(
            "results/{run}/mcdo/{exp}/{exp}_overall_summary.json",
            caption="../report/mcdo/experiment_overall.rst",
            category="mcdo",
            subcategory="{exp}",
        ),
    wildcard_constraints:
        exp=exps_where(has_overall=True),
    params:
        models=exp_models,
        caption=overall_caption,
    log:
        "results/{run}/logs/mcdo/{exp}/overall_summary.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_overall.py"


# ---- the go/no-go gate (seed 002, section 6) --------------------------------------------------


checkpoint mcdo_gate:
    input:
        overall=gate_input,
        checks=gate_checks,
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
        overall=gate_input,
        sweep=sweep_input,
        checks=gate_checks,
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
        "../scripts/mcdo_gate.py"


rule mcdo_phase3_note:
    input:
        final_gate,
    output:
        report(
            "results/{run}/mcdo/phase3_not_run.md",
            caption="../report/mcdo/gate.rst",
            category="mcdo",
            subcategory="gate",
        ),
    log:
        "results/{run}/logs/mcdo/phase3_not_run.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_gate.py"


# ---- figures: one rule per figure kind (the registry entry's `figure`) ---------------------------


rule mcdo_figure_reliability:
    input:
        "results/{run}/mcdo/{exp}/{model}/summary.json",
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_reliability_{model}.png",
            caption="../report/mcdo/reliability_vs_T.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "{model}", "figure": "reliability vs T"},
        ),
    wildcard_constraints:
        exp=exps_where(figure="reliability"),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/figures/mcdo/{exp}_reliability_{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure.py"


rule mcdo_figure_scores:
    input:
        unpack(runs_by_model),
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_scores.png",
            caption="../report/mcdo/scores.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "all", "figure": "score distribution"},
        ),
    wildcard_constraints:
        exp=exps_where(figure="reliability"),
    params:
        dpi=config["figures"]["dpi"],
        models=exp_models,
    log:
        "results/{run}/logs/figures/mcdo/{exp}_scores.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure.py"


rule mcdo_figure_convergence:
    input:
        "results/{run}/mcdo/{exp}/{model}/summary.json",
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_{model}.png",
            caption="../report/mcdo/sweep.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "{model}", "figure": "sweep: reliability against T"},
        ),
    wildcard_constraints:
        exp=exps_where(figure="knee"),
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
        "../scripts/mcdo_figure.py"


rule mcdo_figure_geometry:
    input:
        unpack(runs_by_model),
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_geometry.png",
            caption="../report/mcdo/geometry.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "all", "figure": "covariance geometry"},
        ),
    wildcard_constraints:
        exp=exps_where(figure="geometry"),
    params:
        dpi=config["figures"]["dpi"],
        models=exp_models,
    log:
        "results/{run}/logs/figures/mcdo/{exp}_geometry.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure.py"


rule mcdo_figure_experiment:
    input:
        summary="results/{run}/mcdo/{exp}/{model}/summary.json",
        runs=run_files,
        scores=scores_input,
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_{model}.png",
            caption="../report/mcdo/experiment.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "{model}", "figure": "{exp}"},
        ),
    wildcard_constraints:
        exp=exps_where(figure="experiment"),
    params:
        dpi=config["figures"]["dpi"],
        arms=arms_param,
        caption=experiment_caption,
    log:
        "results/{run}/logs/figures/mcdo/{exp}_{model}.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure.py"


rule mcdo_figure_overall:
    input:
        "results/{run}/mcdo/{exp}/{exp}_overall_summary.json",
    output:
        report(
            "results/{run}/figures/mcdo/{exp}_matrix.png",
            caption="../report/mcdo/experiment_overall.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "all", "figure": "{exp} over models"},
        ),
    wildcard_constraints:
        exp=exps_where(has_overall=True),
    params:
        dpi=config["figures"]["dpi"],
        caption=overall_caption,
    log:
        "results/{run}/logs/figures/mcdo/{exp}_matrix.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_figure.py"


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
        exp=exps_where(figure="ambiguity"),
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
        "../scripts/mcdo_figure.py"


# ---- Phase 3 (seed 002, section 9): jobs of their own kinds --------------------------------------


rule mcdo_laplace:
    input:
        pixels=pixels_for_model,
    output:
        "results/{run}/mcdo/{exp}/{model}/laplace.npz",
    wildcard_constraints:
        exp=exps_where(scores="laplace"),
    params:
        num_images=exp_num_images,
        class_names=exp_setting("class_names"),
        prompt_template=exp_setting("prompt_template"),
        ridge_lambda=exp_setting("ridge_lambda"),
        fit_fraction=exp_setting("fit_fraction"),
        hessian_structure=exp_setting("hessian_structure"),
        link_approx=exp_setting("link_approx"),
        n_samples=exp_setting("n_samples"),
        kfac_fisher=exp_setting("kfac_fisher"),
        seed=MCDO["seed"],
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        device=config["device"],
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/laplace.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/laplace.tsv"
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_scores.py"


rule mcdo_semantic:
    input:
        pixels=run_pixels,
    output:
        "results/{run}/mcdo/{exp}/{model}/{kind}/p{p}/semantic{k}.npz",
    wildcard_constraints:
        exp=exps_where(job="semantic"),
    params:
        seed=MCDO["seed"],
        T=exp_T,
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        num_images=exp_num_images,
        device=config["device"],
        prompts=exp_setting("prompts"),
        class_names=exp_setting("class_names"),
        prompt_template=exp_setting("prompt_template"),
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/{kind}/p{p}/semantic{k}.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/{kind}/p{p}/semantic{k}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_semantic.py"


rule mcdo_aleatoric:
    input:
        manifest="results/{run}/images/manifest.tsv",
        images=image_inputs,
    output:
        "results/{run}/mcdo/{exp}/{model}/aleatoric.npz",
    wildcard_constraints:
        exp=exps_where(scores="aleatoric"),
    params:
        root=image_root,
        versions=exp_setting("versions"),
        num_images=exp_setting("num_images"),
        class_names=exp_setting("class_names"),
        prompt_template=exp_setting("prompt_template"),
        seed=MCDO["seed"],
        precision=MCDO["precision"],
        batch_size=MCDO["batch_size"],
        device=config["device"],
    log:
        "results/{run}/logs/mcdo/{exp}/{model}/aleatoric.log",
    benchmark:
        "results/{run}/benchmarks/mcdo/{exp}/{model}/aleatoric.tsv"
    threads: config["threads"]
    resources:
        mem_mb=MCDO["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_scores.py"


rule pixels_ablation:
    input:
        manifest="results/{run}/images/manifest.tsv",
        images=image_inputs,
    output:
        "results/{run}/pixels/ablation/{preproc}.h5",
    params:
        root=image_root,
        spec=preproc_spec,
        seed=MCDO["seed"],
        ablation=ablation_setting("ablation"),
        num_images=ablation_setting("num_images"),
    log:
        "results/{run}/logs/pixels/ablation/{preproc}.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/pixels_ablation.py"


rule mcdo_mot_demo:
    output:
        "results/{run}/mcdo/{exp}/demo_costs.json",
    wildcard_constraints:
        exp=exps_where(job="mot"),
    params:
        seed=MCDO["seed"],
        demo=exp_setting("demo"),
    log:
        "results/{run}/logs/mcdo/{exp}/demo_costs.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_mot.py"


rule mcdo_mot:
    input:
        costs=mot_costs,
    output:
        summary="results/{run}/mcdo/{exp}/summary.json",
        arrays="results/{run}/mcdo/{exp}/per_frame.npz",
    wildcard_constraints:
        exp=exps_where(job="mot"),
    params:
        alpha=exp_setting("alpha"),
        beta=exp_setting("beta"),
        gate_cost=exp_setting("gate_cost"),
    log:
        "results/{run}/logs/mcdo/{exp}/summary.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_mot.py"


rule mcdo_figure_mot:
    input:
        summary="results/{run}/mcdo/{exp}/summary.json",
        arrays="results/{run}/mcdo/{exp}/per_frame.npz",
    output:
        report(
            "results/{run}/figures/mcdo/{exp}.png",
            caption="../report/mcdo/mot.rst",
            category="mcdo",
            subcategory="{exp}",
            labels={"model": "none", "figure": "{exp}"},
        ),
    wildcard_constraints:
        exp=exps_where(figure="mot"),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/figures/mcdo/{exp}.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/mcdo_mot.py"

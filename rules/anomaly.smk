# anomaly: logits + labels -> anomaly scores -> exact metrics, threshold and subsampling studies -> figures
# (seed 003). Sources (config anomaly.source; the input functions in common.smk decide once):
#   demo          - synthetic scenes, a tiny network trained here, its logits (SYNTHETIC, see vlmrel.anomaly.synthetic)
#   images        - HDF5 images + labels per split (anomaly.images, a path with {split}); logits from the
#                   configured network and checkpoint (DeepLabV3-ResNet50)
#   streethazards - the dataset in its published layout (anomaly.streethazards.root), imported here
#   logits        - HDF5 logits + labels per split (anomaly.logits, a path with {split})


rule anomaly_demo_data:
    output:
        train="results/{run}/anomaly/data/train.h5",
        val="results/{run}/anomaly/data/val.h5",
        test="results/{run}/anomaly/data/test.h5",
    params:
        seed=ANOMALY["seed"],
        image_size=ANOMALY["demo"]["image_size"],
        n_train=ANOMALY["demo"]["n_train"],
        n_val=ANOMALY["demo"]["n_val"],
        n_test=ANOMALY["demo"]["n_test"],
        anomaly_fraction=ANOMALY["demo"]["anomaly_fraction"],
    log:
        "results/{run}/logs/anomaly/demo_data.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_demo_data.py"


rule anomaly_import_streethazards:
    output:
        data="results/{run}/anomaly/streethazards/{split}.h5",
        summary="results/{run}/anomaly/streethazards/{split}.json",
    wildcard_constraints:
        split="train|val|test",
    params:
        root=ANOMALY["streethazards"]["root"],
        folders=lambda wildcards: ANOMALY["streethazards"]["splits"][wildcards.split],
        image_size=ANOMALY["streethazards"]["image_size"],
        resize=ANOMALY["streethazards"]["resize"],
        label_offset=ANOMALY["streethazards"]["label_offset"],
        num_classes=ANOMALY["num_classes"],
        anomaly_ids=ANOMALY["anomaly_ids"],
        ignore_ids=ANOMALY["ignore_ids"],
    log:
        "results/{run}/logs/anomaly/import_streethazards_{split}.log",
    benchmark:
        "results/{run}/benchmarks/anomaly/import_streethazards_{split}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_import_streethazards.py"


rule anomaly_train:
    input:
        train="results/{run}/anomaly/data/train.h5",
        val="results/{run}/anomaly/data/val.h5",
    output:
        model="results/{run}/anomaly/model/segnet.safetensors",
        record="results/{run}/anomaly/model/train.json",
    params:
        arch=ANOMALY["model"]["arch"],
        num_classes=ANOMALY["num_classes"],
        ignore_ids=ANOMALY["ignore_ids"],
        epochs=ANOMALY["model"]["epochs"],
        batch_size=ANOMALY["model"]["batch_size"],
        lr=ANOMALY["model"]["lr"],
        seed=ANOMALY["seed"],
        mean=ANOMALY["model"]["mean"],
        std=ANOMALY["model"]["std"],
    log:
        "results/{run}/logs/anomaly/train.log",
    benchmark:
        "results/{run}/benchmarks/anomaly/train.tsv"
    threads: ANOMALY["model"]["train_threads"]
    resources:
        mem_mb=2000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_train.py"


rule anomaly_heat_stats:
    input:
        data=anomaly_heat_stats_data,
        checkpoint=anomaly_checkpoint,
    output:
        "results/{run}/anomaly/heat/feature_stats.safetensors",
    params:
        arch=ANOMALY["model"]["arch"],
        num_classes=ANOMALY["num_classes"],
        ignore_ids=ANOMALY["ignore_ids"],
        batch_size=ANOMALY["model"]["infer_batch_size"],
        mean=ANOMALY["model"]["mean"],
        std=ANOMALY["model"]["std"],
        ridge=ANOMALY["heat"]["ridge"],
        device=config["device"],
    log:
        "results/{run}/logs/anomaly/heat_stats.log",
    benchmark:
        "results/{run}/benchmarks/anomaly/heat_stats.tsv"
    threads: config["threads"]
    resources:
        mem_mb=ANOMALY["mem_mb"],
        gpu=1 if config["device"].startswith("cuda") else 0,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_heat_stats.py"


rule anomaly_logits:
    input:
        data=anomaly_data,
        checkpoint=anomaly_checkpoint,
        heat_stats=anomaly_heat_stats,
    output:
        "results/{run}/anomaly/logits/{split}.h5",
    wildcard_constraints:
        split="val|test",
    params:
        arch=ANOMALY["model"]["arch"],
        num_classes=ANOMALY["num_classes"],
        batch_size=ANOMALY["model"]["infer_batch_size"],
        mean=ANOMALY["model"]["mean"],
        std=ANOMALY["model"]["std"],
        dtype=ANOMALY["logits_dtype"],
        device=config["device"],
    log:
        "results/{run}/logs/anomaly/logits_{split}.log",
    benchmark:
        "results/{run}/benchmarks/anomaly/logits_{split}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=ANOMALY["mem_mb"],
        gpu=1 if config["device"].startswith("cuda") else 0,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_logits.py"


rule anomaly_sml_stats:
    input:
        anomaly_logits("val"),
    output:
        "results/{run}/anomaly/sml_stats.json",
    params:
        num_classes=ANOMALY["num_classes"],
        anomaly_ids=ANOMALY["anomaly_ids"],
        ignore_ids=ANOMALY["ignore_ids"],
        max_block_mb=ANOMALY["max_block_mb"],
    log:
        "results/{run}/logs/anomaly/sml_stats.log",
    threads: 1
    resources:
        mem_mb=ANOMALY["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_sml_stats.py"


rule anomaly_evaluate:
    input:
        logits=anomaly_logits("test"),
        sml=anomaly_sml(ANOMALY["methods"]),
    output:
        metrics="results/{run}/anomaly/metrics.json",
        per_image="results/{run}/anomaly/per_image.tsv",
        histograms="results/{run}/anomaly/histograms.npz",
    params:
        num_classes=ANOMALY["num_classes"],
        anomaly_ids=ANOMALY["anomaly_ids"],
        ignore_ids=ANOMALY["ignore_ids"],
        methods=ANOMALY["methods"],
        temperature=ANOMALY["temperature"],
        tpr_level=ANOMALY["tpr_level"],
        max_block_mb=ANOMALY["max_block_mb"],
        max_refine_mb=ANOMALY["max_refine_mb"],
        heat=ANOMALY["heat"],
    log:
        "results/{run}/logs/anomaly/evaluate.log",
    benchmark:
        "results/{run}/benchmarks/anomaly/evaluate.tsv"
    threads: 1
    resources:
        mem_mb=ANOMALY["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_evaluate.py"


rule anomaly_threshold:
    input:
        "results/{run}/anomaly/histograms.npz",
    output:
        tsv="results/{run}/anomaly/threshold_sensitivity.tsv",
        json="results/{run}/anomaly/threshold_sensitivity.json",
    params:
        offsets=ANOMALY["threshold"]["offsets"],
    log:
        "results/{run}/logs/anomaly/threshold.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_threshold.py"


rule anomaly_subsampling:
    input:
        logits=anomaly_logits("test"),
        sml=anomaly_sml(anomaly_subsampling_methods()),
    output:
        summary="results/{run}/anomaly/subsampling.tsv",
        trials="results/{run}/anomaly/subsampling_trials.tsv",
    params:
        num_classes=ANOMALY["num_classes"],
        anomaly_ids=ANOMALY["anomaly_ids"],
        ignore_ids=ANOMALY["ignore_ids"],
        methods=anomaly_subsampling_methods(),
        ratios=ANOMALY["subsampling"]["ratios"],
        trials=ANOMALY["subsampling"]["trials"],
        seed=ANOMALY["seed"],
        temperature=ANOMALY["temperature"],
        tpr_level=ANOMALY["tpr_level"],
        max_block_mb=ANOMALY["max_block_mb"],
        heat=ANOMALY["heat"],
    log:
        "results/{run}/logs/anomaly/subsampling.log",
    benchmark:
        "results/{run}/benchmarks/anomaly/subsampling.tsv"
    threads: 1
    resources:
        mem_mb=ANOMALY["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_subsampling.py"


rule anomaly_comparison:
    input:
        metrics="results/{run}/anomaly/metrics.json",
        threshold="results/{run}/anomaly/threshold_sensitivity.json",
    output:
        csv=report(
            "results/{run}/anomaly/comparison.csv",
            caption="../report/anomaly/comparison.rst",
            category="anomaly",
            labels={"table": "method comparison"},
        ),
        md="results/{run}/anomaly/comparison.md",
    log:
        "results/{run}/logs/anomaly/comparison.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_comparison.py"


rule anomaly_figure_roc_pr:
    input:
        histograms="results/{run}/anomaly/histograms.npz",
        metrics="results/{run}/anomaly/metrics.json",
    output:
        report(
            "results/{run}/anomaly/figures/roc_pr.png",
            caption="../report/anomaly/roc_pr.rst",
            category="anomaly",
            labels={"figure": "ROC and PR curves"},
        ),
    params:
        kind="roc_pr",
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/anomaly/figure_roc_pr.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_figure.py"


rule anomaly_figure_threshold:
    input:
        "results/{run}/anomaly/threshold_sensitivity.json",
    output:
        report(
            "results/{run}/anomaly/figures/threshold_sensitivity.png",
            caption="../report/anomaly/threshold_sensitivity.rst",
            category="anomaly",
            labels={"figure": "threshold sensitivity"},
        ),
    params:
        kind="threshold_sensitivity",
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/anomaly/figure_threshold_sensitivity.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_figure.py"


rule anomaly_figure_subsampling:
    input:
        "results/{run}/anomaly/subsampling.tsv",
    output:
        report(
            "results/{run}/anomaly/figures/subsampling.png",
            caption="../report/anomaly/subsampling.rst",
            category="anomaly",
            labels={"figure": "subsampling"},
        ),
    params:
        kind="subsampling",
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/anomaly/figure_subsampling.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_figure.py"


rule anomaly_image_logits:
    input:
        anomaly_logits(),
    output:
        "results/{run}/anomaly/classification/image_logits_{split}.h5",
    wildcard_constraints:
        split="val|test",
    params:
        num_classes=ANOMALY["num_classes"],
        anomaly_ids=ANOMALY["anomaly_ids"],
        ignore_ids=ANOMALY["ignore_ids"],
        max_block_mb=ANOMALY["max_block_mb"],
    log:
        "results/{run}/logs/anomaly/image_logits_{split}.log",
    threads: 1
    resources:
        mem_mb=ANOMALY["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_image_logits.py"


rule anomaly_classification:
    input:
        test=anomaly_classification_logits("test"),
        val=anomaly_classification_logits("val"),
    output:
        "results/{run}/anomaly/classification/metrics.json",
    params:
        num_classes=ANOMALY["num_classes"],
        methods=ANOMALY["methods"],
        temperature=ANOMALY["temperature"],
        tpr_level=ANOMALY["tpr_level"],
    log:
        "results/{run}/logs/anomaly/classification.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_classification.py"


# ---- image-level OOD with a trained classifier (anomaly.image_ood; vlmrel.anomaly.image_ood) ----
# in-distribution: the real photos of the image manifest; OOD: textures among them and generated images


rule anomaly_image_ood_logits:
    input:
        manifest="results/{run}/images/manifest.tsv",
        images=image_inputs,
    output:
        "results/{run}/anomaly/image_ood/{model}/logits.h5",
    params:
        root=image_root,
        textures=config["anomaly"]["image_ood"]["textures"],
        kinds=config["anomaly"]["image_ood"]["generated"],
        n=config["anomaly"]["image_ood"]["n"],
        seed=config["anomaly"]["seed"],
        precision=config["anomaly"]["image_ood"]["precision"],
        batch_size=config["anomaly"]["image_ood"]["batch_size"],
        device=config["device"],
    log:
        "results/{run}/logs/anomaly/image_ood/{model}/logits.log",
    benchmark:
        "results/{run}/benchmarks/anomaly/image_ood/{model}/logits.tsv"
    threads: config["threads"]
    resources:
        mem_mb=config["anomaly"]["mem_mb"],
        gpu=1 if config["device"].startswith("cuda") else 0,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_image_ood_logits.py"


rule anomaly_image_ood_evaluate:
    input:
        "results/{run}/anomaly/image_ood/{model}/logits.h5",
    output:
        metrics="results/{run}/anomaly/image_ood/{model}/metrics.json",
        per_image="results/{run}/anomaly/image_ood/{model}/per_image.tsv",
    params:
        methods=config["anomaly"]["image_ood"]["methods"],
        temperature=config["anomaly"]["temperature"],
        tpr_level=config["anomaly"]["tpr_level"],
    log:
        "results/{run}/logs/anomaly/image_ood/{model}/evaluate.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/anomaly_image_ood_evaluate.py"

# The teacher chain (rules only; input functions live in common.smk).
# manifest -> VLM annotations (raw.jsonl) -> ground_truth_auto.jsonl -> human_sample.json + Label Studio tasks
# pixels -> embeddings/{model}.h5 -> heads -> predictions -> eval.json (audited human truth or auto truth) -> figures


rule teacher_annotate:
    input:
        manifest="results/{run}/images/manifest.tsv",
        images=image_inputs,
    output:
        raw="results/{run}/teacher/raw.jsonl",
        stats="results/{run}/teacher/vlm_stats.json",
    params:
        root=image_root,
        vlm=redacted_vlm(config.get("vlm")),
    log:
        "results/{run}/logs/teacher/annotate.log",
    benchmark:
        "results/{run}/benchmarks/teacher/annotate.tsv"
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_annotate.py"


rule teacher_ground_truth:
    input:
        "results/{run}/teacher/raw.jsonl",
    output:
        truth="results/{run}/teacher/ground_truth_auto.jsonl",
        stats="results/{run}/teacher/ground_truth_stats.json",
    params:
        mapping=TEACHER["ground_truth"],
    log:
        "results/{run}/logs/teacher/ground_truth.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_ground_truth.py"


rule teacher_human_sample:
    input:
        truth="results/{run}/teacher/ground_truth_auto.jsonl",
        manifest="results/{run}/images/manifest.tsv",
    output:
        sample="results/{run}/teacher/human_sample.json",
        tasks="results/{run}/teacher/label_studio/tasks.json",
        label_config="results/{run}/teacher/label_studio/config.xml",
    params:
        size=TEACHER["human"]["size"],
        seed=TEACHER["human"]["seed"],
        image_url_prefix=TEACHER["human"]["image_url_prefix"],
        mapping=TEACHER["ground_truth"],
    log:
        "results/{run}/logs/teacher/human_sample.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_human_sample.py"


rule teacher_audited_truth:
    input:
        TEACHER_AUDITED or [],
    output:
        "results/{run}/teacher/ground_truth_human.json",
    params:
        mapping=TEACHER["ground_truth"],
    log:
        "results/{run}/logs/teacher/audited_truth.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_audited_truth.py"


rule embeddings:
    input:
        pixels_for_model,
    output:
        "results/{run}/embeddings/{model}.h5",
    params:
        batch_size=TEACHER["embeddings"]["batch_size"],
        precision=TEACHER["embeddings"]["precision"],
        device=config["device"],
    log:
        "results/{run}/logs/embeddings/{model}.log",
    benchmark:
        "results/{run}/benchmarks/embeddings/{model}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=TEACHER["mem_mb"],
        gpu=GPU,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/embeddings.py"


rule teacher_heads:
    input:
        embeddings="results/{run}/embeddings/{model}.h5",
        truth="results/{run}/teacher/ground_truth_auto.jsonl",
    output:
        heads="results/{run}/teacher/{model}/heads.safetensors",
        card="results/{run}/teacher/{model}/card.json",
    params:
        mapping=TEACHER["ground_truth"],
        heads=TEACHER["heads"],
        seed=TEACHER["seed"],
    log:
        "results/{run}/logs/teacher/{model}/heads.log",
    benchmark:
        "results/{run}/benchmarks/teacher/{model}/heads.tsv"
    threads: config["threads"]
    resources:
        mem_mb=TEACHER["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_heads.py"


rule teacher_predict:
    input:
        embeddings="results/{run}/embeddings/{model}.h5",
        heads="results/{run}/teacher/{model}/heads.safetensors",
        card="results/{run}/teacher/{model}/card.json",
    output:
        "results/{run}/teacher/{model}/predictions.jsonl",
    log:
        "results/{run}/logs/teacher/{model}/predict.log",
    threads: 1
    resources:
        mem_mb=TEACHER["mem_mb"],
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_predict.py"


rule teacher_eval:
    input:
        predictions="results/{run}/teacher/{model}/predictions.jsonl",
        card="results/{run}/teacher/{model}/card.json",
        truth=teacher_truth,
    output:
        "results/{run}/teacher/{model}/eval.json",
    params:
        truth_kind=TEACHER_TRUTH_KIND,
    log:
        "results/{run}/logs/teacher/{model}/eval.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_eval.py"


rule teacher_figures:
    input:
        "results/{run}/teacher/{model}/eval.json",
    output:
        confusion=report(
            "results/{run}/teacher/{model}/figures/confusion.png",
            caption="../report/teacher/confusion.rst",
            category="teacher",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "scene confusion matrix"},
        ),
        attributes=report(
            "results/{run}/teacher/{model}/figures/attributes.png",
            caption="../report/teacher/attributes.rst",
            category="teacher",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "attribute precision, recall, F1"},
        ),
    params:
        dpi=config["figures"]["dpi"],
    log:
        "results/{run}/logs/teacher/{model}/figures.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/teacher_figures.py"

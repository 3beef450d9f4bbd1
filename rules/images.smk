# images -> manifest.tsv -> pixels/{preproc}.h5 (shared by the mcdo and teacher chains)


rule demo_images:
    output:
        directory("results/{run}/images/demo"),
    log:
        "results/{run}/logs/demo_images.log",
    threads: 1
    resources:
        mem_mb=500,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/demo_images.py"


rule manifest:
    input:
        image_inputs,
    output:
        "results/{run}/images/manifest.tsv",
    params:
        root=image_root,
        source=config["images"]["source"],
        glob=config["images"]["glob"],
        limit=config["images"]["limit"],
        subset_seed=config["images"]["subset_seed"],
        max_pixels=config["images"]["max_pixels"],
    log:
        "results/{run}/logs/manifest.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/images_manifest.py"


rule pixels:
    input:
        manifest="results/{run}/images/manifest.tsv",
        images=image_inputs,
    output:
        "results/{run}/pixels/{preproc}.h5",
    params:
        root=image_root,
        spec=preproc_spec,
    log:
        "results/{run}/logs/pixels/{preproc}.log",
    benchmark:
        "results/{run}/benchmarks/pixels/{preproc}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        "../envs/vlmrel.yaml"
    script:
        "../scripts/pixels.py"

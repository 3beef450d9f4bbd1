"""StreetHazards in its published layout -> the chain's HDF5 data file of one split (streamed, validated)."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.import_streethazards(
    p.root,
    snakemake.output.data,
    snakemake.output.summary,
    split=snakemake.wildcards.split,
    folders=p.folders,
    image_size=p.image_size,
    resize=p.resize,
    label_offset=p.label_offset,
    spec=pipeline.spec_of(p.num_classes, p.anomaly_ids, p.ignore_ids),
)

"""Teacher figures: scene confusion matrix and per-attribute precision/recall/F1."""

from vlmrel.io import read_json
from vlmrel.logs import setup_job_log
from vlmrel.teacher.figures import attribute_figure, confusion_figure

log = setup_job_log(snakemake.log[0])
ev = read_json(snakemake.input[0])
confusion_figure(ev, snakemake.output.confusion, snakemake.params.dpi)
attribute_figure(ev, snakemake.output.attributes, snakemake.params.dpi)

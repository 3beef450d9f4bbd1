"""Image embeddings of one registry model, streamed from the pixel file: embeddings/{model}.h5."""

import torch

from vlmrel.embeddings import compute_embeddings
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
compute_embeddings(
    snakemake.input[0],
    snakemake.wildcards.model,
    snakemake.output[0],
    batch_size=p.batch_size,
    device=p.device,
    precision=p.precision,
)

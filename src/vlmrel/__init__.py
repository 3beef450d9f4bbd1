"""vlmrel: how far the answers of vision and vision-language models can be trusted.

The library knows nothing of Snakemake: every function takes plain paths and values,
so it can be unit-tested and called from notebooks as well as from the workflow's scripts.
"""

__version__ = "0.1.0"

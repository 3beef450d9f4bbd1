"""The mcdo chain (seed 002): MC-dropout uncertainty of frozen vision encoders and how far it can
be trusted.

- :mod:`~vlmrel.mcdo.registry`: one declarative entry per experiment; the rules are built from it.
- :mod:`~vlmrel.mcdo.pipeline`: one entry per job stage, called by ``scripts/mcdo_*.py``.
- :mod:`~vlmrel.mcdo.dropout`: dropout injection into the vision tower and nested-T trials.
- :mod:`~vlmrel.mcdo.reliability`: ICC, SNR, Spearman and status across trials; exp0 summaries.
- :mod:`~vlmrel.mcdo.geometry`: per-image covariance geometry of the pass features (exp0b, exp4).
- :mod:`~vlmrel.mcdo.ambiguity`: zero-shot entropy and margin against uncertainty (exp5).
- :mod:`~vlmrel.mcdo.synthetic`: exp2's synthetic baseline images.
- :mod:`~vlmrel.mcdo.comparisons`: scores compared across arms (rates, kinds, synthetic, recipes).
- :mod:`~vlmrel.mcdo.analyses`: the per-experiment analysis and figure functions the registry names.
- :mod:`~vlmrel.mcdo.gate`: the go/no-go gate and the convergence knee.
- :mod:`~vlmrel.mcdo.figures`: every mcdo figure.
"""

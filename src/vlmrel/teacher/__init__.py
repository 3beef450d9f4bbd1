"""The teacher chain (seed 004): a VLM annotates images, annotations become ground truth,
a seeded sample goes to human review (Label Studio), and small heads trained on image
embeddings are evaluated against the human truth (or, without one, the auto truth).

Modules:

- :mod:`~vlmrel.teacher.pipeline`: one function per workflow step; ``scripts/teacher_*.py``
  only unpack ``snakemake`` and call them.
- :mod:`~vlmrel.teacher.schema`: what the chain asks the VLM (seed 004's scenes, annotation
  schema and JSON-only prompt); the VLM layer only carries it.
- :mod:`~vlmrel.teacher.annotate`: manifest -> VLM requests (the seed's JSON-only prompt
  and schema, through :func:`vlmrel.vlm.run_requests`) -> ``raw.jsonl``, one line per
  image with the annotation or the recorded failure (never a guess).
- :mod:`~vlmrel.teacher.truth`: ``raw.jsonl`` -> ``ground_truth_auto.jsonl`` with the
  seed's mapping rules (scene, attributes, objects above a confidence), and the seeded
  human-review sample.
- :mod:`~vlmrel.teacher.labelstudio`: Label Studio tasks export (pre-annotated with the
  auto truth), labelling config, and import of a Label Studio export as audited truth.
- :mod:`~vlmrel.teacher.heads`: linear softmax scene head, multi-label BCE attribute and
  object heads on embeddings; seeded validation split, early stopping; safetensors + card.
- :mod:`~vlmrel.teacher.evaluate`: scene accuracy and confusion matrix, per-attribute
  precision/recall/F1, object top-1/top-3 hit rates.
- :mod:`~vlmrel.teacher.figures`: the confusion matrix and per-attribute bars.

The library knows nothing of Snakemake; ``scripts/teacher_*.py`` wire it through
:mod:`~vlmrel.teacher.pipeline`.
"""

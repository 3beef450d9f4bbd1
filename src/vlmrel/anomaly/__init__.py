"""anomaly: pixel-level (and image-level) anomaly scores and their exact metrics (seed 003).

Public API::

    from vlmrel.anomaly import exact_metrics, ExactAccumulator, PerImageAccumulator

    exact_metrics(scores, is_anomaly)  # {"auroc", "aupr", "fpr95", ...} pooled over every element
    acc = ExactAccumulator(); acc.update(scores_chunk, labels_chunk); acc.result()  # same, streamed

Sub-modules: ``metrics`` (exact histogram metrics, the float16 fast path), ``exact32`` (exact
metrics of float32 scores: coarse pass + refinement passes), ``scores`` (MSP, max logit, energy,
entropy, SML), ``heat`` (HEAT and its feature statistics), ``io`` (HDF5 files and validation),
``evaluate`` (streaming evaluation, producer mIoU), ``studies`` (threshold, subsampling,
comparison), ``figures``, ``synthetic`` (demo scenes), ``streethazards`` (import from the
published layout), ``segnet`` (tiny network training and the DeepLabV3 logits producer with
HEAT's feature maps; imports torch lazily).
"""

from vlmrel.anomaly.metrics import ExactAccumulator, PerImageAccumulator, exact_metrics, per_image_metrics

__all__ = ["ExactAccumulator", "PerImageAccumulator", "exact_metrics", "per_image_metrics"]

"""Retrieval evaluation: metrics from scores (NumPy), embeddings of a data set (Keras), metrics of a trained model.

* `metrics`: recall@K, RSUM, median and mean rank; the full and COCO 1K protocols on embeddings; concept ranks.
  NumPy only, scored with `tfemde.serving.similarity` (the similarity serving uses).
* `encode`: `encode_dataset`, the embeddings of every item and caption of a data set from a `DualEncoder`.
* `model`: `evaluate` (a model, a `Run` or a run folder on a data set), `evaluate_encoded` (an `EvalData`, as the
  validation callback uses it), `evaluate_images` (image to image across styles, full or centroid galleries) and
  `concept_queries` (every concept's name searched over the whole gallery, apart for names with a word no
  training caption holds).

Importing this package does not import TensorFlow; `encode` and `model` import it when called.
"""

from tfemde.evaluation.encode import embeddings_from_outputs, encode_dataset, encode_items
from tfemde.evaluation.metrics import (CONCEPT_HITS_AT, METRIC_KEYS, PROTOCOLS, RECALL_AT, coco1k, concept_ranks,
                                       format_metrics, full, image_retrieval_metrics, mean_std, metrics_from_ranks,
                                       metrics_line, protocol_metrics, retrieval_metrics, retrieval_ranks)
from tfemde.evaluation.model import (GALLERIES, TASKS, caption_words, concept_names, concept_queries, evaluate,
                                     evaluate_encoded, evaluate_images, names_with_unseen_words)

__all__ = ["CONCEPT_HITS_AT", "GALLERIES", "METRIC_KEYS", "PROTOCOLS", "RECALL_AT", "TASKS", "caption_words", "coco1k",
           "concept_names", "concept_queries", "concept_ranks", "embeddings_from_outputs", "encode_dataset",
           "encode_items", "evaluate", "evaluate_encoded", "evaluate_images", "format_metrics", "full",
           "image_retrieval_metrics", "mean_std", "metrics_from_ranks", "metrics_line", "names_with_unseen_words",
           "protocol_metrics", "retrieval_metrics", "retrieval_ranks"]

"""The TF-free serving runtime: embeddings, the training-exact similarity in NumPy, and a set index.

Imports numpy (and, for the encoders, onnxruntime, onnxruntime-extensions, sentencepiece and Pillow) only,
never tensorflow or keras, so applications can serve exported models without TensorFlow.
"""

from tfemde.serving.embeddings import Embeddings
from tfemde.serving.index import SetIndex
from tfemde.serving.similarity import similarity, sketch_similarity, smooth_chamfer

__all__ = ["Embeddings", "SetIndex", "similarity", "sketch_similarity", "smooth_chamfer"]

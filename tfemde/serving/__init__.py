"""The TF-free serving runtime: embeddings, the training-exact similarity in NumPy, and set indexes (exact, and
FAISS-backed with an exact re-rank when faiss-cpu is installed).

Imports numpy (and, for the encoders, onnxruntime, onnxruntime-extensions, sentencepiece and Pillow) only,
never tensorflow or keras, so applications can serve exported models without TensorFlow.
"""

from tfemde.serving.ann import AnnSetIndex, load_index
from tfemde.serving.embeddings import Embeddings
from tfemde.serving.encoder import Encoder
from tfemde.serving.images import load_image, load_images
from tfemde.serving.index import SetIndex
from tfemde.serving.manifest import ExportFileError, read_manifest, verify_files
from tfemde.serving.providers import choose_providers
from tfemde.serving.similarity import similarity, sketch_similarity, smooth_chamfer

__all__ = ["AnnSetIndex", "Embeddings", "SetIndex", "load_index", "similarity", "sketch_similarity", "smooth_chamfer",
           "Encoder", "ExportFileError", "choose_providers", "load_image", "load_images", "read_manifest",
           "verify_files"]

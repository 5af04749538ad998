"""Keras layers of tfemde: the T-EMDE sketch, set prediction, slot attention and pooling."""

from tfemde.layers.activations import gelu_erf
from tfemde.layers.attention import SelfAttentionBlock
from tfemde.layers.masking import AllValidMask
from tfemde.layers.normalization import GlobalBatchNormalization, UnitNormalize
from tfemde.layers.pooling import GPO, MaskedMaxPooling, MaskedMeanPooling
from tfemde.layers.positional import rank_positional_encoding, sine_positional_encoding
from tfemde.layers.recurrent import AveragedBiGRU
from tfemde.layers.set_prediction import SetPrediction
from tfemde.layers.sketch import TEMDESketch, sketch_similarity
from tfemde.layers.slot_attention import SlotAttention

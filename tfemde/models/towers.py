"""Image and text towers: inputs -> local features `[B, L, D]` in the joint space, their mask and a global vector.

Each tower function takes symbolic Keras inputs and returns a `TowerOutput`; the heads (set prediction, pooling,
the shared T-EMDE sketch) are applied on top in `tfemde.models.dual_encoder`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import keras
from keras import layers

from tfemde.layers import AllValidMask, AveragedBiGRU, GlobalBatchNormalization, MaskedMaxPooling


@dataclasses.dataclass
class TowerOutput:
    """What a tower hands to the heads.

    Attributes:
        local: `[B, L, D]` local features in the joint space (regions, grid cells or tokens).
        mask: `[B, L]` bool, valid positions of `local`.
        global_: `[B, D]` the global feature (masked max over regions; the final BiGRU state for text).
        set_inputs: `[B, L, Din]` what the set-prediction head attends over (local features for images, word
            embeddings for text, as DivE does).
    """

    local: object
    mask: object
    global_: object
    set_inputs: object


def _residual_projection(features, mask, config, prefix):
    """DivE's local transform (§3.1): L = Dropout(F(X) + MLP(F(X))), F a linear map to D, MLP D->D/2->BN->ReLU->D."""
    dim = config.embed_dim
    projected = layers.Dense(dim, kernel_initializer="glorot_uniform", name=f"{prefix}_fc")(features)
    hidden = layers.Dense(dim // 2, name=f"{prefix}_mlp_in")(projected)
    hidden = GlobalBatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{prefix}_mlp_bn")(hidden, mask=mask)
    hidden = layers.ReLU(name=f"{prefix}_mlp_relu")(hidden)
    hidden = layers.Dense(dim, name=f"{prefix}_mlp_out")(hidden)
    local = layers.Add(name=f"{prefix}_residual")([projected, hidden])
    return layers.Dropout(config.dropout, name=f"{prefix}_dropout")(local)


def _conv_bn(features, filters, strides, name, relu=True):
    features = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=name)(features)
    features = GlobalBatchNormalization(name=f"{name}_bn")(features)
    return layers.ReLU(name=f"{name}_relu")(features) if relu else features


def _residual_block(features, filters, name):
    """ResNet's basic block at constant width: x + BN(conv(ReLU(BN(conv(x))))), then ReLU."""
    hidden = _conv_bn(features, filters, 1, f"{name}_a")
    hidden = _conv_bn(hidden, filters, 1, f"{name}_b", relu=False)
    return layers.ReLU(name=f"{name}_relu")(layers.Add(name=f"{name}_add")([features, hidden]))


def _grid_to_set(feature_map, name):
    """`[B, h, w, C]` -> `[B, h*w, C]`: the grid cells of a feature map become the set."""
    _, height, width, channels = feature_map.shape
    return layers.Reshape((height * width, channels), name=name)(feature_map)


def _find_backbone(name):
    """The `keras.applications` constructor called `name` and its module's `preprocess_input`."""
    constructor = getattr(keras.applications, name, None)
    if constructor is None:
        known = sorted(n for n in dir(keras.applications) if n[:1].isupper())
        raise ValueError(f"backbone must be a keras.applications model name such as 'MobileNetV2'; got {name!r}. "
                         f"Known: {', '.join(known)}")
    for info in pkgutil.iter_modules(keras.applications.__path__):
        module = importlib.import_module(f"keras.applications.{info.name}")
        if getattr(module, name, None) is constructor and hasattr(module, "preprocess_input"):
            return constructor, module.preprocess_input
    raise ValueError(f"found no preprocess_input for backbone {name!r}")


def image_tower(config, inputs):
    """The image tower of `config.image_input`; `inputs` is the dict of symbolic image inputs it needs."""
    prefix = "image"
    if config.image_input == "regions":
        regions, mask = inputs["regions"], inputs["region_mask"]
        local = _residual_projection(regions, mask, config, prefix)
    else:
        image = inputs["image"]
        if config.image_input == "pixels":
            features = image
            for i, filters in enumerate(config.cnn_filters):
                features = _conv_bn(features, filters, 2, f"image_conv{i}")
                for j in range(config.cnn_blocks):
                    features = _residual_block(features, filters, f"image_conv{i}_block{j}")
        else:
            constructor, preprocess = _find_backbone(config.backbone)
            backbone = constructor(include_top=False, weights=config.backbone_weights,
                                   input_shape=(config.image_size, config.image_size, 3))
            backbone.name = "image_backbone"
            scaled = layers.Rescaling(255.0, name="image_to_255")(image)
            features = backbone(layers.Lambda(preprocess, name="image_preprocess")(scaled))
        grid = _grid_to_set(features, "image_grid")
        mask = AllValidMask(name="image_grid_mask")(grid)
        local = _residual_projection(grid, mask, config, prefix)
    global_ = MaskedMaxPooling(name="image_global_pool")(local, mask=mask)
    return TowerOutput(local=local, mask=mask, global_=global_, set_inputs=local)


def text_tower(config, caption_ids, caption_mask):
    """Embedding -> dropout -> length-aware BiGRU (directions averaged) -> dropout.

    The backward GRU starts at each caption's last valid token (Keras RNNs skip masked steps and carry the state,
    which matches PyTorch's packed sequences for right-padded input); the global feature is the average of the two
    directions' final states, as in DivE.
    """
    embedded = layers.Embedding(
        config.vocab_size, config.word_dim, name="text_embedding",
        embeddings_initializer=keras.initializers.RandomUniform(-0.1, 0.1),
    )(caption_ids)
    embedded = layers.Dropout(config.dropout, name="text_embedding_dropout")(embedded)
    sequence, forward_state, backward_state = AveragedBiGRU(config.embed_dim, return_state=True, name="text_gru")(
        embedded, mask=caption_mask)
    global_ = layers.Average(name="text_global")([forward_state, backward_state])
    local = layers.Dropout(config.dropout, name="text_local_dropout")(sequence)
    return TowerOutput(local=local, mask=caption_mask, global_=global_, set_inputs=embedded)

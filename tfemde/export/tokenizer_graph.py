"""The tokenizer as ONNX: strings to padded SentencePiece ids, merged in front of the text encoder (`text_e2e.onnx`).

Uses the onnxruntime-extensions `SentencepieceTokenizer` op (domain `ai.onnx.contrib`); running the result needs
that op library.
"""

from __future__ import annotations

import numpy as np

from tfemde.export.convert import DEFAULT_OPSET, ExportError

CONTRIB_DOMAIN = "ai.onnx.contrib"
_TOKENIZER_PREFIX = "tokenizer/"


def tokenizer_model(model_proto: bytes, max_length: int, opset: int = DEFAULT_OPSET, ir_version=None,
                    prefix: str = ""):
    """An ONNX graph from strings to padded SentencePiece ids: the front of `text_e2e.onnx`.

    The onnxruntime-extensions `SentencepieceTokenizer` op (the `.model` bytes as its `model` attribute; the six
    sampling/control inputs fed as constants: no sampling, no BOS/EOS, no reversal) gives ragged ids as
    `tokens` + row splits; plain ONNX ops then truncate each row to `max_length` and right-pad with 0 to the
    longest row of the batch (at least one column).

    Args:
        model_proto: the SentencePiece model bytes (`Tokenizer.model_proto`).
        max_length: T, the longest caption kept (in ids).
        opset: the default-domain opset.
        ir_version: the ONNX IR version to stamp (to match a graph it is merged with); None for onnx's default.
        prefix: prepended to every internal and output name.

    Returns:
        An `onnx.ModelProto` with input `text [batch]` string and outputs `{prefix}ids [batch, tokens]` int32 and
        `{prefix}mask [batch, tokens]` bool, `tokens = max(1, min(max_length, longest caption))`.

    Example:
        >>> from tfemde.text import Tokenizer
        >>> tok = Tokenizer.train(["a red apple", "a green pear"] * 10, vocab_size=15)
        >>> graph = tokenizer_model(tok.model_proto, max_length=8)
        >>> [o.name for o in graph.graph.output]
        ['ids', 'mask']
    """
    from onnx import TensorProto, helper, numpy_helper

    max_length = int(max_length)
    if max_length < 1:
        raise ValueError(f"max_length must be a positive int; got {max_length}")
    p = prefix

    def const(name, value, dtype):
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name=p + name)

    initializers = [
        const("nbest_size", [0], np.int64), const("alpha", [0.0], np.float32), const("add_bos", [False], bool),
        const("add_eos", [False], bool), const("reverse", [False], bool), const("fairseq", [False], bool),
        const("zero_token", [0], np.int32), const("zero", [0], np.int64), const("one", [1], np.int64),
        const("minus_one", [-1], np.int64), const("end", [np.iinfo(np.int64).max], np.int64),
        const("max_length", [max_length], np.int64), const("zero_scalar", 0, np.int64),
        const("one_scalar", 1, np.int64),
    ]
    nodes = [
        helper.make_node("SentencepieceTokenizer",
                         ["text"] + [p + n for n in ("nbest_size", "alpha", "add_bos", "add_eos", "reverse",
                                                     "fairseq")],
                         [p + "tokens", p + "row_splits", p + "token_offsets"], domain=CONTRIB_DOMAIN,
                         model=bytes(model_proto), name=p + "sentencepiece"),
        helper.make_node("Slice", [p + "row_splits", p + "zero", p + "minus_one"], [p + "starts"]),
        helper.make_node("Slice", [p + "row_splits", p + "one", p + "end"], [p + "ends"]),
        helper.make_node("Sub", [p + "ends", p + "starts"], [p + "lengths"]),
        helper.make_node("Min", [p + "lengths", p + "max_length"], [p + "kept"]),
        helper.make_node("ReduceMax", [p + "kept"], [p + "longest"], keepdims=1),
        helper.make_node("Max", [p + "longest", p + "one"], [p + "width"]),
        helper.make_node("Squeeze", [p + "width"], [p + "width_scalar"]),
        helper.make_node("Range", [p + "zero_scalar", p + "width_scalar", p + "one_scalar"], [p + "positions"]),
        helper.make_node("Unsqueeze", [p + "positions", p + "zero"], [p + "positions_row"]),
        helper.make_node("Unsqueeze", [p + "kept", p + "one"], [p + "kept_column"]),
        helper.make_node("Unsqueeze", [p + "starts", p + "one"], [p + "starts_column"]),
        helper.make_node("Less", [p + "positions_row", p + "kept_column"], [p + "mask"]),
        helper.make_node("Add", [p + "starts_column", p + "positions_row"], [p + "index"]),
        # Padded positions read one extra 0 appended after the last token (also when there are no tokens).
        helper.make_node("Shape", [p + "tokens"], [p + "num_tokens"]),
        helper.make_node("Where", [p + "mask", p + "index", p + "num_tokens"], [p + "safe_index"]),
        helper.make_node("Concat", [p + "tokens", p + "zero_token"], [p + "tokens_and_pad"], axis=0),
        helper.make_node("Gather", [p + "tokens_and_pad", p + "safe_index"], [p + "ids"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "sentencepiece_tokenizer",
        inputs=[helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        outputs=[helper.make_tensor_value_info(p + "ids", TensorProto.INT32, ["batch", "tokens"]),
                 helper.make_tensor_value_info(p + "mask", TensorProto.BOOL, ["batch", "tokens"])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(CONTRIB_DOMAIN, 1)],
                              producer_name="tfemde")
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def text_e2e_model(text_proto, model_proto: bytes, max_length: int, opset: int = DEFAULT_OPSET):
    """`tokenizer_model` merged in front of the text encoder graph: strings in, set (+ sketch) and ids out."""
    import onnx
    from onnx import helper

    pre = tokenizer_model(model_proto, max_length, opset=opset, ir_version=text_proto.ir_version,
                          prefix=_TOKENIZER_PREFIX)
    # The ids and mask also leave the graph (as token_ids / token_mask) so callers can see what was encoded.
    pre.graph.node.extend([helper.make_node("Identity", [_TOKENIZER_PREFIX + "ids"], ["token_ids"]),
                           helper.make_node("Identity", [_TOKENIZER_PREFIX + "mask"], ["token_mask"])])
    pre.graph.output.extend([helper.make_tensor_value_info("token_ids", onnx.TensorProto.INT32, ["batch", "tokens"]),
                             helper.make_tensor_value_info("token_mask", onnx.TensorProto.BOOL,
                                                           ["batch", "tokens"])])
    encoder_outputs = [o.name for o in text_proto.graph.output]
    merged = onnx.compose.merge_models(
        pre, text_proto,
        io_map=[(_TOKENIZER_PREFIX + "ids", "caption_ids"), (_TOKENIZER_PREFIX + "mask", "caption_mask")],
        outputs=encoder_outputs + ["token_ids", "token_mask"], name="text_e2e", producer_name="tfemde")
    order = encoder_outputs + ["token_ids", "token_mask"]
    outputs = sorted(merged.graph.output, key=lambda o: order.index(o.name))
    del merged.graph.output[:]
    merged.graph.output.extend(outputs)
    try:
        onnx.checker.check_model(merged)
    except Exception as error:  # noqa: BLE001
        raise ExportError(f"the merged text_e2e graph is not a valid ONNX graph: {error}") from error
    return merged

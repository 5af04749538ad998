"""The BiGRUs of an exported encoder as onnxruntime's own `GRU` kernel instead of tf2onnx's `Loop`s.

tf2onnx converts each Keras 3 GRU (a `tf.while_loop`) into an ONNX `Loop` that runs some 40 small nodes per time
step; ONNX has a `GRU` op, which onnxruntime runs as one kernel (all input projections in one matrix multiply, both
directions at once). The graph is made in three steps:

1. the encoder is traced with every `AveragedBiGRU` replaced by new graph inputs that stand for its outputs (the
   averaged sequence and, with `return_state`, the two final states), and with what it was given (its input and
   mask) as extra graph outputs (`tfemde.layers.recurrent.substituted`);
2. tf2onnx converts that trace (it has no loop left for these layers);
3. each layer's bidirectional ONNX `GRU`, its weights taken from the Keras layer, is spliced in between: the extra
   outputs feed it and it produces the tensors the stand-in inputs were. The extra inputs and outputs disappear.

Keras' GRU (`reset_after=True`, gates in the order z, r, h) is ONNX's GRU with `linear_before_reset=1`: the kernel
`[F, 3H]` transposed is `W`, the recurrent kernel transposed is `R`, and the bias rows (input, recurrent) laid end
to end are `B`. Keras skips masked steps and carries the state; for right-padded input that is ONNX's
`sequence_lens` (the backward direction starts at each sequence's last valid step). Masked steps output zeros, and
an empty sequence's states are zeros, as in Keras. The export's parity check (1e-4 against TensorFlow, with an empty
caption and several lengths) covers every graph made here.
"""

from __future__ import annotations

import numpy as np

from tfemde.export.convert import ExportError, checked, convert_function

LOOP = "onnx Loop (tf2onnx)"
NATIVE = "onnx GRU"
_PREFIX = "tfemde_bigru"


def bigru_layers(encoder) -> list:
    """The `AveragedBiGRU` layers inside `encoder` (a Keras model or layer), in a fixed order."""
    from tfemde.layers.recurrent import AveragedBiGRU

    return [layer for layer in encoder._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, AveragedBiGRU)]


def unsupported_reason(layer):
    """Why `layer`'s GRUs cannot become an ONNX `GRU` (None when they can)."""
    import keras

    if layer.compute_dtype != "float32":
        return f"{layer.name} computes in {layer.compute_dtype}, not float32"
    for gru in (layer.forward_layer, layer.backward_layer):
        cell = gru.cell
        if not (cell.reset_after and cell.use_bias):
            return f"{gru.name} has reset_after={cell.reset_after}, use_bias={cell.use_bias}"
        if cell.activation is not keras.activations.tanh or cell.recurrent_activation is not keras.activations.sigmoid:
            return f"{gru.name} uses activations other than tanh and sigmoid"
    return None


def _names(index):
    stem = f"{_PREFIX}{index}_"
    return {key: stem + key for key in ("sequence", "forward_state", "backward_state", "input", "mask")}


def _traced(python_fn, specs, layers):
    """A `tf.function` of `python_fn` with the layers' outputs as extra inputs and their inputs as extra outputs."""
    import tensorflow as tf

    extra = []
    for index, layer in enumerate(layers):
        names = _names(index)
        extra.append(tf.TensorSpec([None, None, layer.units], tf.float32, name=names["sequence"]))
        if layer.return_state:
            extra += [tf.TensorSpec([None, layer.units], tf.float32, name=names["forward_state"]),
                      tf.TensorSpec([None, layer.units], tf.float32, name=names["backward_state"])]

    def traced(*args):
        from tfemde.layers.recurrent import substituted

        standing_in = list(args[len(specs):])
        seen = {}

        def substitute(layer, inputs, mask):
            index = next((i for i, known in enumerate(layers) if known is layer), None)
            if index is None or index in seen:
                raise ExportError(f"{layer.name} is called more than once, or is not a layer of this encoder")
            if mask is None:
                mask = tf.ones(tf.shape(inputs)[:2], tf.bool)
            seen[index] = (inputs, tf.cast(mask, tf.bool))
            start = sum(3 if known.return_state else 1 for known in layers[:index])
            if layer.return_state:
                return tuple(standing_in[start:start + 3])
            return standing_in[start]

        with substituted(substitute):
            result = dict(python_fn(*args[:len(specs)]))
        if sorted(seen) != list(range(len(layers))):
            raise ExportError("not every BiGRU of the encoder ran while tracing it")
        for index, (inputs, mask) in seen.items():
            names = _names(index)
            result[names["input"]] = tf.identity(inputs)
            result[names["mask"]] = tf.identity(mask)
        return result

    return tf.function(traced, input_signature=list(specs) + extra), list(specs) + extra


def _weights(layer):
    """ONNX GRU `W [2, 3H, F]`, `R [2, 3H, H]`, `B [2, 6H]` (forward, reverse) from the Keras layer."""
    from keras import ops

    w, r, b = [], [], []
    for gru in (layer.forward_layer, layer.backward_layer):
        cell = gru.cell
        w.append(ops.convert_to_numpy(cell.kernel).T)
        r.append(ops.convert_to_numpy(cell.recurrent_kernel).T)
        bias = ops.convert_to_numpy(cell.bias)  # [2, 3H]: input bias, recurrent bias
        b.append(np.concatenate([bias[0], bias[1]]))
    return [np.ascontiguousarray(np.stack(v).astype(np.float32)) for v in (w, r, b)]


def _gru_nodes(index, layer):
    """The nodes and initializers that compute the layer's outputs from its input and mask (see the module doc)."""
    from onnx import TensorProto, helper, numpy_helper

    names = _names(index)
    p = f"{_PREFIX}{index}/"
    w, r, b = _weights(layer)
    constants = {"W": w, "R": r, "B": b, "axis1": np.array([1], np.int64), "axis2": np.array([2], np.int64),
                 "one": np.array(1, np.int32), "zero": np.array(0, np.int32), "half": np.array(0.5, np.float32),
                 "first": np.array(0, np.int64), "second": np.array(1, np.int64)}
    initializers = [numpy_helper.from_array(value, p + key) for key, value in constants.items()]
    node = helper.make_node
    nodes = [
        node("Transpose", [names["input"]], [p + "time_major"], perm=[1, 0, 2]),
        node("Cast", [names["mask"]], [p + "mask_int"], to=TensorProto.INT32),
        node("ReduceSum", [p + "mask_int", p + "axis1"], [p + "lengths"], keepdims=0),
        # onnxruntime refuses a zero length: an empty sequence runs one step, and its outputs are zeroed below.
        node("Max", [p + "lengths", p + "one"], [p + "lengths_at_least_1"]),
        node("GRU", [p + "time_major", p + "W", p + "R", p + "B", p + "lengths_at_least_1"],
             [p + "Y", p + "Y_h"], hidden_size=layer.units, direction="bidirectional", linear_before_reset=1),
        node("ReduceSum", [p + "Y", p + "axis1"], [p + "Y_sum"], keepdims=0),  # [T, 2, N, H] -> [T, N, H]
        node("Transpose", [p + "Y_sum"], [p + "Y_sum_batch_major"], perm=[1, 0, 2]),
        node("Mul", [p + "Y_sum_batch_major", p + "half"], [p + "Y_mean"]),
        node("Cast", [names["mask"]], [p + "mask_float"], to=TensorProto.FLOAT),
        node("Unsqueeze", [p + "mask_float", p + "axis2"], [p + "mask_steps"]),
        node("Mul", [p + "Y_mean", p + "mask_steps"], [names["sequence"]]),
    ]
    if layer.return_state:
        nodes += [
            node("Greater", [p + "lengths", p + "zero"], [p + "nonempty"]),
            node("Cast", [p + "nonempty"], [p + "nonempty_float"], to=TensorProto.FLOAT),
            node("Unsqueeze", [p + "nonempty_float", p + "axis1"], [p + "nonempty_rows"]),
            node("Gather", [p + "Y_h", p + "first"], [p + "forward_h"], axis=0),
            node("Gather", [p + "Y_h", p + "second"], [p + "backward_h"], axis=0),
            node("Mul", [p + "forward_h", p + "nonempty_rows"], [names["forward_state"]]),
            node("Mul", [p + "backward_h", p + "nonempty_rows"], [names["backward_state"]]),
        ]
    return nodes, initializers


def _subgraphs(node):
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def _outer_names(graph) -> set:
    """The names a (sub)graph reads from its enclosing scope."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {out for n in graph.node for out in n.output}
    used = set()
    for n in graph.node:
        used.update(name for name in n.input if name)
        for sub in _subgraphs(n):
            used |= _outer_names(sub)
    return used - defined


def _sort_nodes(graph):
    """Reorder `graph.node` so that every node comes after the nodes producing what it reads (subgraphs too)."""
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    needs = []
    for n in nodes:
        reads = {name for name in n.input if name}
        for sub in _subgraphs(n):
            reads |= _outer_names(sub)
        needs.append(sorted(producer[name] for name in reads if name in producer))
    order, state = [], [0] * len(nodes)  # 0 new, 1 on the stack, 2 placed
    for start in range(len(nodes)):
        stack = [(start, iter(needs[start]))]
        while stack:
            i, pending = stack[-1]
            if state[i] == 2:
                stack.pop()
                continue
            state[i] = 1
            child = next(pending, None)
            if child is None:
                state[i] = 2
                order.append(i)
                stack.pop()
            elif state[child] == 1:
                raise ExportError("the spliced graph has a cycle")
            elif state[child] == 0:
                stack.append((child, iter(needs[child])))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def splice(proto, layers):
    """Put each layer's ONNX `GRU` in place of its stand-in inputs and extra outputs (in place); returns `proto`."""
    graph = proto.graph
    outputs = {v.name for v in graph.output}
    for index, layer in enumerate(layers):
        names = _names(index)
        if names["input"] not in outputs or names["mask"] not in outputs:
            raise ExportError(f"the trace lost the input or mask of {layer.name}")
        nodes, initializers = _gru_nodes(index, layer)
        graph.node.extend(nodes)
        graph.initializer.extend(initializers)
    extra_inputs = {n for i in range(len(layers)) for k, n in _names(i).items()
                    if k in ("sequence", "forward_state", "backward_state")}
    extra_outputs = {n for i in range(len(layers)) for k, n in _names(i).items() if k in ("input", "mask")}
    kept_inputs = [v for v in graph.input if v.name not in extra_inputs]
    kept_outputs = [v for v in graph.output if v.name not in extra_outputs]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.output[:]
    graph.output.extend(kept_outputs)
    _sort_nodes(graph)
    return proto


def convert_encoder(tf_function, specs, encoder, opset, dims=None, what="model", native=True):
    """Convert an encoder's `tf.function` to ONNX, its BiGRUs as ONNX `GRU` ops where they can be.

    Args:
        tf_function: the encoder's `tf.function` (as made by `tfemde.export.signatures`).
        specs: its input `TensorSpec`s.
        encoder: the Keras model it calls (searched for `AveragedBiGRU` layers).
        opset, dims, what: as `tfemde.export.convert.convert_function`.
        native: False keeps tf2onnx's `Loop`s.

    Returns:
        `(proto, recurrence)`: the checked `ModelProto`, and `NATIVE`, `LOOP` (with the reason when `native` was
        asked for but a layer cannot be mapped) or None when the encoder has no recurrence.
    """
    layers = bigru_layers(encoder)
    if not layers:
        return convert_function(tf_function, specs, opset, dims, what=what), None
    reasons = [reason for reason in map(unsupported_reason, layers) if reason]
    if not native or reasons:
        recurrence = LOOP if not native else f"{LOOP}: {reasons[0]}"
        return convert_function(tf_function, specs, opset, dims, what=what), recurrence
    traced, traced_specs = _traced(tf_function.python_function, specs, layers)
    proto = splice(convert_function(traced, traced_specs, opset, what=what), layers)
    return checked(proto, dims, f"{what} with ONNX GRU ops"), NATIVE

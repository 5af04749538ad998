"""The BiGRUs of an exported encoder as onnxruntime's own `GRU` kernel instead of tf2onnx's `Loop`s.

tf2onnx converts each Keras 3 GRU (a `tf.while_loop`) into an ONNX `Loop` that runs some 40 small nodes per time
step; ONNX has a `GRU` op, which onnxruntime runs as one kernel (all input projections in one matrix multiply, both
directions at once). The graph is made in three steps:

1. the encoder is traced with every `AveragedBiGRU` replaced by new graph inputs that stand for its outputs (the
   averaged sequence and, with `return_state`, the two final states), and with what it was given (its input and
   mask) as extra graph outputs (`tfemde.layers.recurrent.substituted`);
2. tf2onnx converts that trace (it has no loop left for these layers);
3. each layer's recurrence, its weights taken from the Keras layer, is spliced in between: the extra outputs feed
   it and it produces the tensors the stand-in inputs were. The extra inputs and outputs disappear.

The recurrence is one bidirectional ONNX `GRU` op (`recurrence="gru"`, the float32 graphs) or two lean `Scan`s
(`recurrence="scan"`, one per direction, 13 nodes a step, input projections hoisted out of them), from which the
int8 graphs are quantized: onnxruntime has no int8 GRU kernel.

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
from tfemde.export.onnx_graph import sort_nodes

LOOP = "onnx Loop (tf2onnx)"
NATIVE = "onnx GRU"
LEAN_SCAN = "onnx Scan (tfemde)"
RECURRENCES = ("gru", "scan", "tf2onnx")
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


def _step_body(p, d, cell):
    """The `Scan` body of one step of direction `d` (`"forward"` / `"backward"`, its GRU `cell`), 13 nodes.

    State `h [N, H]`; scanned: the step's input projections `x_zr [N, 2H]` (input bias and the z and r parts of the
    recurrent bias added before the Scan) and `x_h [N, H]`, and `valid [N, 1]` (the step is inside the row's
    length). Outputs: the next state (the new state on valid rows, else `h`) and the new state (the Scan's scanned
    output, zeroed on invalid steps after it). Returns the body graph.
    """
    from keras import ops
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node
    units = cell.units
    recurrent_bias = ops.convert_to_numpy(cell.bias)[1]  # [3H]: z, r, h
    constants = {f"{d}_recurrent_kernel": ops.convert_to_numpy(cell.recurrent_kernel),
                 f"{d}_recurrent_bias_h": recurrent_bias[2 * units:],
                 "gates": np.array([2 * units, units], np.int64), "halves": np.array([units, units], np.int64)}
    h, x_zr, x_h, valid = f"{d}_h", f"{d}_x_zr", f"{d}_x_h", f"{d}_valid"
    nodes = [
        node("MatMul", [h, f"{d}_recurrent_kernel"], [f"{d}_hu"]),  # [N, 3H], without its bias
        node("Split", [f"{d}_hu", "gates"], [f"{d}_hu_zr", f"{d}_hu_h_raw"], axis=1),
        node("Add", [f"{d}_hu_h_raw", f"{d}_recurrent_bias_h"], [f"{d}_hu_h"]),
        node("Add", [x_zr, f"{d}_hu_zr"], [f"{d}_zr_raw"]),
        node("Sigmoid", [f"{d}_zr_raw"], [f"{d}_zr"]),
        node("Split", [f"{d}_zr", "halves"], [f"{d}_z", f"{d}_r"], axis=1),
        node("Mul", [f"{d}_r", f"{d}_hu_h"], [f"{d}_r_hu_h"]),
        node("Add", [x_h, f"{d}_r_hu_h"], [f"{d}_c_raw"]),
        node("Tanh", [f"{d}_c_raw"], [f"{d}_c"]),
        node("Sub", [h, f"{d}_c"], [f"{d}_h_minus_c"]),
        node("Mul", [f"{d}_z", f"{d}_h_minus_c"], [f"{d}_z_h_minus_c"]),
        node("Add", [f"{d}_c", f"{d}_z_h_minus_c"], [f"{d}_h_new"]),  # z*h + (1-z)*c
        node("Where", [valid, f"{d}_h_new", h], [f"{d}_h_next"]),
    ]
    value = lambda name, size: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", size])  # noqa: E731
    body = helper.make_graph(
        nodes, f"{p}{d}_step",
        [value(h, units), value(x_zr, 2 * units), value(x_h, units),
         helper.make_tensor_value_info(valid, TensorProto.BOOL, ["batch", 1])],
        [value(f"{d}_h_next", units), value(f"{d}_h_new", units)],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype), k)
                     for k, v in constants.items()])
    _prefix_local_names(body, f"{p}{d}_step/")
    return body


def _scan_nodes(index, layer):
    """Nodes and initializers computing the layer's outputs with two lean ONNX `Scan`s, one per direction.

    The input projections of all steps are two matrix multiplies before the Scans (with the input bias and the z
    and r parts of the recurrent bias, split into the gates' parts there); the backward direction runs forward
    over each row reversed within its length (`ReverseSequence`); a step past a row's length keeps the state, and
    the outputs of such steps are zeroed after the Scans. A body multiplies only by its own initializer (the
    recurrent kernel), so onnxruntime's dynamic quantizer makes int8 MatMuls of it: the int8 graphs use this form,
    since onnxruntime has no int8 GRU kernel. With one direction after the other, a step re-reads one recurrent
    kernel instead of two (at D = 1,024 in int8 3.1 MB, 1.5 MB a core, which a 2 MB L2 cache can hold): 1.16x faster
    at batch 1 than both directions in one body (DivE size, VNNI copies, 2 cores). A `Scan` slices its inputs and
    carries its state itself: 13 nodes a step against the 19 of a `Loop` that gathers its step and tests its own
    iteration count, 1.16x faster for one int8 direction at batch 1 (D = 1,024, 12 steps, same outputs).
    """
    from keras import ops
    from onnx import TensorProto, helper, numpy_helper

    names = _names(index)
    p = f"{_PREFIX}{index}/"
    units = layer.units
    node = helper.make_node
    constants = {"axis1": np.array([1], np.int64), "axis2": np.array([2], np.int64), "one": np.array(1, np.int64),
                 "zero": np.array(0, np.int64), "first": np.array([0], np.int64),
                 "units": np.array([units], np.int64), "half": np.array(0.5, np.float32),
                 "steps_axis": np.array(1, np.int64), "gates": np.array([2 * units, units], np.int64)}
    states = ([names["forward_state"], names["backward_state"]] if layer.return_state
              else [p + "forward_state", p + "backward_state"])
    nodes = [
        node("Transpose", [names["input"]], [p + "time_major"], perm=[1, 0, 2]),  # [T, N, F]
        node("Cast", [names["mask"]], [p + "mask_int"], to=TensorProto.INT64),
        node("ReduceSum", [p + "mask_int", p + "axis1"], [p + "lengths64"], keepdims=0),
        node("Max", [p + "lengths64", p + "one"], [p + "lengths_at_least_1"]),
        node("ReverseSequence", [p + "time_major", p + "lengths_at_least_1"], [p + "time_major_reversed"],
             batch_axis=1, time_axis=0),
        node("Shape", [names["input"]], [p + "shape"]),
        node("Gather", [p + "shape", p + "steps_axis"], [p + "steps"], axis=0),
        node("Gather", [p + "shape", p + "first"], [p + "batch"], axis=0),
        node("Concat", [p + "batch", p + "units"], [p + "state_shape"], axis=0),
        node("ConstantOfShape", [p + "state_shape"], [p + "zeros"],
             value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        node("Range", [p + "zero", p + "steps", p + "one"], [p + "step_index"]),
        node("Unsqueeze", [p + "step_index", p + "axis1"], [p + "step_column"]),  # [T, 1]
        node("Less", [p + "step_column", p + "lengths64"], [p + "valid_steps"]),  # [T, N]
        node("Unsqueeze", [p + "valid_steps", p + "axis2"], [p + "valid"]),  # [T, N, 1]
        node("Cast", [p + "valid"], [p + "valid_float"], to=TensorProto.FLOAT),
        node("Mul", [p + "valid_float", p + "half"], [p + "valid_half"]),
    ]
    scanned = []
    for d, cell, state, steps in (("forward", layer.forward_layer.cell, states[0], p + "time_major"),
                                  ("backward", layer.backward_layer.cell, states[1], p + "time_major_reversed")):
        bias = ops.convert_to_numpy(cell.bias)  # [2, 3H]: input bias, recurrent bias
        constants[f"{d}_kernel"] = ops.convert_to_numpy(cell.kernel)
        constants[f"{d}_input_bias"] = bias[0] + np.concatenate([bias[1][:2 * units], np.zeros(units, bias.dtype)])
        nodes += [
            node("MatMul", [steps, p + f"{d}_kernel"], [p + f"{d}_projected_raw"]),
            node("Add", [p + f"{d}_projected_raw", p + f"{d}_input_bias"], [p + f"{d}_projected"]),
            node("Split", [p + f"{d}_projected", p + "gates"], [p + f"{d}_x_zr", p + f"{d}_x_h"], axis=2),
            node("Scan", [p + "zeros", p + f"{d}_x_zr", p + f"{d}_x_h", p + "valid"], [state, p + f"{d}_steps_Y"],
                 body=_step_body(p, d, cell), num_scan_inputs=3),
        ]
        scanned.append(p + f"{d}_steps_Y")
    nodes += [
        node("ReverseSequence", [scanned[1], p + "lengths_at_least_1"], [p + "backward_Y"], batch_axis=1,
             time_axis=0),
        node("Add", [scanned[0], p + "backward_Y"], [p + "Y_sum"]),
        node("Mul", [p + "Y_sum", p + "valid_half"], [p + "Y_mean"]),  # steps past a row's length: zeros
        node("Transpose", [p + "Y_mean"], [names["sequence"]], perm=[1, 0, 2]),
    ]
    initializers = [numpy_helper.from_array(np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype), p + k)
                    for k, v in constants.items()]
    return nodes, initializers


def _prefix_local_names(graph, prefix):
    """Rename what `graph` defines itself (inputs, outputs, initializers, node outputs) to `prefix + name`, so that
    a body's names are unique in the whole model; names from the enclosing scope stay as they are."""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local |= {out for n in graph.node for out in n.output}
    rename = lambda name: prefix + name if name in local else name  # noqa: E731
    for value in (*graph.input, *graph.output, *graph.initializer):
        value.name = rename(value.name)
    for n in graph.node:
        n.input[:] = [rename(name) for name in n.input]
        n.output[:] = [rename(name) for name in n.output]


def splice(proto, layers, build=_gru_nodes):
    """Put each layer's recurrence (`build`: `_gru_nodes` or `_scan_nodes`) in place of its stand-in inputs and
    extra outputs (in place); returns `proto`."""
    graph = proto.graph
    outputs = {v.name for v in graph.output}
    for index, layer in enumerate(layers):
        names = _names(index)
        if names["input"] not in outputs or names["mask"] not in outputs:
            raise ExportError(f"the trace lost the input or mask of {layer.name}")
        nodes, initializers = build(index, layer)
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
    sort_nodes(graph)
    return proto


def convert_encoder(tf_function, specs, encoder, opset, dims=None, what="model", recurrence="gru"):
    """Convert an encoder's `tf.function` to ONNX with its BiGRUs in the form `recurrence` asks for.

    Args:
        tf_function: the encoder's `tf.function` (as made by `tfemde.export.signatures`).
        specs: its input `TensorSpec`s.
        encoder: the Keras model it calls (searched for `AveragedBiGRU` layers).
        opset, dims, what: as `tfemde.export.convert.convert_function`.
        recurrence: `"gru"` (ONNX `GRU` ops, the fastest float32 form), `"scan"` (two lean `Scan`s per layer whose
            recurrent MatMuls quantize to int8) or `"tf2onnx"` (the converter's own `Loop`s).

    Returns:
        `(proto, form)`: the checked `ModelProto`, and what its recurrence is (`NATIVE`, `LEAN_SCAN`, `LOOP`; `LOOP`
        with the reason when a layer cannot be mapped), or None when the encoder has no recurrence.
    """
    if recurrence not in RECURRENCES:
        raise ValueError(f"recurrence must be one of {', '.join(map(repr, RECURRENCES))}; got {recurrence!r}")
    layers = bigru_layers(encoder)
    if not layers:
        return convert_function(tf_function, specs, opset, dims, what=what), None
    reasons = [reason for reason in map(unsupported_reason, layers) if reason]
    if recurrence == "tf2onnx" or reasons:
        form = LOOP if recurrence == "tf2onnx" else f"{LOOP}: {reasons[0]}"
        return convert_function(tf_function, specs, opset, dims, what=what), form
    traced, traced_specs = _traced(tf_function.python_function, specs, layers)
    build, form = {"gru": (_gru_nodes, NATIVE), "scan": (_scan_nodes, LEAN_SCAN)}[recurrence]
    proto = splice(convert_function(traced, traced_specs, opset, what=what), layers, build)
    return checked(proto, dims, f"{what} with its recurrence as {form}"), form

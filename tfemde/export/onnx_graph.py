"""ONNX graph edits the export needs beyond tf2onnx.

`sort_nodes` puts every node after the nodes producing what it reads, counting what its subgraphs (`Loop` and `If`
bodies) read from the enclosing scope, which `onnx.checker` requires and graph editors (the splice of `native_rnn`,
onnxruntime's quantizer) do not keep.

`collapse_tensordots` turns tf2onnx's form of a Keras `Dense` on a `[B, K, D]` tensor (`tf.tensordot`: a chain of
Shape / Gather / ReduceProd / Concat / Cast nodes computing a `[B·K, D]` Reshape before the MatMul and a
`[B, K, E]` Reshape after it) into the one MatMul ONNX broadcasts over the leading axes; `prune` then drops what
nothing reads. The set-prediction heads hold dozens of these: a DivE-size graph loses 126-141 of its ~600 nodes.

`static_reshapes` gives the Reshapes whose targets tf2onnx computes from the Shape of their own input (the
attention heads' splits and merges) constant targets, with 0 for "keep this axis", so that no Shape / Slice / Concat
/ Cast chain runs per call.

`fuse_layer_norms` turns tf2onnx's 12 or 13 nodes for a Keras `LayerNormalization` over the last axis (the moments,
then `x · γ/σ + (β - μ · γ/σ)`) into ONNX's `LayerNormalization` (opset 17), one kernel instead of a dozen passes.
"""

from __future__ import annotations

import re


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


def sort_nodes(graph):
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
                raise ValueError(f"graph {graph.name!r} has a cycle")
            elif state[child] == 0:
                stack.append((child, iter(needs[child])))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


# tf2onnx names a tensordot's MatMul `.../Tensordot/MatMul`, `.../Tensordot_3/MatMul`, ... (one per call site).
_TENSORDOT = re.compile(r"/Tensordot(_\d+)?/")
# What computes a tensordot's Reshape targets from the Shape of its input (tf2onnx 1.17's output).
_SHAPE_ARITHMETIC = {"Cast", "Gather", "ReduceProd", "Unsqueeze", "Concat", "Squeeze", "Slice", "Identity"}


def _shapes(model) -> dict:
    """`{value name: [size or None per axis]}` of the values of `model`'s main graph whose rank ONNX shape inference
    knows."""
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(model).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*graph.value_info, *graph.input, *graph.output) if v.type.tensor_type.HasField("shape")}


def _index(model):
    """`(producer, readers, outputs, shapes)` of `model`'s main graph: the node making each value, the nodes reading
    it (a node once per input it reads it as), the graph output names, and `_shapes`."""
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    readers = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    return producer, readers, {v.name for v in graph.output}, _shapes(model)


def collapse_tensordots(model) -> int:
    """Replace every `tf.tensordot` over the last axis, `Reshape(x) -> MatMul(·, W) -> Reshape` (tf2onnx names the
    MatMul `.../Tensordot/MatMul` or `.../Tensordot_<n>/MatMul`) whose two shapes are computed from `Shape(x)`
    alone, by `MatMul(x, W)` (in place; `W` a 2-D initializer, `x` of rank >= 3, the result of `x`'s rank); then
    `prune`.

    Returns the number of MatMuls rewired. The values the graph computes are unchanged.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producer, readers, outputs, shapes = _index(model)
    ranks = {name: len(shape) for name, shape in shapes.items()}

    def only_from_shape_of(name, x):
        todo, seen = [name], set()
        while todo:
            value = todo.pop()
            if value in seen or value in initializers or not value:
                continue
            seen.add(value)
            node = producer.get(value)
            if node is None or (node.op_type == "Shape" and node.input[0] != x):
                return False
            if node.op_type != "Shape":
                if node.op_type not in _SHAPE_ARITHMETIC:
                    return False
                todo.extend(node.input)
        return True

    rewired = 0
    for matmul in list(graph.node):
        if matmul.op_type != "MatMul" or not _TENSORDOT.search(matmul.name):
            continue
        weight, before = initializers.get(matmul.input[1]), producer.get(matmul.input[0])
        after = readers.get(matmul.output[0], [])
        if weight is None or len(weight.dims) != 2 or before is None or before.op_type != "Reshape" \
                or len(after) != 1 or after[0].op_type != "Reshape" or matmul.output[0] in outputs:
            continue
        x, reshaped = before.input[0], after[0].output[0]
        if ranks.get(x, 0) < 3 or ranks.get(reshaped) != ranks[x] or reshaped in outputs \
                or not only_from_shape_of(before.input[1], x) or not only_from_shape_of(after[0].input[1], x):
            continue
        matmul.input[0] = x
        for reader in readers.get(reshaped, []):
            reader.input[:] = [matmul.output[0] if name == reshaped else name for name in reader.input]
        rewired += 1
    prune(graph)
    return rewired


def _shape_entries(name, data, constant, producer, ranks):
    """The entries of the 1-D int tensor `name` as ints and `("axis", i)` (axis `i` of `data`'s shape), when it is
    computed only from constants and `Shape(data)` by Cast, Slice (axis 0, step 1), Concat, Squeeze and Unsqueeze;
    else None."""
    value = constant(name)
    if value is not None:
        return [int(v) for v in value.reshape(-1)] if value.dtype.kind in "iu" else None
    node = producer.get(name)
    if node is None:
        return None
    recurse = lambda value_name: _shape_entries(value_name, data, constant, producer, ranks)  # noqa: E731
    if node.op_type in ("Cast", "Squeeze", "Unsqueeze"):  # a shape's small ints are exact in every int type
        return recurse(node.input[0])
    if node.op_type == "Shape":
        return ([("axis", i) for i in range(ranks[data])]
                if node.input[0] == data and not node.attribute and ranks.get(data) else None)
    if node.op_type == "Concat":
        parts = [recurse(value_name) for value_name in node.input]
        return None if any(p is None for p in parts) else [entry for part in parts for entry in part]
    if node.op_type == "Slice":
        source = recurse(node.input[0])
        bounds = [constant(value_name) if value_name else None for value_name in (list(node.input) + [""] * 5)[1:5]]
        starts, ends, axes, steps = (None if b is None else [int(v) for v in b.reshape(-1)] for b in bounds)
        if source is None or starts is None or ends is None or axes not in (None, [0], [-1]) \
                or steps not in (None, [1]) or len(starts) != 1 or len(ends) != 1:
            return None
        return source[starts[0]:ends[0]]  # Python's slice clamps as ONNX's Slice does
    return None


def static_reshapes(model) -> int:
    """Give every `Reshape` whose target tf2onnx computes at run time from the `Shape` of the Reshape's own input
    (Shape -> Cast -> Slice -> Concat with constants -> Cast: a head split `[B, N, H·d] -> [B, N, H, d]`) a constant
    target (in place), with 0 ("keep this axis") where the target takes an axis of the input at the same position
    and -1 for at most one other unknown axis; then `prune`. Returns the number of Reshapes made static.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}

    def constant(name):
        return numpy_helper.to_array(initializers[name]) if name in initializers else None
    producer, _, _, shapes = _index(model)
    ranks = {name: len(shape) for name, shape in shapes.items()}
    made = 0
    for node in graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Reshape" or node.input[1] in initializers or attributes.get("allowzero", 0):
            continue
        data = node.input[0]
        entries = _shape_entries(node.input[1], data, constant, producer, ranks)
        if entries is None:
            continue
        target = []
        for position, entry in enumerate(entries):
            if not isinstance(entry, tuple):
                target.append(entry)
            elif entry[1] == position:
                target.append(0)
            else:
                size = shapes[data][entry[1]]
                target.append(size if size else -1)
        if target.count(-1) > 1:
            continue
        name = f"{node.name or node.output[0]}/static_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), name))
        node.input[1] = name
        made += 1
    prune(graph)
    return made


def _last_axis_mean(node, x, ranks) -> bool:
    """Whether `node` is the mean of `x` over its last axis, keeping that axis (tf2onnx writes a rank-3 mean as
    GlobalAveragePool, which averages every axis after the second)."""
    from onnx import helper

    rank = ranks.get(x)
    if node is None or node.input[0] != x or rank is None:
        return False
    if node.op_type == "GlobalAveragePool":
        return rank == 3
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (node.op_type == "ReduceMean" and len(node.input) == 1 and attributes.get("keepdims", 1) == 1
            and list(attributes.get("axes", [])) in ([-1], [rank - 1]))


def fuse_layer_norms(model) -> int:
    """Replace tf2onnx's form of every layer normalisation over the last axis by a `LayerNormalization` node (in
    place; opset >= 17, else nothing changes), then `prune`:

        μ = mean(x); σ² = mean((x - μ)²); s = γ / sqrt(σ² + ε)   (γ: a constant, or none)
        y = x · s + (-μ · s [+ β])                              (β: a constant, or none)

    Only chains whose intermediate values nothing else reads, with a constant ε and constant γ and β of the last
    axis's size. Returns the number of layer normalisations fused.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 17:
        return 0
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}

    def constant(name):  # converted only when a chain asks (the graph's weights are most of its bytes)
        return numpy_helper.to_array(initializers[name]) if name in initializers else None
    producer, readers, outputs, shapes = _index(model)
    ranks = {name: len(shape) for name, shape in shapes.items()}

    def made_by(name, op):
        node = producer.get(name)
        return node if node is not None and node.op_type == op else None

    def read_only_by(node, *expected):
        name = node.output[0]
        return name not in outputs and sorted(map(id, readers.get(name, []))) == sorted(map(id, expected))

    def vector(name, size):
        value = constant(name)
        if value is None or value.size != size or any(d != 1 for d in value.shape[:-1]):
            return None
        return value.reshape(-1).astype(np.float32)

    def other_input(node, name):
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    fused, new_nodes, dead = 0, [], set()
    for reciprocal in [n for n in graph.node if n.op_type == "Reciprocal"]:
        sqrt = made_by(reciprocal.input[0], "Sqrt")
        add_eps = sqrt and made_by(sqrt.input[0], "Add")
        variance = add_eps and producer.get(add_eps.input[0])
        square = variance and made_by(variance.input[0], "Mul")
        centred = square and square.input[0] == square.input[1] and made_by(square.input[0], "Sub")
        epsilon = constant(add_eps.input[1]) if centred else None
        if epsilon is None or epsilon.size != 1:
            continue
        x, mean = centred.input[0], producer.get(centred.input[1])
        size = (shapes.get(x) or [None])[-1]
        if not (size and _last_axis_mean(mean, x, ranks) and _last_axis_mean(variance, square.output[0], ranks)):
            continue
        scale, gamma = reciprocal, np.ones(size, np.float32)  # s = 1/σ, or γ/σ when a Mul by γ follows
        after = readers.get(reciprocal.output[0], [])
        if len(after) == 1 and after[0].op_type == "Mul" and vector(other_input(after[0], reciprocal.output[0]),
                                                                    size) is not None:
            scale, gamma = after[0], vector(other_input(after[0], reciprocal.output[0]), size)
        uses = readers.get(scale.output[0], [])
        times_x = [n for n in uses if n.op_type == "Mul" and other_input(n, scale.output[0]) == x]
        shift = [n for n in uses if n.op_type == "Mul" and made_by(other_input(n, scale.output[0]) or "", "Neg")]
        if len(uses) != 2 or len(times_x) != 1 or len(shift) != 1:
            continue
        times_x, shift = times_x[0], shift[0]
        neg = made_by(other_input(shift, scale.output[0]), "Neg")
        last, beta, with_beta = (readers.get(shift.output[0]) or [None])[0], np.zeros(size, np.float32), []
        if last is None or last.op_type != "Add" or neg.input[0] != mean.output[0]:
            continue
        if times_x.output[0] not in last.input:  # a β first: y = x · s + (-μ · s + β)
            beta = vector(other_input(last, shift.output[0]), size)
            outer = readers.get(last.output[0], [])
            if beta is None or len(outer) != 1 or outer[0].op_type != "Add" or times_x.output[0] not in outer[0].input:
                continue
            with_beta, last = [last], outer[0]
        chain = [(mean, [centred, neg]), (centred, [square, square]), (square, [variance]), (variance, [add_eps]),
                 (add_eps, [sqrt]), (sqrt, [reciprocal]), (scale, [times_x, shift]), (times_x, [last]),
                 (neg, [shift]), (shift, [with_beta[0] if with_beta else last])]
        chain += [(reciprocal, [scale])] if scale is not reciprocal else []
        chain += [(with_beta[0], [last])] if with_beta else []
        if not all(read_only_by(node, *expected) for node, expected in chain):
            continue
        fused += 1
        stem = f"{last.name or last.output[0]}/layer_norm"
        graph.initializer.extend([numpy_helper.from_array(gamma, stem + "/gamma"),
                                  numpy_helper.from_array(beta, stem + "/beta")])
        new_nodes.append(helper.make_node(
            "LayerNormalization", [x, stem + "/gamma", stem + "/beta"], [last.output[0]], name=stem, axis=-1,
            epsilon=float(epsilon.reshape(()))))
        dead.update(id(node) for node, _ in chain)
        dead.add(id(last))
    if fused:
        kept = [n for n in graph.node if id(n) not in dead] + new_nodes
        del graph.node[:]
        graph.node.extend(kept)
        sort_nodes(graph)
        prune(graph)
    return fused


def prune(graph) -> None:
    """Drop the nodes and initializers of `graph` (topologically sorted) that no graph output depends on, counting
    what subgraphs read from the enclosing scope."""
    needed = {v.name for v in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
            for sub in _subgraphs(node):
                needed |= _outer_names(sub)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used_initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used_initializers)

"""ONNX graph edits the export needs beyond tf2onnx.

`sort_nodes` puts every node after the nodes producing what it reads, counting what its subgraphs (`Loop` and `If`
bodies) read from the enclosing scope, which `onnx.checker` requires and graph editors (the splice of `native_rnn`,
onnxruntime's quantizer) do not keep.

`collapse_tensordots` turns tf2onnx's form of a Keras `Dense` on a `[B, K, D]` tensor (`tf.tensordot`: a chain of
Shape / Gather / ReduceProd / Concat / Cast nodes computing a `[B·K, D]` Reshape before the MatMul and a
`[B, K, E]` Reshape after it) into the one MatMul ONNX broadcasts over the leading axes; `prune` then drops what
nothing reads. The set-prediction heads hold dozens of these: a DivE-size graph loses 126-141 of its ~600 nodes.
"""

from __future__ import annotations


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


# What computes a tensordot's Reshape targets from the Shape of its input (tf2onnx 1.17's output).
_SHAPE_ARITHMETIC = {"Cast", "Gather", "ReduceProd", "Unsqueeze", "Concat", "Squeeze", "Slice", "Identity"}


def _ranks(model) -> dict:
    """`{value name: rank}` of the values of `model`'s main graph whose rank ONNX shape inference knows."""
    from onnx import shape_inference

    graph = shape_inference.infer_shapes(model).graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input, *graph.output)
            if v.type.tensor_type.HasField("shape")}


def collapse_tensordots(model) -> int:
    """Replace every `tf.tensordot` over the last axis, `Reshape(x) -> MatMul(·, W) -> Reshape` (tf2onnx names the
    MatMul `.../Tensordot/MatMul`) whose two shapes are computed from `Shape(x)` alone, by `MatMul(x, W)` (in place;
    `W` a 2-D initializer, `x` of rank >= 3, the result of `x`'s rank); then `prune`.

    Returns the number of MatMuls rewired. The values the graph computes are unchanged.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}
    readers = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    outputs = {v.name for v in graph.output}
    ranks = _ranks(model)

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
        if matmul.op_type != "MatMul" or "/Tensordot/" not in matmul.name:
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

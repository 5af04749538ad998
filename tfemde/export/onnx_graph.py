"""ONNX graph order: `sort_nodes` puts every node after the nodes producing what it reads, counting what its
subgraphs (`Loop` and `If` bodies) read from the enclosing scope, which `onnx.checker` requires and graph editors
(the splice of `native_rnn`, onnxruntime's quantizer) do not keep.
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

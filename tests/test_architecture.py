"""The package's import graph: no cycles between tfemde modules, and a serving runtime that never needs TensorFlow.

Read from the source with `ast` (function-level imports included, since they only hide a cycle), not by importing.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tfemde"
FRAMEWORKS = ("tensorflow", "keras", "tf_keras", "tensorflow_text", "tf2onnx")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, modules) -> list:
    """`(imported module, at module level?)` of every import in a file; `from pkg import mod` names the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            found.append((target, id(node) in top_level))
    return found


def _graph():
    modules = _modules()
    edges = {name: set() for name in modules}
    external = {name: [] for name in modules}
    for name, path in modules.items():
        for target, module_level in _imports(path, name, modules):
            if target in modules and target != name:
                # importing a submodule runs its parent package first; that edge is implicit, not a cycle
                if not name.startswith(target + "."):
                    edges[name].add(target)
            else:
                external[name].append((target, module_level))
    return edges, external


def _cycles(edges):
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles_between_tfemde_modules():
    edges, _ = _graph()
    assert len(edges) > 40  # the walk found the package
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_serving_and_the_cli_never_import_a_framework_at_module_level():
    """Every tfemde module the serving runtime or the CLI reaches at import time imports no TensorFlow/Keras at
    module level (and tfemde.serving itself none anywhere); `tests/test_serving.py` checks the same at run time."""
    _, external = _graph()
    modules = _modules()
    module_level_edges = {name: {t for t, top in _imports(path, name, modules) if t in modules and top}
                          for name, path in modules.items()}
    # the CLI parses its arguments (and runs its serving commands) before anything imports TensorFlow
    reached, todo = set(), [m for m in modules if m.startswith("tfemde.serving")] + ["tfemde", "tfemde.cli"]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo.extend(module_level_edges[name])
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)
    assert "tfemde.serving.encoder" in reached and "tfemde.images" in reached
    for name in sorted(reached):
        for target, module_level in external[name]:
            framework = target.split(".")[0] in FRAMEWORKS
            assert not (framework and (module_level or name.startswith("tfemde.serving"))), (name, target)


# The layers of the package, lowest first: a module may import its own layer and the layers below, never above.
# `serving` sits low although it runs last: it is the TF-free core that evaluation reuses (the NumPy similarity,
# `Embeddings`) and that applications install alone.
LAYERS = (
    ("tfemde._moved", "tfemde.files", "tfemde.images", "tfemde.text"),
    ("tfemde.serving",),
    ("tfemde.data",),
    ("tfemde.layers",),
    ("tfemde.similarity", "tfemde.losses"),
    ("tfemde.models",),
    ("tfemde.evaluation",),
    ("tfemde.training",),
    ("tfemde.export",),
    ("tfemde.quickstart", "tfemde.cli", "tfemde"),
)


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} belongs to no layer of LAYERS; add it where it belongs in the data flow"
    return best[0]


def _upward_imports(edges) -> list:
    return sorted((name, target) for name, targets in edges.items() for target in targets
                  if _layer(target) > _layer(name))


def test_every_import_points_down_the_layers():
    edges, _ = _graph()
    assert {_layer(name) for name in edges} == set(range(len(LAYERS)))  # every layer has modules
    assert _upward_imports(edges) == []


def test_layer_check_finds_an_upward_import():
    edges = {"tfemde.evaluation.model": {"tfemde.training.runs"}, "tfemde.training.runs": {"tfemde.evaluation"}}
    assert _upward_imports(edges) == [("tfemde.evaluation.model", "tfemde.training.runs")]

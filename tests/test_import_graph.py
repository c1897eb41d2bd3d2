"""The package's intra-package import graph is acyclic (relative and absolute imports alike).

Two graphs are checked. Load time: the imports that run when a module is imported (top level, and inside
top-level ``if``/``try``/``with`` blocks). A cycle there means two modules each need the other to finish loading
first, which works only by the accident of import order. Design: every import, including those inside
functions. A function-level import that points back at its importer hides a cycle rather than removing it: the
two modules are one unit split in two, and a responsibility sits in the wrong place. ``if TYPE_CHECKING:``
blocks never run and never count.
"""
import ast
import pathlib

PKG = "gxpo_kernels"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PKG

def _modules():
    """{dotted module name: (path, is_package)} for every .py file of the package."""
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def _is_type_checking(test) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree, lazy: bool):
    """Import nodes that run when the module is imported (top level, and inside top-level if/try/with blocks);
    with ``lazy``, also those inside functions and classes."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                todo += node.body
            todo += node.orelse
        elif isinstance(node, (ast.Try, ast.With, ast.For, ast.While)) or (
                lazy and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))):
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
        elif isinstance(node, ast.ClassDef):  # a class body runs at import time
            todo += node.body
        elif lazy and isinstance(node, ast.stmt):
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]


def import_graph(lazy: bool = False):
    """{module: set of package modules it imports}, at load time or (``lazy``) anywhere. ``from X import name``
    depends on X and, when ``X.name`` is a submodule, on it too; importing ``a.b.c`` also runs ``a`` and ``a.b``."""
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        pkg = name if is_pkg else name.rpartition(".")[0]
        deps = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), lazy):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c runs a, a.b and a.b.c
                    cand = ".".join(parts[:i])
                    if cand in mods and cand != name:
                        deps.add(cand)
        # a package's parents run before it, which is no edge of its own making: drop them
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def find_cycles(graph):
    """Strongly connected components with more than one module (or a self-import), each as a sorted list."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _cycle_path(graph, comp):
    """One closed import path through the component, for the error message: a -> b -> ... -> a."""
    members = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(d for d in graph[path[-1]] if d in members)
        back = [d for d in nxt if d == start]
        if back and len(path) > 1 or not [d for d in nxt if d not in seen]:
            return " -> ".join(path + [start])
        step = [d for d in nxt if d not in seen][0]
        path.append(step)
        seen.add(step)


def test_graph_sees_relative_absolute_and_lazy_imports():
    graph, lazy = import_graph(), import_graph(lazy=True)
    assert "gxpo_kernels._utils" in graph["gxpo_kernels.ops.logprobs.kernel"]       # from ..._utils import ...
    assert "gxpo_kernels.ops" in graph["gxpo_kernels"]                               # from .ops import ...
    # from ._cpp import extrapolate_cpp_, inside extrapolate_(): a design edge only
    assert "gxpo_kernels.ops.extrapolate._cpp" not in graph["gxpo_kernels.ops.extrapolate.op"]
    assert "gxpo_kernels.ops.extrapolate._cpp" in lazy["gxpo_kernels.ops.extrapolate.op"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]] and find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_at_load_time():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "load-time import cycles:\n" + "\n".join(_cycle_path(graph, c) for c in cycles)


def test_no_import_cycles_in_design():
    graph = import_graph(lazy=True)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        _cycle_path(graph, c) for c in cycles)

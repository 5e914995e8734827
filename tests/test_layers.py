"""The import graph of the package (terdit_jax/ and kernels/ as terdit_kernels) has no cycle, counting the
imports inside functions too: a file imports only from layers below it (shared/design.md)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FOLDERS = {"terdit_jax": "terdit_jax", "kernels": "terdit_kernels"}


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the project."""
    found = {}
    for folder, name in FOLDERS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            pkg = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    found[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(dirpath, f)
    return found


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (a package's own submodules excluded: Python
    runs a package's __init__ before any of its submodules, which is no cycle)."""
    is_pkg = path.endswith("__init__.py")
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    mods = modules()
    assert {"terdit_jax.ptq.common", "terdit_jax.models.families", "terdit_kernels.ops"} <= set(mods)
    graph = {}
    for name, path in mods.items():
        own = name + "."
        graph[name] = {m for m in imports_of(name, path, set(mods)) if not m.startswith(own)}
    assert sum(map(len, graph.values())) > 100  # the reading found the project's imports
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import g\n")
    known = {"a", "b"}
    graph = {m: imports_of(m, str(tmp_path / f"{m}.py"), known) for m in known}
    assert find_cycle(graph) == ["a", "b", "a"]

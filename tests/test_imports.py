"""No import cycle in the package, counting the imports made inside functions.

The graph is built from the source with `ast`: an edge `a -> b` for every `import b`,
`from b import x` (and `from a import b` when `b` is a submodule) anywhere in module `a`, at
the top or inside a function. A cycle is found by a depth-first search; the test names it.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jackpots_jax"
PACKAGE = "jackpots_jax"


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(name: str, tree: ast.AST, modules: set[str], is_package: bool) -> set[str]:
    """The package's modules that module `name` imports, wherever in it the import is."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` imports a, a.b and a.b.c; an ancestor package of the importer is
            # already being imported, so it is not an edge.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {
        name: imports_of(name, ast.parse(path.read_text()), modules, path.name == "__init__.py")
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"jackpots_jax.experiment.modes", "jackpots_jax.io.weights"} <= set(graph)
    assert "jackpots_jax.experiment.recipes" in graph["jackpots_jax.experiment.modes"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "sources, cycle",
    [
        # b imports a only inside a function: still a cycle.
        ({"a.py": "from jackpots_jax import b\n", "b.py": "def f():\n    import jackpots_jax.a\n"},
         True),
        ({"a.py": "from jackpots_jax.b import x\n", "b.py": "x = 1\n"}, False),
        # Through a package and a relative import.
        ({"p/__init__.py": "", "p/c.py": "from . import d\n",
          "p/d.py": "from jackpots_jax.p.c import y\n"}, True),
        # A module importing its own package's `__init__` is not an edge.
        ({"p/__init__.py": "from jackpots_jax.p import c\n", "p/c.py": "import jackpots_jax.p\n"},
         False),
    ],
)  # fmt: skip
def test_the_cycle_finder_on_hand_made_packages(tmp_path, sources, cycle):
    for relative, text in sources.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = find_cycle(import_graph(tmp_path))
    assert (found is not None) == cycle, found

"""The shape of the code: no function over 60 lines (experiments/ and tests/), and no import
cycle among the modules of experiments/ or of gam_optax/ (imports inside functions count
too)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[2]
MAX_LINES = 60


def python_files(*folders: str) -> list[pathlib.Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)"
        for path in python_files("experiments", "tests")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := node.end_lineno - node.lineno + 1) > MAX_LINES
    ]
    assert not long, f"split these functions (at most {MAX_LINES} lines each): {long}"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(folder: str = "experiments") -> dict[str, set[str]]:
    """``{module: the modules of ``folder`` it imports}``, anywhere in its code. A package's
    ``__init__`` only hands names on: ``from package import module`` is an edge to the
    module, not to the package."""
    paths = {module_name(p): p for p in python_files(folder)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[: len(base) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets.add(module)
                targets.update(f"{module}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in paths and t not in (name, folder)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the list of its modules (first = last), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_experiments_has_no_import_cycle():
    graph = import_graph()
    # The graph holds the imports inside functions and `if __name__ == "__main__":` blocks.
    assert "experiments.cli" in graph["experiments.train"]
    assert "experiments.train" in graph["experiments.compare"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_library_has_no_import_cycle_and_its_frame_imports_no_algorithm():
    """Algorithms -> the frame -> the oracle, checks and tree maths; never the reverse."""
    graph = import_graph("gam_optax")
    assert "gam_optax._frame" in graph["gam_optax._gam"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    algorithms = {"gam_optax._gam", "gam_optax._sam", "gam_optax._penalty"}
    for foundation in ("gam_optax._frame", "gam_optax._oracle", "gam_optax._tree_math"):
        assert not graph[foundation] & algorithms, foundation

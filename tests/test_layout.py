"""The package's own shape: no import cycles between fastattr's modules, at any depth (imports
inside functions count: a lazy import still makes two modules depend on each other)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_graph() -> dict[str, set[str]]:
    files = {}
    for path in (ROOT / "fastattr").rglob("*.py"):
        files[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    for path in (ROOT / "kernels").rglob("*.py"):  # installed as fastattr.kernels
        files["fastattr." + ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from ._triton import y
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        # the top-level package only re-exports; edges into it would make every module a cycle
        graph[name] = {d for d in deps if d in files and d not in (name, "fastattr")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_the_modules_and_their_imports():
    graph = module_graph()
    assert "fastattr.tools.cohort" in graph["fastattr.tools.demo"]
    assert "fastattr.kernels._triton" in graph["fastattr.kernels.relevance"]  # a relative import


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(module_graph()) is None


def test_every_fastattr_name_the_readme_shows_resolves():
    # The README is the API users copy from: each dotted name it shows must import as written.
    import importlib
    import re

    names = set(re.findall(r"\bfastattr(?:\.[A-Za-z_][A-Za-z0-9_]*)+", (ROOT / "README.md").read_text()))
    assert len(names) > 15
    unresolved = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                unresolved.append(name)
            break
        else:
            unresolved.append(name)
    assert not unresolved, f"README names that do not resolve: {unresolved}"


def test_stable_top_level_names():
    import fastattr
    import fastattr.faithfulness

    for name in ("IntegratedGradients", "CheferRelevance", "attribute_dataset", "load_attributions",
                 "integrated_gradients", "chefer_relevance", "avg_heads", "apply_self_attention_rules"):
        assert hasattr(fastattr, name), name
    assert callable(fastattr.faithfulness.comprehensiveness) and callable(fastattr.faithfulness.sufficiency)


def test_modules_and_functions_keep_the_house_sizes():
    """No module of fastattr over 400 lines, no function body over 60 (its docstring aside)."""
    too_long = []
    for path in sorted((ROOT / "fastattr").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    body = body[1:]
                if body and body[-1].end_lineno - body[0].lineno + 1 > 60:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                    f"{body[-1].end_lineno - body[0].lineno + 1} lines")
    assert not too_long, too_long

"""The package's own shape: no import cycles between fastattr's modules, at any depth (imports
inside functions count: a lazy import still makes two modules depend on each other), and the house
sizes (modules of at most 400 lines; functions and methods of at most 60, counted from the ``def``
line to the last, the docstring aside)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_graph() -> dict[str, set[str]]:
    files = {}
    for path in (ROOT / "fastattr").rglob("*.py"):
        files[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
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
    assert "fastattr.cohort" in graph["fastattr.demo.demo"]
    assert "fastattr.kernels._triton" in graph["fastattr.kernels.relevance"]  # a relative import


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    assert find_cycle(module_graph()) is None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded onto fastattr's top-level packages and modules (``fastattr.runs``,
    ``fastattr.cli``, ...): one package importing another, by any of their modules."""
    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    folded: dict[str, set[str]] = {}
    for name, deps in graph.items():
        folded.setdefault(top(name), set()).update(top(d) for d in deps if top(d) != top(name))
    return folded


def test_no_import_cycles_between_packages():
    # Two packages that import each other (even by different modules) are one concern split in two.
    graph = package_graph(module_graph())
    assert {"fastattr.runs", "fastattr.cohort", "fastattr.report", "fastattr.demo", "fastattr.cli"} <= set(graph)
    assert find_cycle(graph) is None


def test_stable_top_level_names():
    import fastattr
    import fastattr.faithfulness

    for name in ("IntegratedGradients", "CheferRelevance", "attribute_dataset", "load_attributions",
                 "integrated_gradients", "chefer_relevance", "avg_heads", "apply_self_attention_rules"):
        assert hasattr(fastattr, name), name
    assert callable(fastattr.faithfulness.comprehensiveness) and callable(fastattr.faithfulness.sufficiency)


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The house count of a function: from its ``def`` line (decorators aside) to its last line,
    signature included, less the lines of its docstring."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def too_long_functions(text: str) -> list[tuple[int, str, int]]:
    """``(def line, name, lines)`` of every function and method (nested ones too) over the limit."""
    return [(node.lineno, node.name, function_lines(node)) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and function_lines(node) > MAX_FUNCTION_LINES]


def test_the_function_counter_counts_from_the_def_line_without_decorators_or_docstring():
    source = ("@decorator\n"
              "@other(1)\n"
              "def f(a,\n"                      # 1: the def line
              "      b):\n"                     # 2: the signature
              '    """Two lines\n'
              '    of docstring."""\n'
              "    x = a\n"                     # 3
              "\n"                              # 4: a blank line inside counts
              "    return x + b  # last\n"      # 5
              "class C:\n"
              "    def m(self): return 1\n")    # one line, no docstring
    f, m = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    assert (function_lines(f), function_lines(m)) == (5, 1)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES - 2))
    at_limit = f"def g(a,\n      b):\n    \"\"\"Doc.\"\"\"\n{body}\n"  # def + signature + body = the limit
    assert function_lines(ast.parse(at_limit).body[0]) == MAX_FUNCTION_LINES
    assert too_long_functions(at_limit) == []
    over = at_limit + "    return a\n"
    assert too_long_functions(over) == [(1, "g", MAX_FUNCTION_LINES + 1)]
    # a method, decorated, and a function nested in it: each counted on its own lines
    deeper = "\n".join("        " + line for line in body.splitlines())
    method = f"class K:\n    @staticmethod\n    def h():\n        def inner():\n{deeper}\n{deeper}\n"
    limit = MAX_FUNCTION_LINES
    assert too_long_functions(method) == [(3, "h", 2 * limit - 2), (4, "inner", 2 * limit - 3)]


def test_modules_and_functions_keep_the_house_sizes():
    """No module of fastattr over 400 lines, no function or method over 60 (counted by
    :func:`function_lines`: from its ``def`` line to its last, its docstring aside)."""
    too_long = []
    for path in sorted((ROOT / "fastattr").rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        too_long += [f"{path.relative_to(ROOT)}:{line} {name}: {lines} lines"
                     for line, name, lines in too_long_functions(text)]
    assert not too_long, too_long


MAX_FOLDER_MODULES = 10


def package_folders() -> list[Path]:
    return sorted({path.parent for path in (ROOT / "fastattr").rglob("*.py")})


def test_every_package_states_its_concern_in_its_init_docstring():
    missing = []
    for folder in package_folders():
        init = folder / "__init__.py"
        if not init.exists() or not (ast.get_docstring(ast.parse(init.read_text())) or "").strip():
            missing.append(str(folder.relative_to(ROOT)))
    assert not missing, f"packages without an __init__.py docstring: {missing}"


def test_no_folder_holds_more_than_ten_modules():
    crowded = {}
    for folder in package_folders():
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        if len(modules) > MAX_FOLDER_MODULES:
            crowded[str(folder.relative_to(ROOT))] = len(modules)
    assert not crowded, f"folders of more than {MAX_FOLDER_MODULES} modules: {crowded}"


# The modules the README documented before the layout of issue #32; each must keep importing.
DOCUMENTED_OLD_PATHS = [f"fastattr.tools.{name}" for name in (
    "cohort", "store", "tables", "frames", "summaries", "report", "synthetic", "models", "faithfulness", "scores",
    "figures", "bench", "demo", "cli")] + [f"fastattr.interpret.{name}" for name in (
    "ig", "chefer", "shap", "lime", "deeplift", "rollout", "gim", "ig_gim", "capture", "row_picks")]


def test_the_old_documented_paths_are_all_aliased():
    import fastattr.interpret
    import fastattr.tools  # noqa: F401  (each registers its old paths)
    from fastattr.moved import MOVED

    assert set(DOCUMENTED_OLD_PATHS) <= set(MOVED)


def _moved_pairs() -> list[tuple[str, str]]:
    import fastattr.interpret
    import fastattr.tools  # noqa: F401
    from fastattr.moved import MOVED

    return sorted(MOVED.items())


@pytest.mark.parametrize(("old", "new"), _moved_pairs())
def test_an_old_path_warns_and_gives_the_new_paths_objects(old, new, monkeypatch):
    import importlib
    import sys

    from fastattr.moved import EXTRA

    for name in [n for n in sys.modules if n == old or n.startswith(old + ".")]:
        monkeypatch.delitem(sys.modules, name)  # a fresh import of the old path (restored afterwards)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated; import {new} instead"):
        before = importlib.import_module(old)
    after = importlib.import_module(new)
    public = [n for n in (getattr(before, "__all__", None) or dir(before)) if not n.startswith("_")]
    assert public
    for name in public:
        source = importlib.import_module(EXTRA[old][name]) if name in EXTRA.get(old, {}) else after
        assert getattr(before, name) is getattr(source, name), (old, name)
    # the form the README showed: from fastattr.tools.X import Y
    first = public[0]
    namespace: dict = {}
    exec(f"from {old} import {first}", namespace)
    assert namespace[first] is getattr(before, first)

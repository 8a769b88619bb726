"""The documentation cannot drift from the code: every docstring example the API pages show runs, every
``fastattr.`` name the README and the docs show resolves, every public name has an API page, and the README
stays a short front page whose links lead somewhere. ``mkdocs build --strict`` (tests/run.sh) checks the
site's own links and references."""
from __future__ import annotations

import doctest
import importlib
import inspect
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 200
# the examples docstrings must hold at least, so a collector that silently finds nothing fails
MIN_EXAMPLES = 25

DOTTED = re.compile(r"\bfastattr(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.MULTILINE)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def resolve(name: str, *, current: bool = False):
    """The object a dotted name means: the longest importable module, then attributes. With ``current``, a
    module path that is an alias of another module (an old path kept after a move) is an ``ImportError``."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        path = ".".join(parts[:cut])
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                obj = importlib.import_module(path)
        except ImportError:
            continue
        moved = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
        spec = obj.__spec__  # a module with no file that is no namespace package was assembled at import: an alias
        assembled = spec is not None and spec.origin is None and not spec.submodule_search_locations
        if current and (obj.__name__ != path or moved or assembled):
            raise ImportError(f"{path} is an old import path kept after a move (module {obj.__name__}); "
                              f"show the current one. {' '.join(moved)}")
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the name does not resolve
        return obj
    raise ImportError(f"no module of {name!r} imports")


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def referenced_names() -> list[str]:
    """Every ``::: name`` an API page renders, in page order."""
    return [name for page in doc_pages() for name in DIRECTIVE.findall(page.read_text())]


def examples_of(name: str) -> list[doctest.DocTest]:
    """The ``>>>`` examples the page for ``name`` shows: its docstring, and a class's members'."""
    obj = resolve(name)
    if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
        return []  # a constant (METHODS): its docstring is its type's, not ours
    finder = doctest.DocTestFinder(recurse=inspect.isclass(obj), exclude_empty=True)
    module = inspect.getmodule(obj) if not inspect.ismodule(obj) else obj
    return [test for test in finder.find(obj, name, module=module) if test.examples]


def run_examples(tests: list[doctest.DocTest]) -> tuple[int, str]:
    """Run doctests; return (failures, the runner's report of them)."""
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in tests:
        runner.run(test, out=report.append)
    return runner.failures, "".join(report)


def test_api_pages_reference_every_public_name():
    import fastattr
    import fastattr.metrics

    shown = set(referenced_names())
    public = {f"fastattr.{name}" for name in fastattr.__all__}
    public |= {f"fastattr.metrics.{name}" for name in fastattr.metrics.__all__}
    # fastattr.Evaluator / evaluate_attribution are fastattr.metrics' objects, documented there
    aliases = {f"fastattr.{name}" for name in fastattr.__all__ if f"fastattr.metrics.{name}" in public}
    missing = sorted(public - aliases - shown)
    assert not missing, f"public names without an API page (add `::: name` under docs/api/): {missing}"


@pytest.mark.parametrize("name", referenced_names())
def test_docstring_examples_run(name):
    failures, report = run_examples(examples_of(name))
    assert failures == 0, f"docstring examples of {name} fail:\n{report}"


def test_docstring_examples_are_collected():
    count = sum(len(test.examples) for name in referenced_names() for test in examples_of(name))
    assert count >= MIN_EXAMPLES, f"only {count} docstring examples found on the API pages"


def test_a_broken_example_fails():
    # the runner above must report a wrong expected output, not pass it
    broken = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "broken", None, 0)
    failures, report = run_examples([broken])
    assert failures == 1 and "Expected" in report


@pytest.mark.parametrize("path", [README, *doc_pages()], ids=lambda path: str(path.relative_to(ROOT)))
def test_every_fastattr_name_shown_resolves(path):
    # the README and the docs are what users copy from: each name imports as written, at its current path
    names = sorted(set(DOTTED.findall(path.read_text())))
    unresolved = []
    for name in names:
        try:
            resolve(name, current=True)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{name} ({type(error).__name__}: {error})")
    assert not unresolved, f"{path.name} shows names that do not resolve: {unresolved}"


def test_readme_is_a_short_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_links_lead_to_files():
    targets = LINK.findall(README.read_text())
    relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "README.md links into no docs page"
    missing = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"

"""PyHealth's own unit tests for an interpreter, run with fastattr's class swapped in for PyHealth's.

    python tests/pyhealth_own_tests.py --repo PYHEALTH_GIT_DIR_OR_CHECKOUT shap lime [more names] [-- PYTEST ARGS]

For each name, PyHealth's ``tests/core/test_<name>.py`` is exported from the repository (``--ref``, default
``HEAD``; a plain checkout's file is read as it is when no ``--ref`` is given) into a scratch folder, beside a
``conftest.py`` that, before the test module is imported, replaces every PyHealth class named in ``SWAPS`` by
fastattr's: in every loaded ``pyhealth`` module (so ``from pyhealth.interpret.methods import X`` and the
aliases such as ``Lime`` / ``LimeExplainer`` get ours) and again in the test module's namespace once it is
imported. pytest then runs it with the PyHealth venv's python (``--python``). One line per test: its outcome,
and for a failure the first line of the reason; the exit status is nonzero when any test fails or errors
with fastattr's class in place. ``--also-pyhealth`` first runs the same file unswapped, to tell a test that
fails on PyHealth's own class (a newer test against 2.1.0) from one that fails on ours.

Not collected by pytest (no ``test_`` prefix). To cover another interpreter, add a line to ``SWAPS``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

# test file name (tests/core/test_<name>.py) -> {PyHealth class name in pyhealth.interpret.methods: fastattr name}
SWAPS: dict[str, dict[str, str]] = {
    "shap": {"ShapExplainer": "ShapExplainer"},
    "lime": {"LimeExplainer": "LimeExplainer"},
    "integrated_gradients": {"IntegratedGradients": "IntegratedGradients"},
    "ig_gim": {"IntegratedGradientGIM": "IntegratedGradientGIM"},
    "gim": {"GIM": "GIM"},
    "deeplift": {"DeepLift": "DeepLift"},
    "attention_rollout": {"AttentionRollout": "AttentionRollout"},
}

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = pathlib.Path.home() / ".cache/fastattr/pyhealth-2.1.0-py312/bin/python"

CONFTEST = '''"""Written by fastattr's tests/pyhealth_own_tests.py: swaps PyHealth's classes for fastattr's."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyhealth.interpret.methods as _methods

SWAPS = {swaps}
_ours = {{}}
if SWAPS:
    import fastattr

    for _theirs_name, _ours_name in SWAPS.items():
        _original = getattr(_methods, _theirs_name)
        _ours[id(_original)] = (_original, getattr(fastattr, _ours_name))


def _swap_in(module):
    """Every global of ``module`` that is one of PyHealth's swapped classes becomes fastattr's."""
    for name, value in list(vars(module).items()):
        hit = _ours.get(id(value))
        if hit is not None and hit[0] is value:
            setattr(module, name, hit[1])


for _name, _module in list(sys.modules.items()):
    if _name.startswith("pyhealth") and _module is not None:
        _swap_in(_module)


def pytest_collection_modifyitems(session, config, items):
    for module in {{getattr(item, "module", None) for item in items}} - {{None}}:
        _swap_in(module)


def pytest_report_header(config):
    return "classes swapped for fastattr's: " + (", ".join(f"{{k}} -> fastattr.{{v}}" for k, v in SWAPS.items())
                                                   or "none (PyHealth's own)")
'''


def export_test(repo: pathlib.Path, ref: str | None, name: str) -> str:
    """The text of PyHealth's ``tests/core/test_<name>.py`` in ``repo`` (a checkout's file, or ``ref`` of its git)."""
    rel = f"tests/core/test_{name}.py"
    if ref is None and (repo / rel).is_file():
        return (repo / rel).read_text()
    bare = (repo / "HEAD").is_file() and (repo / "objects").is_dir()
    git = ["git", f"--git-dir={repo}"] if bare else ["git", "-C", str(repo)]
    done = subprocess.run([*git, "show", f"{ref or 'HEAD'}:{rel}"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"cannot export {rel} from {repo} at {ref or 'HEAD'}: {done.stderr.strip()}")
    return done.stdout


def run_suite(python: str, source: str, name: str, swaps: dict[str, str],
              extra: list[str]) -> list[tuple[str, str, str]]:
    """Run one exported test file under ``swaps``; return (test id, outcome, first line of the reason) per test.
    The fastattr imported is this checkout's (``PYTHONPATH``), whatever the venv's editable install points at."""
    with tempfile.TemporaryDirectory(prefix=f"pyhealth-own-{name}-") as scratch:
        folder = pathlib.Path(scratch)
        (folder / f"test_{name}.py").write_text(source)
        (folder / "conftest.py").write_text(CONFTEST.format(swaps=json.dumps(swaps)))
        report = folder / "report.xml"
        cmd = [python, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
               f"--rootdir={folder}", f"test_{name}.py", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env)
        if not report.exists():
            sys.stdout.write(done.stdout + done.stderr)
            raise SystemExit(f"pytest produced no report for {name} (exit {done.returncode})")
        return parse_report(report)


def parse_report(report: pathlib.Path) -> list[tuple[str, str, str]]:
    rows = []
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, reason = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                text = (node.get("message") or node.text or "").strip()
                reason = text.splitlines()[0][:200] if text else ""
                break
        rows.append((test_id, outcome, reason))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=sorted(SWAPS), metavar="name",
                        help=f"test_<name>.py of PyHealth's tests/core: {', '.join(sorted(SWAPS))}")
    parser.add_argument("--repo", required=True, type=pathlib.Path, help="PyHealth's git dir (bare) or a checkout")
    parser.add_argument("--ref", default=None, help="commit / branch / tag to export (default HEAD)")
    parser.add_argument("--python", default=str(DEFAULT_PYTHON), help="python of the venv holding PyHealth 2.1.0 "
                        "and fastattr (default %(default)s)")
    parser.add_argument("--also-pyhealth", action="store_true",
                        help="also run each file with PyHealth's own classes, and show both outcomes")
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = parser.parse_args(argv[:cut]), argv[cut + 1:]
    bad = 0
    for name in args.names:
        source = export_test(args.repo, args.ref, name)
        ours = run_suite(args.python, source, name, SWAPS[name], extra)
        theirs = dict((t, (o, r)) for t, o, r in run_suite(args.python, source, name, {}, extra)) \
            if args.also_pyhealth else {}
        swapped = ", ".join(f"{k} -> fastattr.{v}" for k, v in SWAPS[name].items())
        print(f"== tests/core/test_{name}.py ({swapped})")
        for test_id, outcome, reason in ours:
            own = f"[pyhealth: {theirs.get(test_id, ('?', ''))[0]}] " if args.also_pyhealth else ""
            print(f"{outcome:7} {own}{test_id}" + (f"  -- {reason}" if outcome in ("FAILED", "ERROR") else ""))
        failed = sum(o in ("FAILED", "ERROR") for _, o, _ in ours)
        print(f"-- {name}: {len(ours) - failed} of {len(ours)} passed or skipped with fastattr's class, "
              f"{failed} failed")
        bad += failed
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

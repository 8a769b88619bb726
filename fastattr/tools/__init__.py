"""Deprecated import paths: what lived under ``fastattr.tools`` before the layout of issue #32.

Each old module path (``fastattr.tools.store``, ``fastattr.tools.cohort``, ``fastattr.tools.models``, ...)
still imports, warns once with a :class:`DeprecationWarning` naming its new path, and is the new
module itself (``MOVED``), so ``from fastattr.tools.X import Y`` gives the very objects of the new path.
``fastattr.tools.cohort`` alone is assembled: :mod:`fastattr.cohort` plus ``CohortDataset``, which
now lives in :mod:`fastattr.demo.synthetic`.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

#: old module path -> the module that replaces it
MOVED = {
    "fastattr.tools.store": "fastattr.runs",
    "fastattr.tools.run_reader": "fastattr.runs.reader",
    "fastattr.tools.run_files": "fastattr.runs.files",
    "fastattr.tools.run_locks": "fastattr.runs.locks",
    "fastattr.tools.run_journal": "fastattr.runs.journal",
    "fastattr.tools.row_shapes": "fastattr.runs.row_shapes",
    "fastattr.tools.frames": "fastattr.runs.frames",
    "fastattr.tools.summaries": "fastattr.runs.summaries",
    "fastattr.tools.tables": "fastattr.runs.tables",
    "fastattr.tools.cohort": "fastattr.cohort",
    "fastattr.tools.cohort.batching": "fastattr.cohort.batching",
    "fastattr.tools.cohort.distributed": "fastattr.cohort.distributed",
    "fastattr.tools.cohort.pipeline": "fastattr.cohort.pipeline",
    "fastattr.tools.cohort.runner": "fastattr.cohort.runner",
    "fastattr.tools.report": "fastattr.report.page",
    "fastattr.tools.faithfulness_report": "fastattr.report.faithfulness_section",
    "fastattr.tools.figures": "fastattr.report.figures",
    "fastattr.tools.scores": "fastattr.report.scores",
    "fastattr.tools.synthetic": "fastattr.demo.synthetic",
    "fastattr.tools.models": "fastattr.demo.models",
    "fastattr.tools.demo": "fastattr.demo.demo",
    "fastattr.tools.bench": "fastattr.demo.bench",
    "fastattr.tools.timing": "fastattr.demo.timing",
    "fastattr.tools.cli": "fastattr.cli",
    "fastattr.tools.faithfulness": "fastattr.faithfulness",
}
#: names an old path held that its new module does not: name -> the module that defines it now
EXTRA = {"fastattr.tools.cohort": {"CohortDataset": "fastattr.demo.synthetic"}}


def _warn_importer(message: str) -> None:
    """A :class:`DeprecationWarning` told at the line that imports (the first frame outside importlib
    and this module), whether it came through ``import``, ``from ... import`` or an attribute."""
    frame = sys._getframe(1)
    while frame.f_back and (frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename):
        frame = frame.f_back
    warnings.warn_explicit(message, DeprecationWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old paths of ``MOVED`` only; every other import goes on as before."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=name == "fastattr.tools.cohort")

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__
        _warn_importer(f"{old} is deprecated; import {MOVED[old]} instead")
        new = importlib.import_module(MOVED[old])
        if old in EXTRA:  # assembled: the new module's names and the extras, the same objects
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})
            module.__dict__.update({k: getattr(importlib.import_module(m), k) for k, m in EXTRA[old].items()})
            module.__all__ = [*new.__all__, *EXTRA[old]]
        else:  # the import system hands out whatever sys.modules holds once this returns
            sys.modules[old] = new


if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedFinder())


def __getattr__(name: str) -> types.ModuleType:
    """``fastattr.tools.X`` as an attribute, for code that imported ``fastattr.tools`` alone."""
    if f"{__name__}.{name}" in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Deprecated import paths: what lived under ``fastattr.tools`` before the layout of issue #32.

Each old module path (``fastattr.tools.store``, ``fastattr.tools.cohort``, ``fastattr.tools.models``, ...)
still imports, warns once with a :class:`DeprecationWarning` naming its new path, and is the new
module itself (``MOVED``, answered by :mod:`fastattr.moved`), so ``from fastattr.tools.X import Y``
gives the very objects of the new path.
``fastattr.tools.cohort`` alone is assembled: :mod:`fastattr.cohort` plus ``CohortDataset``, which
now lives in :mod:`fastattr.demo.synthetic`.
"""
from __future__ import annotations

import types

from fastattr.moved import moved_attribute, register

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


register(MOVED, EXTRA, {"fastattr.tools.cohort"})


def __getattr__(name: str) -> types.ModuleType:
    """``fastattr.tools.X`` as an attribute, for code that imported ``fastattr.tools`` alone."""
    return moved_attribute(__name__, name)

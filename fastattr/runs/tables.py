"""Tables of a run folder: the long table (one row per sample, feature and non-padding position,
codes decoded), its streamed parquet/CSV export, and per-code cohort summaries.

Each function takes a run folder or a run opened by :func:`fastattr.load_attributions`; the
columns and statistics are described in :mod:`fastattr.runs.frames` and :mod:`fastattr.runs.summaries`,
which do the work.
pandas and pyarrow come with the ``report`` extra (``pip install "fastattr[report]"``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fastattr.runs.frames as frames
import fastattr.runs.summaries as summaries
from fastattr.runs.frames import FORMATS, ROW_GROUP_ROWS
from fastattr.runs.reader import Attributions, open_run

__all__ = ["FORMATS", "ROW_GROUP_ROWS", "export", "summarize", "to_dataframe"]


def to_dataframe(run: str | Path | Attributions, features: Sequence[str] | None = None):
    """The whole long table as a pandas DataFrame in sample order (see :func:`frames.to_dataframe`)."""
    return frames.to_dataframe(open_run(run), features)


def export(run: str | Path | Attributions, path: str | Path, format: str | None = None, *,
           features: Sequence[str] | None = None, row_group_rows: int = ROW_GROUP_ROWS,
           progress: bool | None = None) -> Path:
    """Stream the long table to a parquet or CSV file (see :func:`frames.export`)."""
    return frames.export(open_run(run), path, format, features=features, row_group_rows=row_group_rows,
                         progress=progress)


def summarize(run: str | Path | Attributions, by_class: bool = False, features: Sequence[str] | None = None, *,
              progress: bool | None = False) -> Any:
    """Per-code cohort statistics as a pandas DataFrame (see :func:`summaries.summarize`)."""
    return summaries.summarize(open_run(run), by_class, features, progress=progress)

"""The run folder that ``attribute_dataset`` writes: checksummed shards, journals, locks and ``run.json``,
and how it is read back, as tensors (the lazy reader) or as long tables and per-code summaries.

One concern per module: :mod:`.writer` (:class:`ShardStore`), :mod:`.locks` (one writer per rank),
:mod:`.journal` (the rank journals), :mod:`.files` (atomic files, manifests and checksums,
``run.json``), :mod:`.reader` (:class:`Attributions`), :mod:`.row_shapes` (each sample's own row
shape), :mod:`.frames` (the long table and its export), :mod:`.summaries` (per-code statistics) and
:mod:`.tables` (both over folders). This package re-exports the names readers and writers import.
"""
from fastattr.runs.files import (
    FORMAT,
    RUN_FORMAT,
    RUN_INFO,
    DiskFullError,
    read_run_info,
    record_timing,
    run_info,
    write_atomic,
    write_run_info,
)
from fastattr.runs.locks import RunLockedError
from fastattr.runs.reader import SCORES_FOLDER, Attributions, load_attributions, open_run
from fastattr.runs.writer import ShardStore

__all__ = ["FORMAT", "RUN_FORMAT", "RUN_INFO", "SCORES_FOLDER", "Attributions", "DiskFullError", "RunLockedError",
           "ShardStore", "load_attributions", "open_run", "read_run_info", "record_timing", "run_info",
           "write_atomic", "write_run_info"]

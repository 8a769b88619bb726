"""Cohort-scale attribution, one concern per module: the runner (:mod:`.runner`:
:func:`attribute_dataset`), how batches are cut (:mod:`.batching`: length-sorted windows,
rebatching, which loaders can be sorted, a resumed run cut as it was), the prefetch and writer
threads (:mod:`.pipeline`) and the torchrun process group (:mod:`.distributed`). The run folder it
writes is :mod:`fastattr.tools.store` (writer, locks and journals), :mod:`fastattr.tools.run_files`
(atomic files, manifests, ``run.json``), :mod:`fastattr.tools.run_reader` (the reader) and
:mod:`fastattr.tools.row_shapes`; the synthetic cohort's dataset is
:class:`fastattr.tools.synthetic.CohortDataset`. ``fastattr.tools.cohort`` keeps every name it had.
"""
from fastattr.tools.cohort.batching import COHORT_BATCH_TOKENS, SORT_WINDOW, LengthSortedBatches
from fastattr.tools.cohort.runner import attribute_dataset
from fastattr.tools.store import Attributions, load_attributions
from fastattr.tools.synthetic import CohortDataset

__all__ = ["COHORT_BATCH_TOKENS", "SORT_WINDOW", "Attributions", "CohortDataset", "LengthSortedBatches",
           "attribute_dataset", "load_attributions"]

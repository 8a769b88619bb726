"""Cohort-scale attribution: :func:`attribute_dataset` runs an interpreter over a whole dataloader,
length-sorted and rebatched, pipelined, resumable and shardable under torchrun, into a run folder.

One concern per module: the runner (:mod:`.runner`), how batches are cut (:mod:`.batching`:
length-sorted windows, rebatching, which loaders can be sorted, a resumed run cut as it was), whether
the method's values depend on padding, so that sorting would change them (:mod:`.padding_probe`), the
prefetch and writer threads (:mod:`.pipeline`) and the torchrun process group (:mod:`.distributed`).
The run folder it writes and reads back is :mod:`fastattr.runs`; the synthetic cohort's dataset is
:class:`fastattr.demo.synthetic.CohortDataset`.
"""
from fastattr.cohort.batching import COHORT_BATCH_TOKENS, SORT_WINDOW, LengthSortedBatches
from fastattr.cohort.runner import attribute_dataset
from fastattr.runs.reader import Attributions, load_attributions

__all__ = ["COHORT_BATCH_TOKENS", "SORT_WINDOW", "Attributions", "LengthSortedBatches", "attribute_dataset",
           "load_attributions"]

"""The perturbation methods: Kernel SHAP (and exact Shapley values) and LIME, PyHealth drop-ins on one
engine that runs a batch's gated rows once each, in length groups where that is exact.

``fastattr.interpret.perturbation`` was the engine's module; its names stay importable from here."""
from fastattr.interpret.perturbation.engine import (
    CHECK_DRAWS,
    GatedRows,
    PerturbationRunner,
    feature_counts,
    gated_rows,
    present_positions,
)
from fastattr.interpret.perturbation.rows import distinct_per_sample, run_rows, trimming_allowed

__all__ = ["CHECK_DRAWS", "GatedRows", "PerturbationRunner", "distinct_per_sample", "feature_counts", "gated_rows",
           "present_positions", "run_rows", "trimming_allowed"]

"""Drop-in for ``pyhealth.metrics.interpretability`` (PyHealth 2.1.0): removal-based faithfulness
(comprehensiveness, sufficiency) with PyHealth's numbers, every ablation of a batch stacked,
deduplicated and run in length groups.

    # from pyhealth.metrics.interpretability import Evaluator
    from fastattr.metrics import Evaluator

Examples:
    >>> import fastattr
    >>> import fastattr.metrics
    >>> fastattr.metrics.Evaluator is fastattr.Evaluator  # one evaluator, two import paths
    True
    >>> [sample_class.name for sample_class in fastattr.metrics.SampleClass]
    ['POSITIVE', 'NEGATIVE', 'IGNORE']
"""
from fastattr.metrics.evaluator import Evaluator, evaluate_attribution
from fastattr.metrics.filters import SampleClass, SampleFilterFn, get_model_predictions, threshold_sample_filter
from fastattr.metrics.metric import ComprehensivenessMetric, RemovalBasedMetric, SufficiencyMetric

__all__ = [
    "ComprehensivenessMetric",
    "Evaluator",
    "RemovalBasedMetric",
    "SampleClass",
    "SampleFilterFn",
    "SufficiencyMetric",
    "evaluate_attribution",
    "get_model_predictions",
    "threshold_sample_filter",
]

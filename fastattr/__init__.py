"""fastattr: fast, exact drop-in replacements for PyHealth's attribution methods."""
from fastattr.chefer import CheferRelevance, apply_self_attention_rules, avg_heads
from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.ig import IntegratedGradients
from fastattr.integrated import integrated_gradients
from fastattr.quadrature import METHODS, quadrature
from fastattr.relevance import chefer_relevance

__all__ = [
    "CheferRelevance",
    "IntegratedGradients",
    "METHODS",
    "apply_self_attention_rules",
    "attribute_dataset",
    "avg_heads",
    "chefer_relevance",
    "integrated_gradients",
    "load_attributions",
    "quadrature",
]
__version__ = "0.1.0"

"""fastattr: fast, exact drop-in replacements for PyHealth's attribution methods."""
from fastattr.core.integrated import integrated_gradients
from fastattr.core.quadrature import METHODS, quadrature
from fastattr.core.relevance import chefer_relevance
from fastattr.interpret.chefer import CheferRelevance, apply_self_attention_rules, avg_heads
from fastattr.interpret.ig import IntegratedGradients
from fastattr.interpret.lime import LimeExplainer
from fastattr.interpret.padding import PaddingReport, check_padding
from fastattr.interpret.shap import ShapExplainer
from fastattr.metrics import Evaluator, evaluate_attribution
from fastattr.tools.cohort import attribute_dataset
from fastattr.tools.store import load_attributions

__all__ = [
    "CheferRelevance",
    "Evaluator",
    "IntegratedGradients",
    "LimeExplainer",
    "METHODS",
    "PaddingReport",
    "ShapExplainer",
    "apply_self_attention_rules",
    "attribute_dataset",
    "avg_heads",
    "check_padding",
    "chefer_relevance",
    "evaluate_attribution",
    "integrated_gradients",
    "load_attributions",
    "quadrature",
]
__version__ = "0.1.0"

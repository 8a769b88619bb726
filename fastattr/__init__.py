"""fastattr: fast, exact drop-in replacements for PyHealth's attribution methods."""
from fastattr.cohort.runner import attribute_dataset
from fastattr.core.integrated import integrated_gradients
from fastattr.core.quadrature import METHODS, quadrature
from fastattr.core.relevance import chefer_relevance
from fastattr.interpret.attention.chefer import CheferRelevance, apply_self_attention_rules, avg_heads
from fastattr.interpret.attention.rollout import AttentionRollout
from fastattr.interpret.gradient.deeplift import DeepLift
from fastattr.interpret.gradient.gim import GIM
from fastattr.interpret.gradient.ig import IntegratedGradients
from fastattr.interpret.gradient.ig_gim import IntegratedGradientGIM
from fastattr.interpret.padding import PaddingReport, check_padding
from fastattr.interpret.perturbation.lime import LimeExplainer
from fastattr.interpret.perturbation.shap import ShapExplainer
from fastattr.interpret.random_baseline import RandomBaseline
from fastattr.metrics import Evaluator, evaluate_attribution
from fastattr.runs.reader import load_attributions

__all__ = [
    "AttentionRollout",
    "CheferRelevance",
    "DeepLift",
    "Evaluator",
    "GIM",
    "IntegratedGradientGIM",
    "IntegratedGradients",
    "LimeExplainer",
    "METHODS",
    "PaddingReport",
    "RandomBaseline",
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

"""The oracle: PyHealth 2.1.0's algorithms restated on their own terms, step by step as
``../shared/REFERENCE.md`` describes them, importing nothing from the fastattr code they check.

IG runs one forward and backward per path point on the padded batch; Chefer forms the full
relevance matrix R per layer; SHAP runs one coalition at a time. One module per method. This is
the baseline fastattr's speed is measured against where PyHealth is not installed, and the
reference for fastattr's own models in the tests. Keep it
plain: every rule (mask, baseline, embedding, target, shape mapping) is written out here again,
so a bug in fastattr's protocol code cannot hide behind the same bug in its oracle.
"""
from fastattr.loop.chefer import full_chefer_relevance, full_relevance
from fastattr.loop.deeplift import loop_deeplift
from fastattr.loop.gim import loop_gim, loop_ig_gim
from fastattr.loop.ig import path_loop_integrated_gradients, step_loop_integrated_gradients
from fastattr.loop.lime import loop_lime
from fastattr.loop.random_baseline import loop_random_baseline
from fastattr.loop.removal import loop_removal_scores
from fastattr.loop.rollout import loop_rollout
from fastattr.loop.shap import brute_force_shapley, loop_kernel_shap

__all__ = [
    "brute_force_shapley",
    "full_chefer_relevance",
    "full_relevance",
    "loop_deeplift",
    "loop_gim",
    "loop_ig_gim",
    "loop_kernel_shap",
    "loop_lime",
    "loop_random_baseline",
    "loop_removal_scores",
    "loop_rollout",
    "path_loop_integrated_gradients",
    "step_loop_integrated_gradients",
]

"""fastattr.faithfulness against PyHealth 2.1.0's ComprehensivenessMetric / SufficiencyMetric."""
import pytest
import torch

import fastattr
from fastattr.faithfulness import comprehensiveness, sufficiency

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("kind, model_name, classes", [("seq", "Transformer", 2), ("seq", "Transformer", 3),
                                                       ("mlp", "MLP", 2)])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_matches_pyhealth_metrics(kind, model_name, classes, ablation):
    import pyhealth_cases
    from pyhealth.metrics.interpretability import ComprehensivenessMetric, SufficiencyMetric
    from pyhealth.metrics.interpretability.utils import threshold_sample_filter

    model, batch = pyhealth_cases.build(kind, model_name, num_classes=classes, n=16, batch=12, seed=classes,
                                        embedding_dim=16)
    inputs = {k: batch[k] for k in model.feature_keys}
    attributions = fastattr.IntegratedGradients(model).attribute(steps=10, **batch)
    with torch.no_grad():
        prob = model(**inputs)["y_prob"]
    # an untrained binary model may predict every sample negative: score the upper half
    threshold = prob.max(dim=-1).values.median().item() if classes == 2 else 0.5
    for ours_fn, theirs_cls in ((comprehensiveness, ComprehensivenessMetric), (sufficiency, SufficiencyMetric)):
        theirs = theirs_cls(model, ablation_strategy=ablation, sample_filter=threshold_sample_filter(threshold))
        ref_scores, ref_valid = theirs.compute(inputs, attributions)
        scores, valid = ours_fn(model, inputs, attributions, ablation=ablation, threshold=threshold)
        assert torch.equal(valid, ref_valid)
        assert ref_valid.any(), "no sample was scored: the case tests nothing"
        torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-7)

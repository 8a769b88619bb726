"""fastattr.metrics against PyHealth 2.1.0's pyhealth.metrics.interpretability, number for number."""
import functools
import random

import pytest
import torch

import fastattr
import fastattr.metrics as ours

pytestmark = pytest.mark.parity

CASES = {
    "transformer-binary-seq": ("seq", "Transformer", 2, None, dict(num_layers=2, heads=2, embedding_dim=16)),
    "transformer-multiclass-seq": ("seq", "Transformer", 3, None, dict(num_layers=1, heads=2, embedding_dim=16)),
    "transformer-multilabel-seq": ("seq", "Transformer", 4, "multilabel",
                                   dict(num_layers=1, heads=2, embedding_dim=16)),
    "transformer-multiclass-nested": ("nested", "Transformer", 3, None, dict(num_layers=2, heads=2, embedding_dim=16)),
    "mlp-seq+tensor": ("mlp", "MLP", 3, None, dict(embedding_dim=16, hidden_dim=16)),
    "stagenet-tuples": ("stagenet", "StageNet", 2, None, dict(embedding_dim=16, chunk_size=16, levels=2)),
}


@functools.lru_cache(maxsize=None)
def case(name):
    import pyhealth_cases

    kind, model_name, classes, mode, kwargs = CASES[name]
    return pyhealth_cases.build_loader(kind, model_name, num_classes=classes, n=14, batch=7, seed=len(name),
                                       mode=mode, **kwargs)


def first_batch(name):
    model, loader = case(name)
    return model, next(iter(loader))


def value(model, key, feature):
    if isinstance(feature, torch.Tensor):
        return feature
    return feature[list(model.dataset.input_processors[key].schema()).index("value")]


def random_attributions(model, batch, seed=0):
    """Fresh random attributions shaped like each value; sample 0 of the first feature all tied."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(value(model, k, batch[k]).shape, generator=g) for k in model.feature_keys}
    out[model.feature_keys[0]][0] = 0.25
    return out


def mixed_filter(probs, kind):
    """POSITIVE, NEGATIVE and IGNORE samples in turn."""
    classes = torch.tensor([1, -1, 0], dtype=torch.long).repeat(probs.shape[0] // 3 + 1)[:probs.shape[0]]
    return classes.to(probs.device)


def median_filter(model, batch):
    """The default filter at a threshold that keeps about half the samples of an untrained model."""
    from pyhealth.metrics.interpretability import threshold_sample_filter

    with torch.no_grad():
        prob = model(**batch)["y_prob"]
    prob = prob.unsqueeze(-1) if prob.dim() == 1 else prob
    return threshold_sample_filter(prob.max(dim=-1).values.median().item())


def assert_same(got, ref):
    if isinstance(ref, dict):
        assert list(got) == list(ref)
        for p in ref:
            torch.testing.assert_close(got[p].cpu(), ref[p].cpu(), rtol=0, atol=1e-6)
        return
    (scores, valid), (ref_scores, ref_valid) = got, ref
    assert torch.equal(valid.cpu(), ref_valid.cpu())
    assert ref_valid.any(), "no sample was scored: the case tests nothing"
    torch.testing.assert_close(scores.cpu(), ref_scores.cpu(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("which_filter", ["mixed", "threshold"])
def test_evaluate_matches_pyhealth(name, ablation, which_filter):
    from pyhealth.metrics.interpretability import Evaluator

    model, batch = first_batch(name)
    attributions = random_attributions(model, batch)
    sample_filter = mixed_filter if which_filter == "mixed" else median_filter(model, batch)
    theirs = Evaluator(model, ablation_strategy=ablation, sample_filter=sample_filter)
    mine = ours.Evaluator(model, ablation_strategy=ablation, sample_filter=sample_filter)
    for per in (False, True):
        ref = theirs.evaluate(batch, attributions, return_per_percentage=per)
        got = mine.evaluate(batch, attributions, return_per_percentage=per)
        assert set(got) == set(ref)
        for metric in ref:
            assert_same(got[metric], ref[metric])


@pytest.mark.parametrize("name", ["transformer-binary-seq", "stagenet-tuples", "mlp-seq+tensor"])
def test_metric_classes_match_pyhealth(name):
    from pyhealth.metrics import interpretability as theirs

    model, batch = first_batch(name)
    attributions = random_attributions(model, batch, seed=3)
    for mine_cls, their_cls in ((ours.ComprehensivenessMetric, theirs.ComprehensivenessMetric),
                                (ours.SufficiencyMetric, theirs.SufficiencyMetric)):
        options = dict(percentages=[10, 20, 50, 20], ablation_strategy="zero", sample_filter=mixed_filter)
        assert_same(mine_cls(model, **options).compute(batch, attributions),
                    their_cls(model, **options).compute(batch, attributions))


@pytest.mark.parametrize("name", ["transformer-binary-seq", "transformer-multiclass-nested"])
def test_noise_on_codes_is_removal(name):
    """Codes are removed (set to padding) whatever the strategy: "noise" on code features is exact."""
    from pyhealth.metrics.interpretability import Evaluator

    model, batch = first_batch(name)
    attributions = random_attributions(model, batch, seed=5)
    ref = Evaluator(model, ablation_strategy="noise", sample_filter=mixed_filter).evaluate(batch, attributions)
    got = ours.Evaluator(model, ablation_strategy="noise", sample_filter=mixed_filter).evaluate(batch, attributions)
    for metric in ref:
        assert_same(got[metric], ref[metric])


def test_noise_on_values_scores_the_same_samples():
    from pyhealth.metrics.interpretability import Evaluator

    model, batch = first_batch("mlp-seq+tensor")
    attributions = random_attributions(model, batch, seed=6)
    torch.manual_seed(0)
    ref = Evaluator(model, ablation_strategy="noise", sample_filter=mixed_filter).evaluate(batch, attributions)
    got = ours.Evaluator(model, ablation_strategy="noise", sample_filter=mixed_filter).evaluate(batch, attributions)
    for metric in ref:
        assert torch.equal(got[metric][1], ref[metric][1])
        assert torch.isfinite(got[metric][0]).all() and bool((got[metric][0][~got[metric][1]] == 0).all())


@pytest.mark.parametrize("name, interpreter", [("transformer-binary-seq", "ig"),
                                               ("transformer-multiclass-seq", "chefer"), ("stagenet-tuples", "ig")])
def test_evaluate_attribution_matches_pyhealth(name, interpreter):
    from pyhealth.interpret import methods
    from pyhealth.metrics.interpretability import evaluate_attribution

    model, loader = case(name)
    if interpreter == "ig":
        theirs, mine = methods.IntegratedGradients(model, steps=5), fastattr.IntegratedGradients(model, steps=5)
    else:
        theirs, mine = methods.CheferRelevance(model), fastattr.CheferRelevance(model)
    threshold = 0.4
    options = dict(percentages=[1, 10, 50], sample_filter=ours.threshold_sample_filter(threshold))
    ref = evaluate_attribution(model, loader, theirs, **options)
    with pytest.warns() if False else _no_fail():
        got = ours.evaluate_attribution(model, loader, mine, **options)
        got_with_theirs = ours.evaluate_attribution(model, loader, theirs, **options)
    assert list(got) == list(ref) == ["comprehensiveness", "sufficiency"]
    for metric in ref:
        assert ref[metric] == ref[metric], "no valid sample: the case tests nothing"
        assert abs(got[metric] - ref[metric]) <= 1e-6
        assert abs(got_with_theirs[metric] - ref[metric]) <= 1e-6


class _no_fail:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _suite_like_dataset(seed=0):
    """StageNet inputs as PyHealth's own interpretability tests build them: flat and nested codes with
    times, and lab vectors with no times ((None, values))."""
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models import StageNet

    rng = random.Random(seed)
    samples = []
    for i in range(6):
        n, v = rng.randint(1, 5), rng.randint(1, 3)
        samples.append({
            "patient_id": f"p{i}", "visit_id": f"v{i}", "label": i % 2,
            "codes": ([float(t) for t in range(n)], [f"c{rng.randrange(20)}" for _ in range(n)]),
            "procedures": ([float(t) for t in range(v)], [[f"q{rng.randrange(9)}" for _ in range(rng.randint(1, 3))]
                                                          for _ in range(v)]),
            "lab_values": (None, [[rng.uniform(0, 6) for _ in range(3)] for _ in range(rng.randint(1, 3))]),
        })
    dataset = create_sample_dataset(samples=samples, input_schema={"codes": "stagenet", "procedures": "stagenet",
                                                                   "lab_values": "stagenet_tensor"},
                                    output_schema={"label": "binary"}, dataset_name=f"suite-{seed}")
    torch.manual_seed(seed)
    model = StageNet(dataset=dataset, embedding_dim=32, chunk_size=16, levels=2, dropout=0.1).eval()
    return model, get_dataloader(dataset, batch_size=3, shuffle=False)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_pyhealth_suite_scenarios(ablation):
    """The scenarios of PyHealth's tests/core/test_interp_metrics.py (StageNet, None times, IG
    attributions, percentage subsets, all-NEGATIVE filter), compared number for number."""
    from pyhealth.metrics import interpretability as theirs

    model, loader = _suite_like_dataset()
    batch = next(iter(loader))
    attributions = fastattr.IntegratedGradients(model).attribute(**batch, steps=3, target_class_idx=1)

    def negative(probs, kind):
        return torch.full((probs.shape[0],), -1, dtype=torch.long, device=probs.device)

    for sample_filter in (negative, mixed_filter):
        for percentages in ([20], [10, 20], [1, 10, 50]):
            options = dict(percentages=percentages, ablation_strategy=ablation, sample_filter=sample_filter)
            for mine_cls, their_cls in ((ours.ComprehensivenessMetric, theirs.ComprehensivenessMetric),
                                        (ours.SufficiencyMetric, theirs.SufficiencyMetric)):
                for per in (False, True):
                    assert_same(mine_cls(model, **options).compute(batch, attributions, return_per_percentage=per),
                                their_cls(model, **options).compute(batch, attributions, return_per_percentage=per))


def test_evaluate_attribution_over_a_batch_size_1_loader_matches_pyhealth():
    """PyHealth's docs recommend batch size 1 for interpretability: one patient per batch."""
    from pyhealth.datasets import get_dataloader
    from pyhealth.interpret import methods
    from pyhealth.metrics.interpretability import evaluate_attribution

    model, _ = case("transformer-multiclass-seq")
    loader = get_dataloader(model.dataset, batch_size=1, shuffle=False)
    ref = evaluate_attribution(model, loader, methods.CheferRelevance(model), percentages=[5, 20, 50])
    got = ours.evaluate_attribution(model, loader, fastattr.CheferRelevance(model), percentages=[5, 20, 50],
                                    progress=False)
    for metric in ref:
        assert ref[metric] == ref[metric] and abs(got[metric] - ref[metric]) <= 1e-6

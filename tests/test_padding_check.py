"""The padding check is sound: a model whose output depends on padding never runs trimmed, in IG,
Chefer or the evaluator, on any batch, including batches after a first one on which the dependence
did not show; the user is told once per model, with the feature named; check_padding tests a model
up front. SHAP and LIME, on the same engine as the evaluator, likewise. Every result is compared
with the padded run and with the step-loop oracles."""
import warnings

import pytest
import torch
from conftest import codes, rel_err

import fastattr
import fastattr.metrics as metrics
from fastattr.core import packing
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.lengths import LengthGroups
from fastattr.interpret.padding import input_logits
from fastattr.interpret.perturbation.rows import trimming_allowed
from fastattr.loop import (
    full_chefer_relevance,
    loop_kernel_shap,
    loop_lime,
    loop_removal_scores,
    step_loop_integrated_gradients,
)

MATCH_LABS = "depends on the padding of 'labs'"


@pytest.fixture
def many_groups(monkeypatch):
    """Groups cost nothing: every distinct length gets its own group, so trimming is attempted."""
    for method in packing.GROUP_COST:
        monkeypatch.setitem(packing.GROUP_COST[method], "cpu", 0.0)


class InfersMaskFromEmbeddings(TransformerClassifier):
    """PyHealth's Transformer's rule: a position is attended where its embedding is nonzero. Codes
    embed padding to zeros (masked); ``labs`` is embedded by a Linear with a bias, so every padded
    lab row is attended, as in PyHealth's MIMIC-IV example."""

    def _tokens(self, key, feature):
        value, _ = super()._tokens(key, feature)
        return value, value.abs().sum(-1) != 0


class EvenLengthsAttendPadding(TransformerClassifier):
    """Attends to its padding only for patients with an even number of codes: the dependence shows
    on a batch only when such a patient is in it (and has padding)."""

    def _tokens(self, key, feature):
        value, mask = super()._tokens(key, feature)
        even = mask.sum(1, keepdim=True) % 2 == 0
        return value, mask | even


def labs_spec():
    return FeatureSpec({"codes": FeatureProcessor(token=True, size=40),
                        "labs": FeatureProcessor(token=False, size=3)})


def labs_batch(seed, size=7, width=9, steps=6):
    g = torch.Generator().manual_seed(seed)
    labs = torch.zeros(size, steps, 3)
    for b in range(size):
        n = int(torch.randint(1, steps + 1, (1,), generator=g))
        labs[b, :n] = torch.randn(n, 3, generator=g)
    return {"codes": codes(size, width, 40, g), "labs": labs, "label": torch.randint(0, 2, (size,), generator=g)}


def odd_batch(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, 40, (len(lengths), width), generator=g)
    return {"codes": ids * (torch.arange(width) < torch.tensor(lengths)[:, None])}


def sensitive_model(cls=InfersMaskFromEmbeddings, spec=None, classes=3, seed=0):
    torch.manual_seed(seed)
    return cls(spec or labs_spec(), num_classes=classes, dim=16, heads=2, layers=2).eval()


def test_the_toy_models_depend_on_padding():
    model = sensitive_model()
    batch = labs_batch(0)
    alone = {"codes": batch["codes"][:1], "labs": batch["labs"][:1, :int((batch["labs"][0].abs().sum(-1) != 0).sum())]}
    with torch.no_grad():
        assert (model(**batch)["logit"][:1] - model(**alone)["logit"]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_ig_never_trims_a_model_that_depends_on_padding(seed, many_groups):
    model = sensitive_model(seed=seed)
    ig = fastattr.IntegratedGradients(model, steps=4)
    with pytest.warns(UserWarning, match=MATCH_LABS):
        ig.attribute(**labs_batch(seed))
    for batch_seed in range(seed, seed + 3):  # every later batch: remembered, padded, no second warning
        batch = labs_batch(batch_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = ig.attribute(**batch)
        assert ig.last_groups == [(7, None)]
        oracle = step_loop_integrated_gradients(model, steps=4, **batch)
        for key in ("codes", "labs"):
            assert rel_err(got[key], oracle[key]) <= 1e-5


def test_a_dependence_that_shows_on_a_later_batch_is_caught_there(many_groups):
    model = sensitive_model(EvenLengthsAttendPadding, FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}))
    ig = fastattr.IntegratedGradients(model, steps=4)
    innocent = odd_batch(0, [1, 3, 5, 7, 9])  # odd lengths only: the model ignores this batch's padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = ig.attribute(**innocent)["codes"]
    assert len(ig.last_groups) > 1  # trimmed: exact on this batch
    assert rel_err(first, step_loop_integrated_gradients(model, steps=4, **innocent)["codes"]) <= 1e-5
    guilty = odd_batch(1, [2, 3, 5, 8, 9])
    with pytest.warns(UserWarning, match="depends on the padding of 'codes'"):
        got = ig.attribute(**guilty)["codes"]
    assert ig.last_groups == [(5, None)]
    assert rel_err(got, step_loop_integrated_gradients(model, steps=4, **guilty)["codes"]) <= 1e-5
    ig.attribute(**innocent)
    assert ig.last_groups == [(5, None)]  # remembered for the model, whatever the batch
    chefer = fastattr.CheferRelevance(model)  # and by every other interpreter of the model
    chefer.attribute(**innocent)
    assert chefer.last_groups == [(5, None)]


def test_chefer_checks_every_batch(many_groups):
    model = sensitive_model(EvenLengthsAttendPadding, FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}),
                            seed=2)
    chefer = fastattr.CheferRelevance(model)
    innocent, guilty = odd_batch(2, [1, 3, 5, 7, 9]), odd_batch(3, [2, 3, 5, 8, 9])
    first = chefer.attribute(**innocent)["codes"]
    assert len(chefer.last_groups) > 1
    assert rel_err(first, full_chefer_relevance(model, **innocent)["codes"]) <= 1e-5
    with pytest.warns(UserWarning, match="depends on the padding of 'codes'"):
        got = chefer.attribute(**guilty)["codes"]
    assert chefer.last_groups == [(5, None)]
    assert rel_err(got, full_chefer_relevance(model, **guilty)["codes"]) <= 1e-5
    with pytest.raises(ValueError, match="pack_lengths=True, but EvenLengthsAttendPadding"):
        chefer.attribute(pack_lengths=True, **innocent)


def test_chefer_on_a_bias_embedded_feature_runs_padded(many_groups):
    model = sensitive_model(classes=2, seed=3)
    chefer = fastattr.CheferRelevance(model)
    with pytest.warns(UserWarning, match=MATCH_LABS):
        chefer.attribute(**labs_batch(3))
    for seed in (4, 5):
        batch = labs_batch(seed)
        got = chefer.attribute(**batch)
        assert chefer.last_groups == [(7, None)]
        ref = full_chefer_relevance(model, **batch)
        assert all(rel_err(got[k], ref[k]) <= 1e-5 for k in ref)


def assert_evaluator_matches_oracle(model, evaluator, batch, attributions):
    got = evaluator.evaluate(batch, attributions, return_per_percentage=True)
    for name in ("comprehensiveness", "sufficiency"):
        ref, _ = loop_removal_scores(model, batch, attributions, sufficiency=name == "sufficiency",
                                     kind=evaluator.metrics[name].classifier_type,
                                     sample_filter=evaluator.sample_filter, percentages=evaluator.percentages)
        for p in ref:
            torch.testing.assert_close(got[name][p], ref[p], rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [1, 7])
def test_the_evaluator_never_trims_a_model_that_depends_on_padding(size, many_groups):
    model = sensitive_model(classes=3, seed=size)
    evaluator = metrics.Evaluator(model, percentages=[10, 25, 50, 99])
    for seed in range(3):
        batch = labs_batch(seed, size=size)
        g = torch.Generator().manual_seed(seed)
        attributions = {k: torch.randn(batch[k].shape, generator=g) for k in ("codes", "labs")}
        assert_evaluator_matches_oracle(model, evaluator, batch, attributions)


class RoundsByRowCount(InfersMaskFromEmbeddings):
    """Its logits move with the number of rows in the forward, as a math library's can when it picks
    its kernel (and summation order) by the row count: on an AMD EPYC, PyHealth's Transformer scored
    1.5e-6 apart from the same rows in forwards of another size. Exaggerated here to 1e-3."""

    def _outputs(self, logits, batch):
        return super()._outputs(logits + 1e-3 * logits.shape[0] * torch.arange(logits.shape[1]), batch)


@pytest.mark.parametrize("size", [1, 5, 7])
def test_the_evaluator_runs_padded_rows_in_pyhealths_forward_shape(size, many_groups):
    """Rows at the batch's own width run in forwards of the batch's own row count (the last one
    filled up), so each row's probability is what PyHealth's per-percentage forward gives."""
    model = sensitive_model(RoundsByRowCount, classes=3, seed=size)
    evaluator = metrics.Evaluator(model, percentages=[10, 25, 50, 99])
    for seed in range(2):
        batch = labs_batch(20 + seed, size=size)
        g = torch.Generator().manual_seed(seed)
        attributions = {k: torch.randn(batch[k].shape, generator=g) for k in ("codes", "labs")}
        assert_evaluator_matches_oracle(model, evaluator, batch, attributions)
    assert evaluator.metrics["comprehensiveness"].scorer.last_rows > size  # several forwards' worth of rows


def test_the_evaluator_checks_every_batch(many_groups):
    model = sensitive_model(EvenLengthsAttendPadding, FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}),
                            seed=4)
    evaluator = metrics.Evaluator(model, percentages=[20, 50])
    for seed, lengths in enumerate(([1, 3, 5, 7, 9], [2, 3, 5, 8, 9], [1, 3, 5, 7, 9])):
        batch = odd_batch(10 + seed, lengths)
        attributions = {"codes": torch.randn(batch["codes"].shape, generator=torch.Generator().manual_seed(seed))}
        assert_evaluator_matches_oracle(model, evaluator, batch, attributions)


def test_shap_and_lime_check_every_batch(many_groups):
    """The engine's other clients: every row's logits as the padded oracle's, on every batch, the
    dependence showing only on the second."""
    model = sensitive_model(EvenLengthsAttendPadding, FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}),
                            seed=4)
    shap, lime = fastattr.ShapExplainer(model, max_coalitions=30), fastattr.LimeExplainer(model, n_samples=30)
    for seed, lengths in enumerate(([1, 3, 5, 7, 9], [2, 3, 5, 8, 9], [1, 3, 5, 7, 9])):
        batch = odd_batch(20 + seed, lengths)
        shap.attribute(**batch)
        lime.attribute(**batch)
        _, shap_logits = loop_kernel_shap(model, batch, max_coalitions=30)
        _, lime_logits, _ = loop_lime(model, batch, n_samples=30)
        assert rel_err(shap.last_coalition_logits, shap_logits) <= 1e-5, seed
        assert rel_err(lime.last_perturbation_logits, lime_logits) <= 1e-5, seed


@pytest.mark.parametrize(("cls", "allowed"), [(TransformerClassifier, True), (InfersMaskFromEmbeddings, False)])
def test_a_batch_with_nothing_to_trim_is_checked_one_position_further(cls, allowed):
    """Equal lengths plan no groups for the batch, yet its rows (ablated shorter, or many of them) may
    be grouped: the engine's check pads the batch one position further instead."""
    model = sensitive_model(cls)
    batch = labs_batch(3)
    batch["labs"][:, :] = torch.randn(batch["labs"].shape, generator=torch.Generator().manual_seed(3))
    batch["codes"] = odd_batch(3, [9] * batch["codes"].shape[0])["codes"]
    features = FeatureBatch.from_batch(model, batch)
    lengths = LengthGroups(model, "perturbation", "logits", quiet=True)
    assert lengths.plan(features, pack=True, points=1, device=torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = trimming_allowed(lengths, features, "auto", lambda part: input_logits(model, part))
    assert got is allowed


def test_one_warning_per_model_across_interpreters_and_the_evaluator(many_groups):
    model = sensitive_model(seed=6)
    batch = labs_batch(6)
    with pytest.warns(UserWarning, match=MATCH_LABS) as caught:
        fastattr.IntegratedGradients(model, steps=3).attribute(**batch)
        fastattr.CheferRelevance(model).attribute(**batch)
        metrics.Evaluator(model).evaluate(batch, {k: torch.rand(batch[k].shape) for k in ("codes", "labs")})
    assert sum("depends on the padding" in str(w.message) for w in caught) == 1
    message = str(next(w.message for w in caught if "depends on the padding" in str(w.message)))
    assert "'codes'" not in message and "sorting by length" in message and "check_padding" in message


def test_check_padding_names_the_feature():
    model = sensitive_model(seed=7)
    report = fastattr.check_padding(model, labs_batch(7))
    assert not report.ignores_padding and report.features == ("labs",) and report.compared == 7
    one = labs_batch(8, size=1)  # one patient: nothing to trim, padded further
    assert fastattr.check_padding(model, one).features == ("labs",)
    torch.manual_seed(7)
    masked = TransformerClassifier(labs_spec(), num_classes=3, dim=16).eval()
    fine = fastattr.check_padding(masked, labs_batch(7))
    assert fine.ignores_padding and fine.features == () and fine.difference <= 1e-6
    assert masked.training is False
    with pytest.raises(ValueError, match="extra"):
        fastattr.check_padding(masked, one, extra=0)


def test_models_that_ignore_padding_still_trim_every_batch(many_groups):
    torch.manual_seed(9)
    model = TransformerClassifier(labs_spec(), num_classes=3, dim=16).eval()
    ig, chefer = fastattr.IntegratedGradients(model, steps=3), fastattr.CheferRelevance(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            batch = labs_batch(seed)
            ig.attribute(**batch)
            chefer.attribute(**batch)
            assert len(ig.last_groups) > 1 and len(chefer.last_groups) > 1


class NearTieByWidth(TransformerClassifier):
    """Classes 0 and 1 tied but for a term that grows with the padded width, far below the padding
    check's tolerance: the argmax of a trimmed group and of the padded batch differ."""

    def forward_from_embedding(self, **batch):
        out = super().forward_from_embedding(**batch)
        width = batch["codes"][0].shape[1]
        logit = out["logit"]
        tied = torch.stack([logit[:, 0], logit[:, 0] + 1e-7 * (width - 6.5), logit[:, 0] - 1.0], dim=1)
        return self._outputs(tied, batch)


def test_chefer_explains_the_padded_batchs_class_in_a_near_tie(many_groups, monkeypatch):
    monkeypatch.setitem(packing.CHECK_ROWS, "chefer", 0.0)
    model = sensitive_model(NearTieByWidth, FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), seed=8)
    batch = odd_batch(8, [1, 2, 3, 4, 12])
    chefer = fastattr.CheferRelevance(model)
    got = chefer.attribute(**batch)["codes"]
    assert len(chefer.last_groups) > 1  # trimmed: the width term is within the check's tolerance
    assert torch.equal(chefer.last_predictions[1], torch.ones(5, dtype=torch.long))  # the padded batch's argmax
    assert rel_err(got, full_chefer_relevance(model, **batch)["codes"]) <= 1e-5


class AttendsPaddingWithCode39(TransformerClassifier):
    """Attends to its padding only for patients holding code 39 (recognised by its embedding): every
    kind of ablated row of a batch without it ignores padding, so only the check of each batch's own
    samples can see the dependence in a later batch that has it."""

    def _tokens(self, key, feature):
        value, mask = super()._tokens(key, feature)
        return value, mask | (value[..., 0] > 50).any(1, keepdim=True)


def test_the_evaluator_checks_each_batchs_own_samples(many_groups):
    model = sensitive_model(AttendsPaddingWithCode39, FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}),
                            seed=5)
    with torch.no_grad():
        model.embedding_model.layers["codes"].weight[39, 0] = 100.0
    evaluator = metrics.Evaluator(model, percentages=[20, 50])
    for seed, with_39 in ((0, False), (1, False), (2, True)):
        batch = odd_batch(20 + seed, [1, 3, 4, 6, 9, 2, 5])
        batch["codes"] = batch["codes"] % 28 + (batch["codes"] > 0).long() * 2  # ids in [2, 30): no code 39
        if with_39:
            batch["codes"][[1, 4], 0] = 39
        attributions = {"codes": torch.randn(batch["codes"].shape, generator=torch.Generator().manual_seed(seed))}
        assert_evaluator_matches_oracle(model, evaluator, batch, attributions)

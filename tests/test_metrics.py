"""fastattr.metrics (PyHealth's faithfulness Evaluator) against the plain per-percentage oracle
(fastattr.loop.loop_removal_scores) on fastattr's own models: fresh random inputs, odd cases, bad
inputs, the interpreter's predictions, and a model whose ablated rows depend on the padded width."""
import warnings

import pytest
import torch
from conftest import codes, own_model
from torch import nn

import fastattr
import fastattr.metrics as metrics
from fastattr.core import packing
from fastattr.demo.models import FeatureProcessor, FeatureSpec, ProtocolModel
from fastattr.loop import loop_removal_scores

PERCENTAGES = [1, 5, 10, 20, 50]


def mixed_filter(probs, kind):
    """POSITIVE, NEGATIVE and IGNORE samples in turn."""
    return torch.tensor([1, -1, 0], dtype=torch.long).repeat(probs.shape[0])[:probs.shape[0]]


def batch_of(size, width, seed, min_len=1):
    g = torch.Generator().manual_seed(seed)
    return {"codes": codes(size, width, 40, g, min_len), "labs": torch.randn(size, 3, 5, generator=g),
            "label": torch.zeros(size, dtype=torch.long), "patient_id": [f"p{i}" for i in range(size)]}


def random_attributions(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {"codes": torch.randn(batch["codes"].shape, generator=g),
            "labs": torch.randn(batch["labs"].shape, generator=g)}


def assert_matches_oracle(model, batch, attributions, sample_filter, strategy="zero", percentages=PERCENTAGES, **kw):
    evaluator = metrics.Evaluator(model, percentages=percentages, ablation_strategy=strategy,
                                  sample_filter=sample_filter, **kw)
    kind = evaluator.metrics["comprehensiveness"].classifier_type
    got = evaluator.evaluate(batch, attributions, return_per_percentage=True)
    averaged = evaluator.evaluate(batch, attributions)
    for name in ("comprehensiveness", "sufficiency"):
        ref, classes = loop_removal_scores(model, batch, attributions, sufficiency=name == "sufficiency", kind=kind,
                                           sample_filter=sample_filter, percentages=percentages, strategy=strategy)
        assert list(got[name]) == list(ref)
        for p in ref:
            torch.testing.assert_close(got[name][p], ref[p], rtol=0, atol=1e-6)
        scores, valid = averaged[name]
        assert torch.equal(valid, classes != 0)
        torch.testing.assert_close(scores, sum(ref[p] for p in percentages) / len(percentages), rtol=0, atol=1e-6)
    return evaluator


@pytest.mark.parametrize("kind, classes", [("transformer", 3), ("transformer", 2), ("mlp", 3)])
@pytest.mark.parametrize("strategy", ["zero", "mean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_inputs_match_the_oracle(kind, classes, strategy, seed):
    model, _ = own_model(kind, num_classes=classes, seed=seed)
    batch = batch_of(13, 17, seed)
    attributions = random_attributions(batch, seed + 10)
    for sample_filter in (mixed_filter, metrics.threshold_sample_filter(0.3)):
        assert_matches_oracle(model, batch, attributions, sample_filter, strategy)


def test_odd_inputs_match_the_oracle():
    model, _ = own_model("transformer", num_classes=3, seed=2)
    batch = batch_of(7, 9, 3)
    batch["codes"][:3] = 0
    batch["codes"][:3, 0] = torch.tensor([5, 6, 7])  # one-code patients
    tied = {"codes": torch.full(batch["codes"].shape, 0.5), "labs": torch.zeros(batch["labs"].shape)}
    assert_matches_oracle(model, batch, tied, mixed_filter)
    some_tied = random_attributions(batch, 4)
    some_tied["codes"][1:4] = -1.0
    assert_matches_oracle(model, batch, some_tied, mixed_filter, percentages=[10, 10, 100, 33.3, 0.5])
    assert_matches_oracle(model, {k: (v[:1] if k != "patient_id" else v[:1]) for k, v in batch.items()},
                          {k: v[:1] for k, v in some_tied.items()}, mixed_filter)  # one sample


def test_every_sample_ignored_runs_no_ablation():
    model, _ = own_model("transformer", num_classes=2, seed=0)
    batch = batch_of(6, 8, 5)
    evaluator = metrics.Evaluator(model, sample_filter=lambda p, k: torch.zeros(p.shape[0], dtype=torch.long))
    for scores, valid in evaluator.evaluate(batch, random_attributions(batch, 1)).values():
        assert not valid.any() and bool((scores == 0).all())
    assert evaluator.metrics["comprehensiveness"].scorer.last_rows == 0


def test_identical_rows_run_once_and_settings_do_not_change_results():
    model, _ = own_model("transformer", num_classes=3, seed=1)
    batch = batch_of(11, 21, 6)
    attributions = random_attributions(batch, 2)
    fast = assert_matches_oracle(model, batch, attributions, mixed_filter)
    scored = int((mixed_filter(torch.zeros(11), "") != 0).sum())
    assert fast.metrics["comprehensiveness"].scorer.last_rows < 2 * len(PERCENTAGES) * scored
    assert_matches_oracle(model, batch, attributions, mixed_filter, pack_lengths=False, internal_batch_size=1)
    assert_matches_oracle(model, batch, attributions, mixed_filter, pack_lengths=True, internal_batch_size=3)


class LeadingTokenModel(ProtocolModel):
    """Reads position 0 as a summary token; where it is padding, the mean over every padded position
    (as PyHealth's Transformer's padding query attends uniformly): rows whose first code was removed
    depend on the padded width, other rows do not."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), 3, 8)
        self.head = nn.Linear(8, 3)

    def forward_from_embedding(self, **batch):
        emb, mask = batch["codes"][0], batch["codes"][-1].bool()
        real = (emb * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        pooled = torch.where(mask[:, :1], real, emb.mean(1))
        return self._outputs(self.head(pooled), batch)


@pytest.mark.parametrize("group_cost", [None, 0.0])
def test_rows_that_depend_on_the_padded_width_run_padded(group_cost, monkeypatch):
    if group_cost is not None:  # every distinct length its own group: later batches of a failed kind would trim
        monkeypatch.setitem(packing.GROUP_COST["evaluator"], "cpu", group_cost)
    model = LeadingTokenModel().eval()
    row = torch.tensor([[0, 5, 6, 0, 0, 0]])
    with torch.no_grad():
        assert (model(codes=row)["y_prob"] - model(codes=row[:, :3])["y_prob"]).abs().max() > 1e-3
    evaluator = metrics.Evaluator(model)  # 3 classes: every sample scored, POSITIVE
    # first, rows that all keep their first code (sufficiency of attributions highest there): their
    # verdict (trimming is exact) must not be taken for rows whose first code is removed
    first = batch_of(15, 12, 9)
    del first["labs"]
    highest_first = {"codes": torch.linspace(1, 0, 12).expand(15, 12).contiguous()}
    evaluator.evaluate(first, highest_first, metrics=["sufficiency"])
    for seed in range(4):
        batch = batch_of(15, 12 + seed, seed, min_len=1)
        del batch["labs"]
        attributions = {"codes": torch.randn(batch["codes"].shape, generator=torch.Generator().manual_seed(seed))}
        got = evaluator.evaluate(batch, attributions, return_per_percentage=True)
        for name in got:
            ref, _ = loop_removal_scores(model, batch, attributions, sufficiency=name == "sufficiency",
                                         kind="multiclass", sample_filter=evaluator.sample_filter,
                                         percentages=PERCENTAGES)
            for p in ref:
                torch.testing.assert_close(got[name][p], ref[p], rtol=0, atol=1e-6)


class CountingModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0
        self.feature_keys, self.dataset = inner.feature_keys, inner.dataset

    def forward(self, **batch):
        self.calls += 1
        return self.inner(**batch)


@pytest.mark.parametrize("bad, message", [
    (lambda b, a: (b, {**a, "other": a["codes"]}), "attributions has key 'other'"),
    (lambda b, a: (b, {**a, "codes": a["codes"][:, :4]}), r"attributions\['codes'\] has shape \(5, 4\).*\(5, 9\)"),
    (lambda b, a: (b, {**a, "codes": a["codes"].long()}), "float32 or float64"),
])
def test_bad_attributions_fail_before_any_forward(bad, message):
    inner, _ = own_model("transformer", num_classes=3)
    model = CountingModel(inner)
    batch = batch_of(5, 9, 0)
    evaluator = metrics.Evaluator(model)
    with pytest.raises((ValueError, TypeError), match=message):
        evaluator.evaluate(*bad(batch, random_attributions(batch, 0)))
    assert model.calls == 0


def test_bad_options_are_named():
    model, _ = own_model("transformer", num_classes=3)
    for percentages in ([0], [101], [], "10", [True]):
        with pytest.raises(ValueError, match="percentages"):
            metrics.Evaluator(model, percentages=percentages)
    with pytest.raises(ValueError, match="ablation_strategy"):
        metrics.Evaluator(model, ablation_strategy="blur")
    batch = batch_of(4, 6, 0)
    with pytest.raises(ValueError, match="metrics must name"):
        metrics.Evaluator(model).evaluate(batch, random_attributions(batch, 0), metrics=["faithfulness"])

    class NoProbabilities(CountingModel):
        def forward(self, **batch):
            return {"score": self.inner(**batch)["logit"]}
    with pytest.raises(ValueError, match="'y_prob' or 'logit'"):
        metrics.Evaluator(NoProbabilities(model)).evaluate(batch, random_attributions(batch, 0))


def test_evaluate_attribution_reuses_the_interpreters_forward():
    model, _ = own_model("transformer", num_classes=3, seed=3)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    loader = [batch_of(6, 10, s) for s in range(3)]
    chefer = fastattr.CheferRelevance(model)
    results = metrics.Evaluator(model, progress=False).evaluate_attribution(loader, chefer)
    reusing = len(calls)
    calls.clear()
    plain, reference = metrics.Evaluator(model, progress=False), {}
    for batch in loader:
        for name, (scores, valid) in plain.evaluate(batch, chefer.attribute(**batch)).items():
            reference.setdefault(name, []).append((scores[valid]))
    assert reusing < len(calls), "the interpreter's probabilities were not reused"
    for name, parts in reference.items():
        assert abs(results[name] - torch.cat(parts).mean().item()) <= 1e-6


def test_functional_form_warnings_and_deprecation():
    model, _ = own_model("transformer", num_classes=2, seed=0)
    loader = [batch_of(4, 6, s) for s in range(2)]
    ig = fastattr.IntegratedGradients(model, steps=3)
    with pytest.warns(UserWarning, match="valid"):
        out = metrics.evaluate_attribution(model, loader, ig, sample_filter=lambda p, k: torch.zeros(
            p.shape[0], dtype=torch.long), progress=False)
    assert all(v != v for v in out.values())  # NaN: no valid sample
    with pytest.warns(DeprecationWarning, match="positive_threshold is deprecated"):
        metrics.Evaluator(model, positive_threshold=0.3)
    with pytest.warns(UserWarning, match="sample_filter takes precedence"):
        metrics.Evaluator(model, sample_filter=mixed_filter, positive_threshold=0.3)

    class Negated:
        def __init__(self, inner):
            self.inner = inner

        def attribute(self, **batch):
            return {k: -v for k, v in self.inner.attribute(**batch).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics.Evaluator(model, sample_filter=mixed_filter, progress=False).evaluate_attribution(loader, Negated(ig))
    assert any("comprehensiveness" in str(w.message) for w in caught)


def test_a_subclass_with_its_own_ablation_runs_pyhealths_loop():
    model, _ = own_model("transformer", num_classes=3, seed=4)
    batch = batch_of(8, 10, 7)
    attributions = random_attributions(batch, 8)

    class Removal(metrics.RemovalBasedMetric):
        def _create_ablated_inputs(self, inputs, masks):
            return self._apply_ablation(inputs, masks)

    options = dict(percentages=[5, 20], ablation_strategy="mean", sample_filter=mixed_filter)
    mine = Removal(model, **options).compute(batch, attributions, return_per_percentage=True)
    fast = metrics.ComprehensivenessMetric(model, **options).compute(batch, attributions, return_per_percentage=True)
    for p in fast:
        torch.testing.assert_close(mine[p], fast[p], rtol=0, atol=1e-6)


def test_select_samples_keeps_tuple_slots_with_none():
    from fastattr.interpret.batches import select_samples

    values = torch.arange(6).reshape(2, 3)
    picked = select_samples({"lab": (None, values), "ids": ["a", "b"]}, torch.tensor([1, 1, 0]))
    assert picked["lab"][0] is None and torch.equal(picked["lab"][1], values[[1, 1, 0]])
    assert picked["ids"] == ["b", "b", "a"]


class EmptyLabsReadTheWidth(ProtocolModel):
    """Masked means of codes and of lab rows; a patient with no lab row left reads a learned vector
    scaled by the padded width instead: ablated rows that remove every lab depend on the width, rows
    that remove only the first labs do not."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=40),
                            "labs": FeatureProcessor(token=False, size=3)})
        super().__init__(spec, 3, 8)
        self.empty = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(16, 3)

    def forward_from_embedding(self, **batch):
        pooled = []
        for key in ("codes", "labs"):
            emb, mask = batch[key][0], batch[key][-1].bool()
            mask = mask.any(-1) if mask.dim() == 3 else mask
            real = (emb * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            pooled.append(torch.where(mask.any(1, keepdim=True), real, self.empty / emb.shape[1]))
        return self._outputs(self.head(torch.cat(pooled, -1)), batch)


def labs_batch(lab_lengths, seed):
    g = torch.Generator().manual_seed(seed)
    size = len(lab_lengths)
    labs = torch.zeros(size, 6, 3)
    for b, n in enumerate(lab_lengths):
        labs[b, :n] = torch.rand(n, 3, generator=g) + 0.5
    attributions = {"codes": torch.randn(size, 9, generator=g),
                    "labs": torch.linspace(2, 1, 18).reshape(1, 6, 3) * (labs != 0) - 5 * (labs == 0)}
    return {"codes": codes(size, 9, 40, g), "labs": labs}, attributions


def test_rows_left_with_nothing_of_a_feature_are_a_kind_of_their_own(monkeypatch):
    """A first batch whose ablated rows only lose their first labs (trimmed, exact) must not vouch for a
    later batch whose rows lose every lab (they depend on the padded width and run padded)."""
    monkeypatch.setitem(packing.GROUP_COST["evaluator"], "cpu", 0.0)
    model = EmptyLabsReadTheWidth().eval()
    evaluator = metrics.Evaluator(model, percentages=[50])
    for lab_lengths, seed in (([4, 5, 6, 4, 5, 6, 4], 0), ([1, 2, 3, 1, 6, 2, 3], 1)):
        batch, attributions = labs_batch(lab_lengths, seed)
        got = evaluator.evaluate(batch, attributions, return_per_percentage=True)
        for name in got:
            ref, _ = loop_removal_scores(model, batch, attributions, sufficiency=name == "sufficiency",
                                         kind="multiclass", sample_filter=evaluator.sample_filter, percentages=[50])
            torch.testing.assert_close(got[name][50], ref[50], rtol=0, atol=1e-6)

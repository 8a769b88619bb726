"""Length-aware packing: groups, trimming by the feature-batch abstraction, exactness, and the guard."""
import warnings

import pytest
import torch
from conftest import codes, rel_err

import fastattr
from fastattr.core import packing
from fastattr.demo.models import FeatureProcessor, FeatureSpec, MLPClassifier, TransformerClassifier
from fastattr.interpret.features import FeatureBatch
from fastattr.interpret.lengths import LengthGroups
from fastattr.loop import full_chefer_relevance, step_loop_integrated_gradients


@pytest.fixture
def many_groups(monkeypatch):
    """Groups cost nothing: every distinct length gets its own group, so packing is exercised."""
    for method in packing.GROUP_COST:
        monkeypatch.setitem(packing.GROUP_COST[method], "cpu", 0.0)


def test_plan_groups_covers_every_sample_once_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (37, 2), generator=g)
    for cost in (0.0, 500.0, 1e12):
        groups = packing.plan_groups(lengths, [2], 5, cost)
        index = torch.cat([i for i, _ in groups])
        assert sorted(index.tolist()) == list(range(37))
        for i, sizes in groups:
            assert sizes == lengths[i].amax(dim=0).tolist()
        planned = packing.plan_groups(lengths, [2], 5, cost)
        assert [(i.tolist(), s) for i, s in groups] == [(i.tolist(), s) for i, s in planned]
    assert len(packing.plan_groups(lengths, [2], 5, 1e12)) == 1
    # free groups: no group pads anyone (per feature work equal within a group)
    for i, sizes in packing.plan_groups(lengths[:, :1], [1], 5, 0.0):
        assert bool((lengths[i, 0] == sizes[0]).all())


def test_plan_groups_prefers_fewer_groups_when_groups_cost_more():
    lengths = torch.tensor([[3], [4], [5], [50], [52]])
    assert len(packing.plan_groups(lengths, [1], 10, 0.0)) == 5
    two = packing.plan_groups(lengths, [1], 10, 200.0)
    assert [sorted(i.tolist()) for i, _ in two] == [[0, 1, 2], [3, 4]]


def _nested_spec(layout=("value",)):
    return FeatureSpec({"visits": FeatureProcessor(token=True, size=30, layout=layout),
                        "labs": FeatureProcessor(token=False, size=3)})


def _nested_batch(g, batch=6):
    visits = torch.zeros(batch, 5, 4, dtype=torch.long)
    labs = torch.zeros(batch, 7, 3)
    for b in range(batch):
        v = int(torch.randint(1, 6, (1,), generator=g))
        c = int(torch.randint(1, 5, (1,), generator=g))
        visits[b, :v, :c] = torch.randint(2, 30, (v, c), generator=g)
        t = int(torch.randint(1, 8, (1,), generator=g))
        labs[b, :t] = torch.randn(t, 3, generator=g)
    return visits, labs


def test_feature_batch_trims_visits_codes_and_times_together():
    g = torch.Generator().manual_seed(3)
    visits, labs = _nested_batch(g)
    times = torch.arange(5.0).expand(6, 5).clone()
    model = TransformerClassifier(_nested_spec(("time", "value", "mask")), dim=8, heads=2, layers=1)
    fb = FeatureBatch.from_batch(model, {"visits": (times, visits, (visits != 0).int()), "labs": labs})
    lengths = fb.lengths()
    assert fb.padded_spans() == [2, 1]
    assert lengths.shape == (6, 3)
    for b in range(6):
        rows = (visits[b] != 0).any(1).nonzero()
        cols = (visits[b] != 0).any(0).nonzero()
        assert lengths[b, 0] == rows.max() + 1 and lengths[b, 1] == cols.max() + 1
        assert lengths[b, 2] == (labs[b].abs().sum(-1) != 0).nonzero().max() + 1
    index = torch.tensor([4, 1])
    sizes = lengths[index].amax(0).tolist()
    part = fb.subset(index, sizes)
    t, v, m = part.features["visits"]
    assert t.shape == (2, sizes[0]) and v.shape == (2, sizes[0], sizes[1]) and m.shape == v.shape
    assert torch.equal(v, visits[index][:, :sizes[0], :sizes[1]])
    assert part.value("labs").shape == (2, sizes[2], 3)
    # place() scatters back with exact zeros in the trimmed region
    placed = fb.place([(index, {"visits": v.float() + 1})])["visits"]
    assert placed.shape == visits.shape
    assert torch.equal(placed[index][:, :sizes[0], :sizes[1]], v.float() + 1)
    assert placed.sum() == (v.float() + 1).sum()


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_packed_equals_padded_and_the_oracle(kind, many_groups):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    cls = TransformerClassifier if kind == "transformer" else MLPClassifier
    model = cls(_nested_spec(), num_classes=3, dim=16).eval()
    visits, labs = _nested_batch(g, batch=7)
    data = {"visits": visits, "labs": labs}
    ig = fastattr.IntegratedGradients(model, steps=6)
    padded, d0 = ig.attribute(pack_lengths=False, return_convergence_delta=True, **data)
    assert ig.last_groups == [(7, None)]
    packed, d1 = ig.attribute(pack_lengths=True, return_convergence_delta=True, **data)
    assert len(ig.last_groups) > 1
    oracle = step_loop_integrated_gradients(model, steps=6, **data)
    for key in data:
        assert packed[key].shape == data[key].shape
        assert rel_err(packed[key], padded[key]) <= 1e-6
        assert rel_err(packed[key], oracle[key]) <= 1e-5
    assert torch.all(packed["visits"][visits == 0] == 0)  # padding gets exact zeros
    assert torch.all(packed["labs"][labs.abs().sum(-1) == 0] == 0)
    assert torch.allclose(d1, d0, rtol=0, atol=1e-6)  # deltas are small differences of logits


def test_packing_with_baselines_and_per_sample_targets(many_groups):
    torch.manual_seed(0)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=40)})
    model = TransformerClassifier(spec, num_classes=3, dim=16).eval()
    g = torch.Generator().manual_seed(2)
    x = codes(9, 23, 40, g)
    targets = torch.randint(0, 3, (9,), generator=g)
    base = {"codes": torch.zeros(23, dtype=torch.long)}  # broadcasts over the batch
    ig = fastattr.IntegratedGradients(model, steps=5)
    packed = ig.attribute(baseline=base, target_class_idx=targets, codes=x)["codes"]
    assert len(ig.last_groups) > 1
    padded = ig.attribute(baseline=base, target_class_idx=targets, pack_lengths=False, codes=x)["codes"]
    oracle = step_loop_integrated_gradients(model, steps=5, baseline={"codes": base["codes"].expand(9, 23)},
                                            target_class_idx=targets, codes=x)["codes"]
    assert rel_err(packed, padded) <= 1e-6 and rel_err(packed, oracle) <= 1e-5


class CountsPadding(MLPClassifier):
    """Mean-pools over every position, padding included: its output depends on the padding."""

    def forward_from_embedding(self, **batch):
        pooled = [self._tokens(k, batch[k])[0].mean(1) for k in self.feature_keys]
        return self._outputs(self.mlp(torch.cat(pooled, dim=-1)), batch)


def test_a_model_whose_pooling_counts_padding_is_detected(many_groups):
    torch.manual_seed(1)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=40)})
    model = CountsPadding(spec, num_classes=2, dim=8).eval()
    x = codes(6, 12, 40, torch.Generator().manual_seed(4))
    ig = fastattr.IntegratedGradients(model, steps=4)
    with pytest.warns(UserWarning, match="depends on the padding of .codes."):
        got = ig.attribute(codes=x)["codes"]
    assert ig.last_groups == [(6, None)]
    oracle = step_loop_integrated_gradients(model, steps=4, codes=x)["codes"]
    assert rel_err(got, oracle) <= 1e-5
    assert bool((got[x == 0] != 0).any())  # the padding matters to this model, and its attributions show it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is cached: no second warning
        ig.attribute(codes=x)
    with pytest.raises(ValueError, match="pack_lengths=True"):
        ig.attribute(pack_lengths=True, codes=x)


def test_pack_lengths_is_validated():
    model = MLPClassifier(FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), dim=8)
    with pytest.raises(ValueError, match="pack_lengths"):
        fastattr.IntegratedGradients(model, pack_lengths="yes")
    ig = fastattr.IntegratedGradients(model)
    with pytest.raises(ValueError, match="pack_lengths"):
        ig.attribute(pack_lengths=1, codes=torch.ones(2, 3, dtype=torch.long))


# -- Chefer through the same length groups -----------------------------------------------------

def chefer_reference(model, target=None, **batch):
    return full_chefer_relevance(model, target_class_idx=target, **batch)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("classes", [2, 3])
def test_chefer_packed_equals_padded_and_the_oracle(classes, backend, many_groups):
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = TransformerClassifier(_nested_spec(), num_classes=classes, dim=16, heads=2, layers=2).eval()
    visits, labs = _nested_batch(g, batch=9)
    data = {"visits": visits, "labs": labs, "label": torch.zeros(9, dtype=torch.long), "patient_id": list("abcdefghi")}
    chefer = fastattr.CheferRelevance(model, backend=backend)
    padded = chefer.attribute(pack_lengths=False, **data)
    padded_predictions = chefer.last_predictions
    assert chefer.last_groups == [(9, None)]
    packed = chefer.attribute(**data)
    assert len(chefer.last_groups) > 1 and sum(n for n, _ in chefer.last_groups) == 9
    oracle = chefer_reference(model, **data)
    for key in ("visits", "labs"):
        assert packed[key].shape == padded[key].shape == oracle[key].shape
        assert rel_err(packed[key], padded[key]) <= 1e-6
        assert rel_err(packed[key], oracle[key]) <= 1e-5
    lengths = (labs.abs().sum(-1) != 0).long().cumsum(1).argmax(1) + 1  # one past each sample's last lab row
    for b in range(9):
        assert torch.all(packed["labs"][b, lengths[b]:] == 0)  # trimmed positions: exact zeros
    for got, ref in zip(chefer.last_predictions, padded_predictions, strict=False):
        torch.testing.assert_close(got, ref)


def test_chefer_packing_with_per_sample_targets(many_groups):
    torch.manual_seed(3)
    model = TransformerClassifier(FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), num_classes=4,
                                  dim=16).eval()
    g = torch.Generator().manual_seed(3)
    x = codes(10, 19, 40, g)
    targets = torch.randint(0, 4, (10,), generator=g)
    chefer = fastattr.CheferRelevance(model)
    for target in (targets, targets.numpy(), targets.tolist(), 2):
        packed = chefer.attribute(target_class_idx=target, codes=x)["codes"]
        assert len(chefer.last_groups) > 1
        ref = chefer_reference(model, target=torch.as_tensor(target) if not isinstance(target, int) else target,
                               codes=x)["codes"]
        assert rel_err(packed, ref) <= 1e-5
        assert torch.equal(chefer.last_predictions[1], torch.as_tensor(target).expand(10))


class AttendsToPadding(TransformerClassifier):
    """Attention over every position, padding included: its output depends on the padding."""

    def _tokens(self, key, feature):
        value, mask = super()._tokens(key, feature)
        return value, torch.ones_like(mask)


def test_chefer_on_a_model_that_attends_to_padding_runs_padded(many_groups):
    torch.manual_seed(2)
    model = AttendsToPadding(FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), num_classes=3,
                             dim=16).eval()
    x = codes(6, 12, 40, torch.Generator().manual_seed(6), min_len=2)
    chefer = fastattr.CheferRelevance(model)
    with pytest.warns(UserWarning, match="depends on the padding of .codes."):
        got = chefer.attribute(codes=x)["codes"]
    assert chefer.last_groups == [(6, None)]
    assert rel_err(got, chefer_reference(model, codes=x)["codes"]) <= 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is cached: no second warning
        chefer.attribute(codes=x)
    with pytest.raises(ValueError, match="pack_lengths=True, but AttendsToPadding"):
        chefer.attribute(pack_lengths=True, codes=x)
    with pytest.raises(ValueError, match="pack_lengths"):
        fastattr.CheferRelevance(model, pack_lengths="always")


class Strict(TransformerClassifier):
    """Takes a feature only in the form its schema gives ((time, value) here) and refuses an extra
    element: a length group must reach the model as the caller's batch would."""

    def forward(self, **batch):
        for key in self.feature_keys:
            assert isinstance(batch[key], tuple) and len(batch[key]) == 2, f"{key}: {len(batch[key])} elements"
        return super().forward(**batch)


def test_chefer_groups_reach_the_model_in_the_callers_form(many_groups):
    torch.manual_seed(4)
    model = Strict(FeatureSpec({"codes": FeatureProcessor(token=True, size=40, layout=("time", "value"))}),
                   num_classes=3, dim=16).eval()
    g = torch.Generator().manual_seed(4)
    x = codes(7, 13, 40, g)
    data = {"codes": (torch.rand(7, 13, generator=g).cumsum(1), x)}
    chefer = fastattr.CheferRelevance(model)
    got = chefer.attribute(**data)["codes"]
    assert len(chefer.last_groups) > 1
    assert rel_err(got, chefer_reference(model, **data)["codes"]) <= 1e-5


def test_a_batch_whose_padding_costs_less_than_its_groups_and_check_runs_padded():
    torch.manual_seed(0)
    model = TransformerClassifier(FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), dim=16).eval()
    lengths = LengthGroups(model, "chefer", "logits")
    cpu = torch.device("cpu")
    few_short = torch.ones(32, 400, dtype=torch.long) * 5
    few_short[0, 300:] = 0  # one shorter patient: a group of its own would save less than it and the check cost
    assert lengths.plan(FeatureBatch.from_batch(model, {"codes": few_short}), pack="auto", points=1, device=cpu) is None
    long_tail = torch.zeros(32, 400, dtype=torch.long)
    long_tail[:31, :3], long_tail[31] = 5, 5  # 31 short patients padded to one long one's width
    groups = lengths.plan(FeatureBatch.from_batch(model, {"codes": long_tail}), pack="auto", points=1, device=cpu)
    assert groups is not None and sorted(sizes for _, sizes in groups) == [[3], [400]]


def test_chefer_plans_on_tokens_and_cuts_every_dim():
    """A nested feature's codes within a visit are summed into one token: Chefer weighs visits, not codes,
    and each group is still cut to its longest visit and its most codes."""
    torch.manual_seed(0)
    model = TransformerClassifier(_nested_spec(), num_classes=3, dim=16).eval()
    visits = torch.zeros(32, 400, 30, dtype=torch.long)
    visits[:, :2, :30] = 7  # every patient has 2 visits of 30 codes, one has 400 visits of 2 codes
    visits[31, :400, :2] = 7
    data = {"visits": visits, "labs": torch.randn(32, 3, 3)}
    features = FeatureBatch.from_batch(model, data)
    cpu = torch.device("cpu")
    groups = LengthGroups(model, "chefer", "logits").plan(features, pack="auto", points=1, device=cpu)
    assert groups is not None and sorted(s for _, s in groups) == [[2, 30, 3], [400, 30, 3]]
    for index, sizes in groups:
        assert sizes == features.lengths()[index].amax(dim=0).tolist()


def test_chefer_weighs_tokens_and_the_checks_cost(monkeypatch):
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = TransformerClassifier(_nested_spec(), num_classes=3, dim=16).eval()
    visits = torch.zeros(32, 20, 30, dtype=torch.long)
    visits[:16, :20, :1] = 7  # 16 patients with 20 visits of one code, 16 with one visit of 30 codes
    visits[16:, :1, :30] = 7
    features = FeatureBatch.from_batch(model, {"visits": visits, "labs": torch.randn(32, 3, 3)})
    assert LengthGroups(model, "chefer", "logits").plan(features, pack="auto", points=1, device=cpu) is None
    by_codes = LengthGroups(model, "integrated_gradients", "logits").plan(features, pack="auto", points=1, device=cpu)
    assert by_codes is not None and len(by_codes) == 2  # counted by codes, the split looks worth it
    flat = TransformerClassifier(FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), dim=16).eval()
    codes = torch.ones(32, 400, dtype=torch.long) * 5
    codes[:4, 100:] = 0  # trimming saves more than a group costs, less than a group and the check
    features = FeatureBatch.from_batch(flat, {"codes": codes})
    assert LengthGroups(flat, "chefer", "logits").plan(features, pack="auto", points=1, device=cpu) is None
    monkeypatch.setitem(packing.CHECK_ROWS, "chefer", 0.0)
    assert LengthGroups(flat, "chefer", "logits").plan(features, pack="auto", points=1, device=cpu) is not None

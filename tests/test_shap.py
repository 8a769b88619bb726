"""fastattr.ShapExplainer against the plain per-coalition oracle (fastattr.loop.loop_kernel_shap) on
fastattr's own models: fresh random inputs with padding, odd sizes, a batch of one, both gating spaces,
a model that reads its padding, PyHealth's seeding, and bad input. Every coalition's logits within 1e-5 of
the oracle's largest; the fit of those logits within 1e-6 of the oracle's restated fit, and end to end
within 1e-5 per key. Both fits here solve by the repeatable float64 solver (conftest.repeatable_lstsq): torch
2.13's float32 ``gelsy`` moves with stale memory (pytorch#187411). PyHealth's own solver, whose float32 fit
grows the logits' rounding ~1,000-fold, is checked against PyHealth in tests/test_parity_shap.py (1e-4)."""
import pytest
import torch
from conftest import codes, own_model, rel_err
from test_padding_check import InfersMaskFromEmbeddings, labs_batch, labs_spec

import fastattr
from fastattr.core import packing
from fastattr.loop import brute_force_shapley, loop_kernel_shap
from fastattr.loop.shap import _shap_fit

pytestmark = pytest.mark.usefixtures("repeatable_lstsq")


def assert_matches_oracle(model, batch, baseline=None, target_class_idx=None, **options):
    shap = fastattr.ShapExplainer(model, **options)
    got = shap.attribute(baseline=baseline, target_class_idx=target_class_idx, **batch)
    ref, logits = loop_kernel_shap(model, batch, baseline=baseline, target_class_idx=target_class_idx, **options)
    assert rel_err(shap.last_coalition_logits, logits) <= 1e-5  # every coalition's logits, as the oracle's
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape and got[key].dtype == ref[key].dtype
    assert any(ref[k].abs().max() > 0 for k in ref)
    # the fit, restated by the oracle, of fastattr's own logits: the same system, so the same solution
    restated = _shap_fit(list(shap.last_coalitions), list(shap.last_coalition_logits), shap.regularization)
    assert rel_err(flat(got, shap), restated) <= 1e-6
    # and end to end, where the fit carries the logits' float rounding (measured up to 6e-7)
    errors = {k: rel_err(got[k], ref[k]) for k in ref}
    assert max(errors.values()) <= 1e-5, errors
    return shap


def flat(attributions, shap):
    """``[B, M]``: each key's value per position (its first entry over trailing dims), keys sorted."""
    size = shap.last_coalition_logits.shape[1]
    return torch.cat([attributions[k].reshape(size, attributions[k].shape[1], -1)[..., 0]
                      for k in sorted(attributions)], dim=1)


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
@pytest.mark.parametrize("use_embeddings", [True, False])
@pytest.mark.parametrize("classes", [1, 3])
def test_matches_the_oracle(kind, use_embeddings, classes):
    model, batch = own_model(kind, num_classes=classes, seed=classes)
    assert_matches_oracle(model, batch, use_embeddings=use_embeddings, max_coalitions=48)


@pytest.mark.parametrize("size", [1, 5])
def test_odd_sizes_and_a_target_class(size):
    model, _ = own_model("transformer", num_classes=3, seed=size)
    g = torch.Generator().manual_seed(size)
    batch = {"codes": codes(size, 13, 40, g), "labs": torch.randn(size, 2, 5, generator=g)}
    assert_matches_oracle(model, batch, max_coalitions=40, target_class_idx=2)


def test_a_custom_baseline_and_the_defaults_on_a_short_batch():
    model, batch = own_model("transformer", num_classes=3, seed=7)
    baseline = {"codes": torch.full_like(batch["codes"], 3), "labs": torch.zeros_like(batch["labs"]) - 0.5}
    assert_matches_oracle(model, batch, baseline=baseline, max_coalitions=32)


def test_distinct_rows_run_once_and_padding_is_trimmed(monkeypatch):
    """Short patients have few distinct coalitions: far fewer rows than coalitions x patients."""
    for method in packing.GROUP_COST:
        monkeypatch.setitem(packing.GROUP_COST[method], "cpu", 0.0)
    model, _ = own_model("transformer", num_classes=3, seed=3)
    g = torch.Generator().manual_seed(3)
    batch = {"codes": codes(6, 16, 40, g) * (torch.arange(16) < torch.tensor([2, 3, 16, 1, 4, 9])[:, None]),
             "labs": torch.randn(6, 1, 5, generator=g)}
    batch["codes"][:, 0] = 5
    shap = assert_matches_oracle(model, batch, max_coalitions=120)
    assert shap.runner.merged_padding
    assert shap.runner.last_rows < 120 * 6 // 2


def test_a_model_that_reads_its_padding_keeps_every_gate():
    """A gate on a padding position puts the baseline's embedding there; a model that infers its mask
    from the embeddings attends it, so no row may be merged or trimmed."""
    torch.manual_seed(0)
    model = InfersMaskFromEmbeddings(labs_spec(), num_classes=2, dim=16, heads=2, layers=2).eval()
    batch = labs_batch(1, size=5)
    shap = assert_matches_oracle(model, batch, max_coalitions=40)
    assert not shap.runner.merged_padding


def test_seeding_is_pyhealths():
    model, batch = own_model("transformer", num_classes=3, seed=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fastattr.ShapExplainer(model, max_coalitions=20, random_seed=5).attribute(**batch)
    assert torch.equal(torch.get_rng_state(), before), "the caller's random state must be left as it was"
    torch.manual_seed(9)
    ours = fastattr.ShapExplainer(model, max_coalitions=20, random_seed=None)
    ours.attribute(**batch)
    after_ours = torch.get_rng_state()
    torch.manual_seed(9)
    _, logits = loop_kernel_shap(model, batch, max_coalitions=20, random_seed=None)
    assert torch.equal(torch.get_rng_state(), after_ours), "random_seed=None draws as many numbers as PyHealth"
    assert rel_err(ours.last_coalition_logits, logits) <= 1e-5  # the same coalitions, in the same order


@pytest.mark.parametrize(("option", "value"), [("n_background_samples", 0), ("max_coalitions", 0),
                                                ("max_coalitions", 2.5), ("regularization", -1.0),
                                                ("regularization", float("nan")), ("random_seed", "42")])
def test_options_outside_their_domain_are_refused(option, value):
    model, _ = own_model("transformer")
    with pytest.raises(ValueError, match=option):
        fastattr.ShapExplainer(model, **{option: value})


def test_a_model_without_embedding_methods_is_refused_as_pyhealth_refuses_it():
    model, batch = own_model("transformer")

    class NoEmbedding:
        feature_keys, dataset = model.feature_keys, model.dataset

        def forward(self, **kwargs):
            return model(**kwargs)

        def eval(self):
            return self

        def parameters(self):
            return model.parameters()

    with pytest.raises(ValueError, match="Interpretable"):
        fastattr.ShapExplainer(NoEmbedding())


def test_a_baseline_missing_a_key_is_refused():
    model, batch = own_model("transformer")
    with pytest.raises(KeyError, match="baseline.*labs"):
        fastattr.ShapExplainer(model, max_coalitions=8).attribute(baseline={"codes": batch["codes"]}, **batch)


def first_entries(attributions, size):
    return {k: v.reshape(size, v.shape[1], -1)[..., 0] for k, v in attributions.items()}


@pytest.mark.parametrize("use_embeddings", [True, False])
@pytest.mark.parametrize("model_kind", ["transformer", "reads_padding"])
def test_exact_shapley_equals_the_brute_force_definition(use_embeddings, model_kind):
    """exact=True: every patient with 2**n <= max_coalitions gets the Shapley values of its own positions,
    as the definition (every ordering of its players) gives them; they sum to v(all) - v(none)."""
    if model_kind == "transformer":
        model, _ = own_model("transformer", num_classes=3, seed=11)
        g = torch.Generator().manual_seed(11)
        batch = {"codes": codes(3, 4, 40, g), "labs": torch.randn(3, 2, 5, generator=g)}
    else:
        torch.manual_seed(0)
        model = InfersMaskFromEmbeddings(labs_spec(), num_classes=2, dim=16, heads=2, layers=2).eval()
        batch = labs_batch(2, size=3, width=4, steps=2)
    baseline = None if use_embeddings else {k: torch.ones_like(v) if k == "codes" else torch.zeros_like(v)
                                            for k, v in batch.items() if k in ("codes", "labs")}
    shap = fastattr.ShapExplainer(model, exact=True, max_coalitions=64, use_embeddings=use_embeddings)
    got = first_entries(shap.attribute(baseline=baseline, **batch), 3)
    ref = brute_force_shapley(model, batch, use_embeddings=use_embeddings, baseline=baseline)
    assert bool(shap.last_exact.all()) and shap.last_coalitions is None  # no coalition was drawn
    assert all(rel_err(got[k], ref[k]) <= 1e-5 for k in ref), {k: rel_err(got[k], ref[k]) for k in ref}
    assert any(bool(ref[k].ne(0).any()) for k in ref)


def test_exact_shapley_is_efficient_and_leaves_large_patients_to_pyhealths_estimate():
    model, _ = own_model("transformer", num_classes=3, seed=12)
    g = torch.Generator().manual_seed(12)
    batch = {"codes": codes(4, 9, 40, g, min_len=9), "labs": torch.randn(4, 1, 5, generator=g)}
    batch["codes"][1, 3:] = 0  # 3 codes + 1 lab: 16 coalitions; the others 10 players: 1,024 > 256
    shap = fastattr.ShapExplainer(model, exact=True, max_coalitions=256)
    got = shap.attribute(**batch)
    assert shap.last_exact.tolist() == [False, True, False, False]
    plain = fastattr.ShapExplainer(model, max_coalitions=256)
    sampled = plain.attribute(**batch)
    # the others: PyHealth's sampled estimate of the same batch, as without exact (the same coalitions'
    # logits, so the same values)
    assert rel_err(shap.last_coalition_logits, plain.last_coalition_logits) <= 1e-6
    assert all(rel_err(got[k][[0, 2, 3]], sampled[k][[0, 2, 3]]) <= 1e-5 for k in got)
    one = {k: v[1:2] for k, v in batch.items()}
    with torch.no_grad():
        logits = model(**one)["logit"][0]
        target = int(logits.argmax())
        empty = {"codes": torch.where(one["codes"] != 0, 1, 0), "labs": torch.full_like(one["labs"], 0.01)}
        drop = model(**empty)["logit"][0, target]
    total = sum(first_entries(got, 4)[k][1].sum() for k in got)
    assert abs(float(total) - float(logits[target] - drop)) <= 1e-4 * float(logits.abs().max())
    assert bool(got["codes"][1, 3:].eq(0).all())  # padding is no player


def test_exact_must_be_a_bool():
    model, _ = own_model("transformer")
    with pytest.raises(ValueError, match="exact"):
        fastattr.ShapExplainer(model, exact="yes")

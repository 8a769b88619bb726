"""fastattr.LimeExplainer against the plain per-perturbation oracle (fastattr.loop.loop_lime) on fastattr's
own models: fresh random inputs with padding, odd sizes, a batch of one, all-padding and duplicate patients,
both gating spaces, every fit and distance, a model that reads its padding, PyHealth's seeding and key
order, and bad input. Every perturbation's logits within 1e-5 of the oracle's largest, every similarity
weight within 1e-5, the fit of fastattr's own logits and weights within 1e-5 of the oracle's restated
per-patient fit, and end to end within 1e-4 per key (LIME's fit is well conditioned: measured ~1e-6;
against PyHealth itself, tests/test_parity_lime.py)."""
import pytest
import torch
from conftest import codes, own_model, rel_err
from test_padding_check import InfersMaskFromEmbeddings, labs_batch, labs_spec

import fastattr
from fastattr.core import packing
from fastattr.interpret.perturbation.lime import lime_fit
from fastattr.loop import loop_lime
from fastattr.loop.lime import _lime_fit

N = 40


def assert_matches_oracle(model, batch, baseline=None, target_class_idx=None, **options):
    options.setdefault("n_samples", N)
    lime = fastattr.LimeExplainer(model, **options)
    got = lime.attribute(baseline=baseline, target_class_idx=target_class_idx, **batch)
    ref, logits, weights = loop_lime(model, batch, baseline=baseline, target_class_idx=target_class_idx, **options)
    assert rel_err(lime.last_perturbation_logits, logits) <= 1e-5
    assert rel_err(lime.last_weights, weights) <= 1e-5
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape and got[key].dtype == ref[key].dtype
    assert any(ref[k].abs().max() > 0 for k in ref)
    samples, y, w = lime.last_perturbations, lime.last_perturbation_logits, lime.last_weights
    restated = torch.stack([_lime_fit(samples, y[:, b], w[:, b], lime.feature_selection, lime.alpha)
                            for b in range(y.shape[1])])
    assert rel_err(lime_fit(samples, y, w, lime.feature_selection, lime.alpha), restated) <= 1e-5
    assert all(rel_err(got[k], ref[k]) <= 1e-4 for k in ref), {k: rel_err(got[k], ref[k]) for k in ref}
    return lime, got


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
@pytest.mark.parametrize("use_embeddings", [True, False])
@pytest.mark.parametrize("classes", [1, 3])
def test_matches_the_oracle(kind, use_embeddings, classes):
    model, batch = own_model(kind, num_classes=classes, seed=classes)
    assert_matches_oracle(model, batch, use_embeddings=use_embeddings)


@pytest.mark.parametrize(("selection", "distance", "width", "alpha"),
                         [("lasso", "euclidean", 3.0, 0.01), ("ridge", "cosine", 0.5, 0.1),
                          ("none", "cosine", 0.25, 0.0), ("none", "euclidean", 10.0, 0.01)])
def test_every_fit_and_distance(selection, distance, width, alpha):
    model, batch = own_model("transformer", num_classes=3, seed=4)
    assert_matches_oracle(model, batch, feature_selection=selection, distance_mode=distance,
                          kernel_width=width, alpha=alpha)


@pytest.mark.parametrize("size", [1, 5])
def test_odd_sizes_and_a_target_class(size):
    model, _ = own_model("transformer", num_classes=3, seed=size)
    g = torch.Generator().manual_seed(size)
    batch = {"codes": codes(size, 13, 40, g), "labs": torch.randn(size, 2, 5, generator=g)}
    assert_matches_oracle(model, batch, target_class_idx=2)


def test_a_custom_baseline_all_padding_and_duplicate_patients():
    model, batch = own_model("transformer", num_classes=3, seed=7)
    batch["codes"][1] = 0  # a patient without a single code
    batch["codes"][3], batch["labs"][3] = batch["codes"][2], batch["labs"][2]  # two identical patients
    baseline = {"codes": torch.full_like(batch["codes"], 3), "labs": torch.zeros_like(batch["labs"]) - 0.5}
    _, got = assert_matches_oracle(model, batch, baseline=baseline)
    assert all(torch.equal(got[k][2], got[k][3]) for k in got)


def test_keys_are_drawn_in_the_batchs_order():
    """PyHealth draws each perturbation's gates key by key in the order the batch gives them."""
    model, batch = own_model("transformer", num_classes=3, seed=5)
    reordered = {"labs": batch["labs"], "codes": batch["codes"]}
    _, first = assert_matches_oracle(model, batch)
    _, second = assert_matches_oracle(model, reordered)
    assert not torch.allclose(first["codes"], second["codes"])


def test_distinct_rows_run_once_and_trimming_is_exact(monkeypatch):
    """Short patients have few distinct perturbations: far fewer rows than perturbations x patients;
    trimmed and untrimmed runs give the same attributions."""
    for method in packing.GROUP_COST:
        monkeypatch.setitem(packing.GROUP_COST[method], "cpu", 0.0)
    model, _ = own_model("transformer", num_classes=3, seed=3)
    g = torch.Generator().manual_seed(3)
    batch = {"codes": codes(6, 16, 40, g) * (torch.arange(16) < torch.tensor([2, 3, 16, 1, 4, 9])[:, None]),
             "labs": torch.randn(6, 1, 5, generator=g)}
    batch["codes"][:, 0] = 5
    lime, got = assert_matches_oracle(model, batch, n_samples=120)
    assert lime.runner.merged_padding
    assert lime.runner.last_rows < 120 * 6 // 2
    plain = fastattr.LimeExplainer(model, n_samples=120, pack_lengths=False).attribute(**batch)
    assert all(rel_err(got[k], plain[k]) <= 1e-5 for k in got)


def test_a_model_that_reads_its_padding_keeps_every_gate():
    torch.manual_seed(0)
    model = InfersMaskFromEmbeddings(labs_spec(), num_classes=2, dim=16, heads=2, layers=2).eval()
    lime, _ = assert_matches_oracle(model, labs_batch(1, size=5), n_samples=40)
    assert not lime.runner.merged_padding


def test_seeding_is_pyhealths():
    model, batch = own_model("transformer", num_classes=3, seed=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    seeded = fastattr.LimeExplainer(model, n_samples=20, random_seed=5)
    first = seeded.attribute(**batch)
    assert torch.equal(torch.get_rng_state(), before), "the caller's random state must be left as it was"
    assert all(rel_err(v, first[k]) <= 1e-5 for k, v in seeded.attribute(**batch).items())  # same draws again
    torch.manual_seed(9)
    ours = fastattr.LimeExplainer(model, n_samples=20, random_seed=None)
    ours.attribute(**batch)
    after_ours = torch.get_rng_state()
    torch.manual_seed(9)
    _, logits, _ = loop_lime(model, batch, n_samples=20, random_seed=None)
    assert torch.equal(torch.get_rng_state(), after_ours), "random_seed=None draws as many numbers as PyHealth"
    assert rel_err(ours.last_perturbation_logits, logits) <= 1e-5


@pytest.mark.parametrize(("option", "value"), [("n_samples", 0), ("n_samples", 2.5), ("kernel_width", 0),
                                                ("kernel_width", -1.0), ("kernel_width", float("nan")),
                                                ("kernel_width", "wide"), ("distance_mode", "manhattan"),
                                                ("feature_selection", "l1"), ("alpha", -1.0),
                                                ("alpha", float("inf")), ("random_seed", "42")])
def test_options_outside_their_domain_are_refused(option, value):
    model, _ = own_model("transformer")
    with pytest.raises(ValueError, match=option):
        fastattr.LimeExplainer(model, **{option: value})


@pytest.mark.parametrize("use_embeddings", [True, False])
def test_a_model_without_embedding_methods_is_refused_as_pyhealth_refuses_it(use_embeddings):
    model, _ = own_model("transformer")

    class NoEmbedding:
        feature_keys, dataset = model.feature_keys, model.dataset

        def forward(self, **kwargs):
            return model(**kwargs)

        def eval(self):
            return self

        def parameters(self):
            return model.parameters()

    with pytest.raises(ValueError, match="Interpretable"):
        fastattr.LimeExplainer(NoEmbedding(), use_embeddings=use_embeddings)


def test_a_baseline_missing_a_key_is_refused():
    model, batch = own_model("transformer")
    with pytest.raises(KeyError, match="baseline.*labs"):
        fastattr.LimeExplainer(model, n_samples=8).attribute(baseline={"codes": batch["codes"]}, **batch)


def test_an_interpretable_model_without_forward_from_embedding_is_refused_only_for_embeddings():
    """PyHealth asserts forward_from_embedding where use_embeddings (an AssertionError), and takes the model
    without it (this model's own forward needs it, so only the construction is checked)."""
    model, _ = own_model("transformer")

    class Interpretable:  # PyHealth's ABC, by name
        pass

    class Hidden(type(model), Interpretable):
        def __getattribute__(self, name):
            if name == "forward_from_embedding":
                raise AttributeError(name)
            return super().__getattribute__(name)

    hidden = model
    hidden.__class__ = Hidden
    with pytest.raises(AssertionError, match="forward_from_embedding"):
        fastattr.LimeExplainer(hidden)
    assert not fastattr.LimeExplainer(hidden, use_embeddings=False).use_embeddings

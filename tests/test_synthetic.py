"""The synthetic cohort generator: reproducible, lazy, and its labels follow the planted truth."""
import numpy as np
import pytest
import torch

from fastattr.demo.synthetic import SyntheticCohort


def test_same_seed_same_cohort_and_other_seed_differs():
    a, b, c = SyntheticCohort(300, seed=5), SyntheticCohort(300, seed=5), SyntheticCohort(300, seed=6)
    assert a.truth == b.truth
    assert torch.equal(a.batch(range(300))["codes"], b.batch(range(300))["codes"])
    assert not torch.equal(a.batch(range(300))["codes"], c.batch(range(300))["codes"])


def test_lazy_random_access_matches_sequential_generation():
    big = SyntheticCohort(patients=5_000_000, seed=1)  # costs nothing until read
    tail = big.batch([4_999_999, 17])
    assert torch.equal(tail["codes"][1], big.batch(range(16, 18))["codes"][1])
    assert big.patient(4_999_999) == big.patient(4_999_999)
    with pytest.raises(IndexError):
        big.patient(5_000_000)


def test_shape_padding_and_long_tail():
    cohort = SyntheticCohort(2000, seed=2)
    batch = cohort.batch(range(2000))
    lengths = (batch["codes"] != 0).sum(1)
    assert batch["codes"].shape == (2000, cohort.max_codes)
    assert lengths.min() >= 4 and lengths.max() <= cohort.max_codes and lengths.float().std() > 2
    assert bool(((batch["codes"] == 0).cumsum(1) > 0).eq(batch["codes"] == 0).all()), "padding only at the end"
    counts = torch.bincount(batch["codes"][batch["codes"] > 0], minlength=len(cohort.names)).float()
    top = counts.sort(descending=True).values
    assert top[0] > 10 * top[len(top) // 2], "a Zipf tail: the commonest code dwarfs the median one"


def test_planted_codes_change_the_label_as_specified():
    cohort = SyntheticCohort(4000, seed=3)
    truth = cohort.truth
    code, effect = next(iter(truth.planted.items()))
    assert truth.logit({code}) - truth.logit(set()) == pytest.approx(effect)
    (a, b), pair_effect = next(iter(truth.pairs.items()))
    assert truth.logit({a}) == truth.logit({b}) == truth.logit(set()), "a pair member alone has no effect"
    assert truth.logit({a, b}) - truth.logit(set()) == pytest.approx(pair_effect)
    distractor = next(iter(truth.distractors))
    assert truth.logit({distractor}) == truth.logit(set())
    # Empirically, the labels follow the logistic model: mean label ~ mean predicted probability,
    # per group of patients with and without the planted code.
    batch = cohort.batch(range(4000))
    probs = torch.tensor([1 / (1 + np.exp(-truth.logit(set(row.tolist())))) for row in batch["codes"]])
    carriers = (batch["codes"] == code).any(1)
    for group in (carriers, ~carriers):
        labels = batch["label"][group].float()
        sd = (probs[group] * (1 - probs[group])).sum().sqrt() / group.sum()
        assert abs(labels.mean() - probs[group].mean()) < 4 * sd
    assert batch["label"][carriers].float().mean() > batch["label"][~carriers].float().mean() + 0.2


def test_distractors_follow_their_planted_code():
    cohort = SyntheticCohort(3000, seed=4)
    codes = cohort.batch(range(3000))["codes"]
    for distractor, planted in cohort.truth.distractors.items():
        with_planted = (codes == planted).any(1)
        has = (codes == distractor).any(1)
        assert has[with_planted].float().mean() > has[~with_planted].float().mean() + 0.4


@pytest.mark.parametrize("kwargs, message", [
    (dict(patients=0), "patients must be >= 1"), (dict(vocab=10), "need vocab >= 40"),
    (dict(visits=(3, 2)), r"visits must be \(min, max\)"), (dict(planted=60), "2 \\* planted"),
    (dict(lengths="zipf"), "lengths must be"), (dict(lengths="lognormal", median_codes=0), "median_codes > 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticCohort(**kwargs)


def test_lognormal_lengths_are_long_tailed_and_seeded():
    cohort = SyntheticCohort(patients=400, seed=2, lengths="lognormal", median_codes=15, longest=300)
    n = (cohort.batch(range(400), pad_to_longest=True)["codes"] != 0).sum(1).float()
    assert 11 <= n.median() <= 21 and n.max() >= 6 * n.median()  # most short, a long tail
    again = SyntheticCohort(patients=400, seed=2, lengths="lognormal", median_codes=15, longest=300)
    assert torch.equal(cohort.batch(range(5))["codes"], again.batch(range(5))["codes"])

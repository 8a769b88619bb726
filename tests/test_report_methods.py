"""The report's method comparison on runs of a tiny synthetic cohort: every method's faithfulness with
intervals beside a random attribution, how each run was batched, and the agreement of each patient's top
codes between every pair of methods (checked against a plain recount)."""
import re

import numpy as np
import pytest
import torch
from conftest import tiny_model

from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.cohort.methods import build_interpreter
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort
from fastattr.report.methods_section import top_k_agreement
from fastattr.report.page import write_report
from fastattr.report.scores import evaluate_run

pytest.importorskip("matplotlib")
METHODS = {"ig": {"steps": 3}, "chefer": {}, "shap": {"max_coalitions": 64}, "lime": {"n_samples": 32},
           "random": {"random_seed": 0}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    cohort = SyntheticCohort(patients=14, seed=5, lengths="lognormal", median_codes=7, longest=16)
    model = tiny_model(cohort)
    loader = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=5, shuffle=False,
                                         collate_fn=CohortDataset.collate)
    for method, options in METHODS.items():
        interpreter, call = build_interpreter(method, model, options)
        attribute_dataset(interpreter, loader, root / method, progress=False, vocab={"codes": cohort.names}, **call)
        if method != "lime":  # one run left unscored
            evaluate_run(root / method, model, percentages=[20, 50], progress=False)
    return root


def recount(stores, k):
    """The mean top-k overlap of every pair, from each patient's attribution row directly."""
    tops = [[set(np.argsort(-s[i]["attr/codes"].double().numpy(), kind="stable")[:k].tolist()) for i in s]
            for s in stores]
    keep = [i for i in range(len(stores[0])) if len(stores[0][i]["attr/codes"]) > k]
    return np.array([[np.mean([len(a[i] & b[i]) / k for i in keep]) for b in tops] for a in tops]), len(keep)


def test_top_k_agreement_is_the_mean_overlap_of_each_patients_top_codes(runs):
    stores = [load_attributions(runs / m) for m in METHODS]
    overlap, count = top_k_agreement(stores, k=3)
    expected, kept = recount(stores, 3)
    assert count == kept > 5
    np.testing.assert_allclose(overlap, expected)
    np.testing.assert_allclose(np.diag(overlap), 1.0)
    np.testing.assert_allclose(overlap, overlap.T)
    assert 0 <= overlap.min() and overlap.max() <= 1


def test_report_compares_every_method(runs, tmp_path):
    path = write_report([runs / m for m in METHODS], tmp_path / "report.html", labels=list(METHODS), top=5,
                        patients=2)
    text = path.read_text()
    section = text[text.index("<h2>Method comparison: 5 methods</h2>"):text.index("<h2>Faithfulness</h2>")]
    interval = r"\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\]"
    for method in ("ig", "chefer", "shap", "random"):
        row = re.search(rf"<tr><td class=l>{method}</td>.*?</tr>", section).group(0)
        assert len(re.findall(interval, row)) == 2, row
    assert re.search(r"<tr><td class=l>lime</td>.*not scored", section)
    assert "<td class=l>random baseline</td>" in section  # evaluate's random attribution of the same patients
    assert "the loader&#x27;s batches of 5 (values depend on the batch)" in section.replace("'", "&#x27;")
    assert "sorted by length" in section
    matrix = re.search(r"<table class=agreement>.*?</table>", section).group(0)
    assert matrix.count("<tr>") == 6 and matrix.count(">1.00</td>") == 5
    assert "Agreement on each patient&#x27;s top 5 codes" in section.replace("'", "&#x27;")
    assert "<h2>Agreement:" not in text  # the pairwise code-importance section is for two runs
    faithfulness = text[text.index("<h2>Faithfulness</h2>"):]
    assert "<table><tr><th>method</th>" not in faithfulness.split("<h2>", 2)[1]  # its table is the comparison's


def test_runs_of_other_patients_and_a_repeated_run(runs, tmp_path):
    other = SyntheticCohort(patients=6, seed=9)
    ig, _ = build_interpreter("ig", tiny_model(other), {"steps": 2})
    attribute_dataset(ig, torch.utils.data.DataLoader(CohortDataset(other), batch_size=3,
                                                      collate_fn=CohortDataset.collate), tmp_path / "other",
                      progress=False)
    text = write_report([runs / "ig", runs / "chefer", tmp_path / "other"], tmp_path / "r.html", top=3,
                        patients=0).read_text()
    assert "the runs hold different patients" in text and "top codes is left out" in text
    with pytest.raises(ValueError, match="runs must be different run folders; .* is given more than once"):
        write_report([runs / "ig", runs / "ig"], tmp_path / "x.html")


def test_the_batching_column_names_the_features_whose_padding_the_values_depend_on():
    from types import SimpleNamespace

    from fastattr.report.methods_section import _batching
    padded = {"sorted": False, "batch_dependent": True, "batch_size": 16, "padding_dependent": ["labs", "vitals"]}
    assert _batching(SimpleNamespace(info={"batching": padded})) == \
        "the loader's batches of 16 (values depend on the padding of labs, vitals)"
    sorted_anyway = {"sorted": True, "batch_dependent": True, "batch_size": 16, "padding_dependent": ["labs"]}
    assert _batching(SimpleNamespace(info={"batching": sorted_anyway})) == \
        "sorted by length (values depend on the padding of labs)"
    assert _batching(SimpleNamespace(info={"batching": {"sorted": True}})) == "sorted by length"

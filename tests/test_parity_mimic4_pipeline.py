"""fastattr against PyHealth 2.1.0 on PyHealth's own MIMIC-IV pipeline, end to end.

The tables come from ``benchmarks/mimic4_tables.py`` (seeded, MIMIC-IV-shaped); the rest is what
PyHealth's ``examples/interpretability/mp_transformer_mimic4_interpret.py`` does: ``MIMIC4Dataset`` with the
example's five EHR tables, ``MortalityPredictionStageNetMIMIC4``, ``split_by_patient``, a test loader of 16,
the example's ``Transformer(embedding_dim=128, heads=4, dropout=0.3, num_layers=3)``, briefly trained, and
``evaluate_attribution(..., percentages=[25, 50, 99])`` for each method. That Transformer is padding-sensitive
(``labs`` is embedded by a Linear with a bias, so padded lab rows become attended tokens): the case that a
synthetic padding-free model does not cover. A small StageNet on the same samples is padding-sensitive too here:
the task's stagenet processors give no mask, so StageNet infers one from the embedded values.
PyHealth's loader orders a visit's codes (which share a timestamp) differently from run to run, and with them the
code vocabulary, so the trained models and the scores differ between runs; every comparison is within one run.
"""
from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import rel_err

import fastattr
import fastattr.metrics

pytestmark = pytest.mark.parity

TABLES = ["patients", "admissions", "diagnoses_icd", "procedures_icd", "labevents"]
PERCENTAGES = [25, 50, 99]
METRICS = ["comprehensiveness", "sufficiency"]
IG_RTOL = 1e-5  # largest |difference| over the reference's largest |value|, per feature and batch
METRIC_ATOL = 1e-6  # absolute, on every dataset mean and every per-sample score
EVAL_STEPS = 5  # IG steps of the methods handed to the evaluators (their parity does not depend on it)


def timed(stage: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its wall time printed (visible with ``-s``)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"[mimic4 pipeline] {stage}: {time.perf_counter() - start:.1f} s")
    return out


def write_tables(root: Path) -> Path:
    # By file path: the tests run with -P (the repository root off sys.path), so benchmarks/ is not a package here
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mimic4_tables.py"
    spec = importlib.util.spec_from_file_location("fastattr_bench_mimic4_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_mimic4_tables(root, patients=120, seed=0)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The example's data path: tables -> MIMIC4Dataset -> set_task -> split_by_patient -> loaders."""
    from pyhealth.datasets import MIMIC4Dataset, get_dataloader, split_by_patient
    from pyhealth.tasks import MortalityPredictionStageNetMIMIC4

    tmp = tmp_path_factory.mktemp("mimic4")
    root = timed("write tables", write_tables, tmp / "mimiciv" / "2.2")
    dataset = MIMIC4Dataset(ehr_root=str(root), ehr_tables=list(TABLES), cache_dir=str(tmp / "cache"), num_workers=1)
    timed("MIMIC4Dataset load (event table)", lambda: dataset.global_event_df)
    samples = timed("set_task", dataset.set_task, MortalityPredictionStageNetMIMIC4(), num_workers=1)
    train, _, test = split_by_patient(samples, [0.6, 0.1, 0.3], seed=233)
    return SimpleNamespace(
        samples=samples, test=test,
        train_loader=get_dataloader(train, batch_size=16, shuffle=True, seed=0),
        test_loader=get_dataloader(test, batch_size=16, shuffle=False),
    )


def train(model, loader, epochs: int, lr: float):
    """A few Adam updates (5 batches an epoch), then eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            model(**batch)["loss"].backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def transformer(pipeline):
    from pyhealth.models import Transformer

    torch.manual_seed(0)
    model = Transformer(dataset=pipeline.samples, embedding_dim=128, heads=4, dropout=0.3, num_layers=3)
    # 25 updates: enough that a quarter of the test set passes the default filter (probability >= 0.5)
    return timed("train Transformer", train, model, pipeline.train_loader, epochs=5, lr=1e-3)


@pytest.fixture(scope="module")
def invariant_transformer(pipeline):
    """The example's Transformer with ``labs`` embedded by a Linear without a bias: a padded lab row embeds
    to zeros and is masked like a padded code, so the model ignores padding and fastattr trims."""
    from pyhealth.models import Transformer

    torch.manual_seed(0)
    model = Transformer(dataset=pipeline.samples, embedding_dim=128, heads=4, dropout=0.3, num_layers=3)
    model.embedding_model.embedding_layers["labs"].bias = None
    return timed("train bias-free Transformer", train, model, pipeline.train_loader, epochs=5, lr=1e-3)


@pytest.fixture(scope="module")
def stagenet(pipeline):
    from pyhealth.models import StageNet

    torch.manual_seed(0)
    model = StageNet(dataset=pipeline.samples, embedding_dim=32, chunk_size=32, levels=2)
    return timed("train StageNet", train, model, pipeline.train_loader, epochs=2, lr=1e-2)


def probabilities(model, loader) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**batch)["y_prob"].reshape(-1) for batch in loader])


def test_cohort_is_the_intended_case(pipeline, transformer):
    """Enough samples, both labels, long-tailed lengths, 3 test batches, and varied predictions of which
    some pass the evaluators' default filter (probability >= 0.5): otherwise the metrics test nothing."""
    labels = torch.tensor([int(s["mortality"]) for s in pipeline.samples])
    assert len(labels) >= 100 and 0.2 <= labels.float().mean() <= 0.4
    batches = list(pipeline.test_loader)
    assert len(batches) == 3
    lab_rows = torch.cat([(b["labs"][1].abs().sum(-1) != 0).sum(1) for b in batches])
    assert lab_rows.max() >= 4 * lab_rows.median(), "lab lengths are not long-tailed"
    prob = probabilities(transformer, pipeline.test_loader)
    assert prob.std() > 0.05 and (prob >= 0.5).sum() >= 5 and (prob < 0.5).sum() >= 5


@pytest.mark.parametrize("model_name", ["transformer", "stagenet"])
def test_model_is_padding_sensitive(request, pipeline, model_name):
    """The same patient alone (its own length) and inside its padded batch of 16 gets another y_prob."""
    from pyhealth.datasets import get_dataloader

    model = request.getfixturevalue(model_name)
    assert model.embedding_model.embedding_layers["labs"].bias is not None
    padded = probabilities(model, pipeline.test_loader)
    alone = probabilities(model, get_dataloader(pipeline.test, batch_size=1, shuffle=False))
    worst = (padded - alone).abs().max().item()
    print(f"[mimic4 pipeline] {model_name} y_prob alone vs in its padded batch: worst |difference| {worst:.3e}")
    assert worst > 1e-4


def test_check_padding_names_labs_and_passes_the_bias_free_variant(pipeline, transformer, invariant_transformer):
    for batch in pipeline.test_loader:
        report = fastattr.check_padding(transformer, batch)
        assert not report.ignores_padding and report.features == ("labs",), report
        fine = fastattr.check_padding(invariant_transformer, batch)
        assert fine.ignores_padding and fine.features == (), fine


def test_the_padding_sensitive_model_runs_padded_on_every_batch(pipeline, transformer, recwarn):
    ig, chefer = fastattr.IntegratedGradients(transformer, steps=EVAL_STEPS), fastattr.CheferRelevance(transformer)
    for batch in pipeline.test_loader:
        ig.attribute(**batch)
        chefer.attribute(**batch)
        size = len(batch["mortality"])
        assert ig.last_groups == [(size, None)] and chefer.last_groups == [(size, None)]
    warned = [str(w.message) for w in recwarn if "depends on the padding of" in str(w.message)]
    assert len(warned) <= 1 and all("'labs'" in w and "'icd_codes'" not in w for w in warned)


@pytest.mark.parametrize("method_name", ["fastattr-ig", "fastattr-chefer"])
def test_the_bias_free_variant_keeps_parity_trimmed_where_exact(pipeline, invariant_transformer, method_name, recwarn,
                                                                monkeypatch):
    """Where the model ignores padding, Chefer's length groups run (trimmed) and every number stays PyHealth's.
    IG still runs padded, quietly: its UNK baseline fills the padded codes of a visit, which this Transformer
    (mask inferred from the embeddings) then attends, so IG's own path depends on padding (PyHealth's too).
    Groups are made free here: at these small widths trimming does not pay, and the default plan runs padded."""
    from pyhealth.interpret.methods import CheferRelevance, IntegratedGradients

    from fastattr.core import packing

    for method in packing.GROUP_COST:
        monkeypatch.setitem(packing.GROUP_COST[method], "cpu", 0.0)
        monkeypatch.setitem(packing.CHECK_ROWS, method, 0.0)

    ig = method_name == "fastattr-ig"
    ours_cls, theirs_cls = ((fastattr.IntegratedGradients, IntegratedGradients) if ig
                            else (fastattr.CheferRelevance, CheferRelevance))
    trimmed = 0
    for batch in pipeline.test_loader:
        ours = ours_cls(invariant_transformer)
        got, ref = ours.attribute(**batch), theirs_cls(invariant_transformer).attribute(**batch)
        trimmed += len(ours.last_groups) > 1
        assert all(rel_err(got[k], ref[k]) <= IG_RTOL for k in ref)
    assert trimmed == 0 if ig else trimmed >= 1, f"{trimmed} batches ran in length groups"
    assert not [w for w in recwarn if "depends on the padding of" in str(w.message)]
    compare_evaluate_attribution(invariant_transformer, pipeline.test_loader, method_name, sample_filter=both_classes)


def batch_parity(ours_cls, theirs_cls, model, loader, **kwargs) -> None:
    for index, batch in enumerate(loader):
        theirs = theirs_cls(model).attribute(**kwargs, **batch)
        ours = ours_cls(model).attribute(**kwargs, **batch)
        assert set(ours) == set(theirs)
        for key, ref in theirs.items():
            assert ours[key].shape == ref.shape, (index, key)
            assert ref.abs().max() > 0, f"batch {index} {key}: reference attribution is all zero"
            err = rel_err(ours[key], ref)
            print(f"[mimic4 pipeline] {ours_cls.__name__} batch {index} {key}: relative error {err:.2e}")
            assert err <= IG_RTOL, f"batch {index} {key}: relative error {err:.2e}"


def test_integrated_gradients_parity(pipeline, transformer):
    from pyhealth.interpret.methods import IntegratedGradients

    timed("test IG parity (Transformer)", batch_parity, fastattr.IntegratedGradients, IntegratedGradients,
          transformer, pipeline.test_loader)


def test_chefer_parity(pipeline, transformer):
    from pyhealth.interpret.methods import CheferRelevance

    timed("test Chefer parity", batch_parity, fastattr.CheferRelevance, CheferRelevance, transformer,
          pipeline.test_loader)


def method_factories() -> dict:
    import pyhealth.interpret.methods as ph

    return {
        "pyhealth-ig": lambda m: ph.IntegratedGradients(m, steps=EVAL_STEPS),
        "fastattr-ig": lambda m: fastattr.IntegratedGradients(m, steps=EVAL_STEPS),
        "pyhealth-chefer": lambda m: ph.CheferRelevance(m),
        "fastattr-chefer": lambda m: fastattr.CheferRelevance(m),
        "pyhealth-deeplift": lambda m: ph.DeepLift(m, use_embeddings=True),
        "pyhealth-gim": lambda m: ph.GIM(m),
        "pyhealth-ig-gim": lambda m: ph.IntegratedGradientGIM(m, steps=EVAL_STEPS),
        "pyhealth-shap": lambda m: ph.ShapExplainer(m, use_embeddings=True, n_background_samples=8, max_coalitions=24),
        "pyhealth-lime": lambda m: ph.LimeExplainer(m, use_embeddings=True, n_samples=24),
    }


METHODS = ["pyhealth-ig", "fastattr-ig", "pyhealth-chefer", "fastattr-chefer", "pyhealth-deeplift", "pyhealth-gim",
           "pyhealth-ig-gim", "pyhealth-shap", "pyhealth-lime"]


def same_number(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= METRIC_ATOL


def both_classes(probs: torch.Tensor, classifier_type: str) -> torch.Tensor:
    """A custom sample filter that scores every sample: POSITIVE at >= 0.5, NEGATIVE (negated) below."""
    return torch.where(probs >= 0.5, 1, -1).long()


def compare_evaluate_attribution(model, loader, method_name: str, sample_filter=None) -> None:
    from pyhealth.metrics.interpretability import evaluate_attribution

    method = method_factories()[method_name](model)
    kwargs = dict(metrics=METRICS, percentages=PERCENTAGES, sample_filter=sample_filter)
    label = f"{method_name}{'' if sample_filter is None else ' (both classes)'}"
    theirs = timed(f"{label}: PyHealth evaluate_attribution", evaluate_attribution, model, loader, method, **kwargs)
    ours = timed(f"{label}: fastattr evaluate_attribution", fastattr.metrics.evaluate_attribution, model, loader,
                 method, **kwargs)
    report = {k: (theirs[k], ours[k], abs(theirs[k] - ours[k])) for k in METRICS}
    print(f"[mimic4 pipeline] {label}: (PyHealth, fastattr, |difference|) {report}")
    assert not all(math.isnan(theirs[k]) for k in METRICS), "no valid sample: the comparison tests nothing"
    assert all(same_number(theirs[k], ours[k]) for k in METRICS), report


@pytest.mark.parametrize("method_name", METHODS)
def test_evaluate_attribution_parity(pipeline, transformer, method_name):
    """The example's call: default filter, so only samples predicted positive are scored."""
    compare_evaluate_attribution(transformer, pipeline.test_loader, method_name)


@pytest.mark.parametrize("method_name", ["fastattr-ig", "fastattr-chefer", "pyhealth-deeplift"])
def test_evaluate_attribution_parity_every_sample(pipeline, transformer, method_name):
    compare_evaluate_attribution(transformer, pipeline.test_loader, method_name, sample_filter=both_classes)


def evaluate_differences(theirs_eval, ours_eval, batch, attributions, where: str) -> list[str]:
    """PyHealth's and fastattr's ``Evaluator.evaluate`` of one batch, per percentage and averaged: the failures."""
    failures = []
    theirs = theirs_eval.evaluate(batch, attributions, metrics=METRICS, return_per_percentage=True)
    ours = ours_eval.evaluate(batch, attributions, metrics=METRICS, return_per_percentage=True)
    for metric in METRICS:
        for pct in PERCENTAGES:
            diff = (ours[metric][pct].double() - theirs[metric][pct].double()).abs()
            if diff.max() > METRIC_ATOL:
                failures.append(f"{where} {metric} {pct}%: worst {diff.max():.3e} on "
                                f"{int((diff > METRIC_ATOL).sum())}/{diff.numel()} samples")
    theirs = theirs_eval.evaluate(batch, attributions, metrics=METRICS)
    ours = ours_eval.evaluate(batch, attributions, metrics=METRICS)
    for metric in METRICS:
        if not torch.equal(ours[metric][1].bool(), theirs[metric][1].bool()):
            failures.append(f"{where} {metric}: valid masks differ")
        diff = (ours[metric][0].double() - theirs[metric][0].double()).abs().max()
        if diff > METRIC_ATOL:
            failures.append(f"{where} {metric} averaged: worst {diff:.3e}")
    return failures


def per_batch_differences(model, loader, method) -> list[str]:
    """Each batch's attributions, scored by both evaluators under the default filter and under both_classes."""
    from pyhealth.metrics.interpretability import Evaluator

    pairs = {name: (Evaluator(model, percentages=PERCENTAGES, sample_filter=flt),
                    fastattr.metrics.Evaluator(model, percentages=PERCENTAGES, sample_filter=flt))
             for name, flt in (("default filter", None), ("both classes", both_classes))}
    failures = []
    for index, batch in enumerate(loader):
        attributions = method.attribute(**batch)
        for name, (theirs_eval, ours_eval) in pairs.items():
            failures += evaluate_differences(theirs_eval, ours_eval, batch, attributions, f"batch {index} {name}")
    return failures


@pytest.mark.parametrize("method_name", ["fastattr-ig", "pyhealth-chefer"])
def test_evaluator_per_batch_parity(pipeline, transformer, method_name):
    method = method_factories()[method_name](transformer)
    failures = timed(f"{method_name}: per-batch Evaluator.evaluate", per_batch_differences, transformer,
                     pipeline.test_loader, method)
    print(f"[mimic4 pipeline] {method_name} per batch: {failures or 'all within 1e-6'}")
    assert not failures, "\n".join(failures)


def test_stagenet_integrated_gradients_parity(pipeline, stagenet):
    from pyhealth.interpret.methods import IntegratedGradients

    timed("test IG parity (StageNet)", batch_parity, fastattr.IntegratedGradients, IntegratedGradients, stagenet,
          pipeline.test_loader)


@pytest.mark.parametrize("method_name", ["pyhealth-ig", "fastattr-ig"])
def test_stagenet_evaluate_attribution_parity(pipeline, stagenet, method_name):
    """Every sample scored (both_classes): the briefly trained StageNet predicts almost no positives, so the
    default filter would leave nothing to compare."""
    compare_evaluate_attribution(stagenet, pipeline.test_loader, method_name, sample_filter=both_classes)

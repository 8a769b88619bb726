"""Every method through ``attribute_dataset``: stored, resumed after an interruption with the same values,
and batched as its values require: batch-independent methods sorted by length with rows of their batch of
one; SHAP, LIME and RandomBaseline (values that depend on the batch) in the loader's batches, recorded.

Resumed runs equal uninterrupted ones bitwise, every method. SHAP's and LIME's fits solve here by the
repeatable solver (conftest.repeatable_lstsq): torch 2.13's own (``gelsy``, PyHealth's) moves with stale
memory (pytorch#187411), so there a redone SHAP batch equals its first attempt only to that solver's
repeatability (docs/cohorts.md), while the finished shards are kept byte for byte."""
import json

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open

from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.cohort.methods import METHODS, batch_dependent, build_interpreter
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort

OPTIONS = {"ig": {"steps": 3}, "shap": {"max_coalitions": 64}, "lime": {"n_samples": 32},
           "random": {"random_seed": 0}, "ig-gim": {"steps": 3}}
DEPENDENT = {"shap", "lime", "random"}
BATCH = 4


@pytest.fixture(scope="module")
def cohort():
    return SyntheticCohort(patients=11, seed=21, lengths="lognormal", median_codes=3, longest=6)


def loader(cohort, batch_size=BATCH):
    return torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=batch_size, shuffle=False,
                                       collate_fn=CohortDataset.collate)


def interrupt_after(monkeypatch, interpreter, calls):
    """``interpreter.attribute`` stops the run (as Ctrl-C) after ``calls`` batches."""
    inner, done = interpreter.attribute, []

    def attribute(**batch):
        if len(done) >= calls:
            raise KeyboardInterrupt("stopped")
        done.append(1)
        return inner(**batch)
    monkeypatch.setattr(interpreter, "attribute", attribute)


def same_stores(a, b):
    assert a.patient_ids == b.patient_ids and len(a) == len(b)
    for i in a:
        ra, rb = a[i], b[i]
        assert ra.keys() == rb.keys(), i
        for k in ra:
            assert torch.equal(ra[k], rb[k]), (i, k)


def test_every_method_is_in_the_table():
    assert set(METHODS) == {"ig", "chefer", "shap", "lime", "deeplift", "rollout", "random", "gim", "ig-gim"}


@pytest.mark.usefixtures("repeatable_lstsq")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_resumes_and_records_its_batching(tmp_path, cohort, monkeypatch, method):
    model = tiny_model(cohort)
    interpreter, call = build_interpreter(method, model, OPTIONS.get(method))
    assert batch_dependent(interpreter) == (method in DEPENDENT)
    attribute_dataset(interpreter, loader(cohort), tmp_path / "whole", progress=False, **call)
    interrupt_after(monkeypatch, interpreter, 1)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(interpreter, loader(cohort), tmp_path / "run", progress=False, **call)
    monkeypatch.undo()
    lines = (tmp_path / "run" / "manifest.rank0.jsonl").read_text().splitlines()[1:]
    kept = {entry["file"]: entry["sha256"] for entry in map(json.loads, lines)}
    assert len(kept) == 1
    attribute_dataset(interpreter, loader(cohort), tmp_path / "run", progress=False, **call)
    whole, resumed = load_attributions(tmp_path / "whole"), load_attributions(tmp_path / "run")
    assert all(resumed.shards[name]["sha256"] == sha for name, sha in kept.items()), "finished shards are kept"
    same_stores(whole, resumed)
    assert resumed.info["settings"] == whole.info["settings"] and resumed.info["method"] == type(interpreter).__name__
    batching = resumed.info["batching"]
    if method in DEPENDENT:
        check_loader_batches(resumed, interpreter, cohort, batching)
    else:
        check_batch_of_one_rows(resumed, interpreter, cohort, batching)


def check_loader_batches(store, interpreter, cohort, batching):
    """The loader's batches as given, recorded, and each row its batch's value."""
    assert batching["sorted"] is False and batching["batch_dependent"] is True and batching["batch_size"] == BATCH
    assert batching["order"] == "the loader's, as given" and "CohortDataset.collate" in batching["padding"]
    shards = list(store.shards.values())
    assert [s["positions"] for s in shards] == [list(range(i, min(i + BATCH, 11))) for i in range(0, 11, BATCH)]
    for shard, batch in zip(shards, loader(cohort), strict=True):
        expected = interpreter.attribute(**batch)["codes"]
        for row, position in enumerate(shard["positions"]):
            n = int((batch["codes"][row] != 0).sum())
            assert torch.equal(store[position]["attr/codes"], expected[row, :n]), position
        with safe_open(store.out / shard["file"], "pt") as f:  # the shard keeps its batch's padded width
            assert f.get_slice("attr/codes").get_shape() == list(batch["codes"].shape)


def check_batch_of_one_rows(store, interpreter, cohort, batching):
    """Sorted by length (the default), each row its batch of one's value."""
    assert batching["sorted"] is True and "batch_dependent" not in batching
    for i in range(11):
        alone = interpreter.attribute(**CohortDataset.collate([CohortDataset(cohort)[i]]))["codes"][0]
        torch.testing.assert_close(store[i]["attr/codes"], alone, rtol=1e-4, atol=1e-6)


def test_a_dependent_method_sorted_on_request_says_so(tmp_path, cohort):
    shap, _ = build_interpreter("shap", tiny_model(cohort), {"max_coalitions": 12})
    attribute_dataset(shap, loader(cohort), tmp_path, progress=False, sort_by_length=True)
    batching = load_attributions(tmp_path).info["batching"]
    assert batching["sorted"] is True and batching["batch_dependent"] is True and batching["batch_size"] == BATCH


def test_a_dependent_run_resumes_only_in_its_batches_and_settings(tmp_path, cohort, monkeypatch):
    model = tiny_model(cohort)
    lime, _ = build_interpreter("lime", model, {"n_samples": 12})
    interrupt_after(monkeypatch, lime, 1)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(lime, loader(cohort), tmp_path, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="loader's batches of 4 patients.*not 3"):
        attribute_dataset(lime, loader(cohort, batch_size=3), tmp_path, progress=False)
    other, _ = build_interpreter("lime", model, {"n_samples": 12, "random_seed": 7})
    with pytest.raises(ValueError, match="other LimeExplainer settings.*random_seed=42"):
        attribute_dataset(other, loader(cohort), tmp_path, progress=False)
    attribute_dataset(lime, loader(cohort), tmp_path, progress=False)
    assert len(load_attributions(tmp_path)) == 11


def test_options_a_method_does_not_take_are_refused(cohort):
    model = tiny_model(cohort)
    with pytest.raises(ValueError, match="method 'lime' does not take max_coalitions; it takes n_samples, random_seed"):
        build_interpreter("lime", model, {"max_coalitions": 5})
    with pytest.raises(ValueError, match="method 'rollout' does not take steps; it takes no options"):
        build_interpreter("rollout", model, {"steps": 5})
    with pytest.raises(ValueError, match="method must be one of"):
        build_interpreter("saliency", model)
    interpreter, call = build_interpreter("ig", model, {"steps": 4, "tolerance": None, "precision": "bf16"})
    assert interpreter.steps == 4 and call == {"precision": "bf16"}


def test_pyhealths_own_classes_and_declared_ones_count_as_batch_dependent():
    Shap, Lime = type("Shap", (), {}), type("Lime", (), {})  # PyHealth's ShapExplainer / LimeExplainer classes
    assert batch_dependent(Shap()) and batch_dependent(Lime()) and not batch_dependent(type("DeepLift", (), {})())
    assert batch_dependent(type("Mine", (), {"batch_dependent": True})())
    assert not batch_dependent(type("ShapExplainer", (), {"batch_dependent": False})())

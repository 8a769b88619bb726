"""attribute_dataset over a real PyHealth model and dataloader."""
import pytest
import torch

import fastattr

pytestmark = pytest.mark.parity


def test_pyhealth_dataloader_ids_targets_and_values(tmp_path):
    import pyhealth_cases
    from pyhealth.datasets import get_dataloader

    model, first = pyhealth_cases.build("seq", "Transformer", num_classes=3, n=11, batch=4, seed=7,
                                        embedding_dim=16, heads=2)
    loader = get_dataloader(model.dataset, batch_size=4, shuffle=False)
    ig = fastattr.IntegratedGradients(model, steps=4)
    fastattr.attribute_dataset(ig, loader, tmp_path, target_class_idx=2)
    store = fastattr.load_attributions(tmp_path)
    assert len(store) == 11 and store.patient_ids[:4] == [str(p) for p in first["patient_id"]]
    (one,) = store.lookup(first["patient_id"][1], first["visit_id"][1])
    direct = ig.attribute(target_class_idx=2, **first)["conditions"][1]
    got = one["attr/conditions"]  # the sample's own length; the batch's result is padded to its widest
    n = len(got)
    torch.testing.assert_close(got, direct[:n])
    assert not direct[n:].any() and (first["conditions"][1][:n] != 0).all()
    assert one["target"].item() == 2 and one["probability"].shape == (3,)
    assert store.info["batching"]["sorted"] is True


@pytest.mark.parametrize("batch_size", [1, 4])
def test_pyhealth_get_dataloader_is_sorted_by_default_and_matches_pyhealth(tmp_path, batch_size):
    # PyHealth's datasets are iterable (litdata) but indexable, and get_dataloader(shuffle=False)
    # says it iterates them in order: attribute_dataset sorts them by length, with no warning,
    # and every patient gets PyHealth's own attributions.
    import warnings

    import pyhealth_cases
    from pyhealth.datasets import get_dataloader
    from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

    model, _ = pyhealth_cases.build("seq", "Transformer", num_classes=3, n=13, batch=4, seed=9,
                                    embedding_dim=16, heads=2, num_layers=2)
    loader = get_dataloader(model.dataset, batch_size=batch_size, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fastattr.attribute_dataset(fastattr.CheferRelevance(model), loader, tmp_path, progress=False)
    store = fastattr.load_attributions(tmp_path)
    assert store.info["batching"]["sorted"] is True and len(store) == 13
    theirs = PyHealthChefer(model)
    for i, batch in enumerate(get_dataloader(model.dataset, batch_size=1, shuffle=False)):
        ref = theirs.attribute(**batch)
        for key, value in ref.items():
            got = store[i][f"attr/{key}"]
            torch.testing.assert_close(got[: value.shape[1]], value[0], rtol=1e-5, atol=1e-6)
            assert not got[value.shape[1]:].any()
    with pytest.warns(UserWarning, match="does not say it iterates in index order"):
        fastattr.attribute_dataset(fastattr.CheferRelevance(model), get_dataloader(model.dataset, batch_size=4,
                                                                                    shuffle=True),
                                   tmp_path / "shuffled", progress=False)


def test_pyhealth_runs_decode_codes_through_the_processors_vocab(tmp_path):
    """A run over a real PyHealth model stores its processors' code_vocab, and the long table's
    codes are those the processor mapped each input id from."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import pyhealth_cases
    from pyhealth.datasets import get_dataloader

    model, _ = pyhealth_cases.build("seq", "Transformer", num_classes=3, n=9, batch=4, seed=5,
                                    embedding_dim=16, heads=2)
    loader = get_dataloader(model.dataset, batch_size=4, shuffle=False)
    fastattr.attribute_dataset(fastattr.IntegratedGradients(model, steps=3), loader, tmp_path, progress=False)
    store = fastattr.load_attributions(tmp_path)
    frame = store.to_dataframe()
    key = model.feature_keys[0]
    vocab = model.dataset.input_processors[key].code_vocab
    names = {i: str(code) for code, i in vocab.items()}
    rows = frame[frame.feature == key]
    assert len(rows) > 0 and (rows["code"].astype(str) == rows["code_id"].map(names)).all()
    sample = 0
    for batch in loader:  # the ids the dataloader gave, not the stored ones
        value = batch[key][0] if isinstance(batch[key], tuple) else batch[key]
        for row in value:
            assert rows[rows["sample"] == sample]["code_id"].tolist() == row[row != 0].tolist()
            sample += 1
    assert sample == len(store)
    from fastattr.runs import tables

    summary = tables.summarize(tmp_path)
    assert set(summary.loc[summary.feature == key, "code"]) <= set(names.values()) and isinstance(summary, pd.DataFrame)


@pytest.mark.parametrize("name", ["DeepLift", "GIM", "AttentionRollout"])
def test_pyhealths_other_interpreters_run_through_the_cohort_runner_and_the_evaluator(tmp_path, name):
    """attribute_dataset and fastattr.metrics take any object with model and attribute(**batch)."""
    import pyhealth_cases
    from pyhealth.datasets import get_dataloader
    from pyhealth.interpret import methods

    import fastattr.metrics

    model, _ = pyhealth_cases.build("seq", "Transformer", num_classes=3, n=9, batch=3, seed=5,
                                    embedding_dim=16, heads=2)
    loader = get_dataloader(model.dataset, batch_size=3, shuffle=False)
    interpreter = getattr(methods, name)(model)
    fastattr.attribute_dataset(interpreter, loader, tmp_path / "run", progress=False)
    store = fastattr.load_attributions(tmp_path / "run")
    assert len(store) == 9 and torch.isfinite(store[0]["attr/conditions"]).all()
    scores = fastattr.metrics.Evaluator(model, progress=False).evaluate_attribution(loader, interpreter)
    assert set(scores) == {"comprehensiveness", "sufficiency"} and all(v == v for v in scores.values())

"""Bad input gets a clear error naming the argument, before any path forward runs."""
import numpy as np
import pytest
import torch
from conftest import own_model

import fastattr


@pytest.fixture
def counted():
    model, batch = own_model("transformer", seed=11)
    calls = {"n": 0}
    original = model.forward_from_embedding

    def counting(**kw):
        calls["n"] += 1
        return original(**kw)

    model.forward_from_embedding = counting
    return model, batch, calls


def attribute(model, **kw):
    return fastattr.IntegratedGradients(model).attribute(**kw)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), ValueError, "steps"),
    (dict(target_class_idx=3), ValueError, "out of range"),
    (dict(target_class_idx=-1), ValueError, "out of range"),
    (dict(target_class_idx=torch.tensor([0, 1])), ValueError, "one class per sample"),
    (dict(target_class_idx=torch.tensor([0.0, 1.0, 1.0, 0.0])), TypeError, "integers"),
    (dict(target_class_idx="1"), TypeError, "target_class_idx"),
    (dict(method="simpson"), ValueError, "method must be one of"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(internal_batch_size=0), ValueError, "internal_batch_size"),
    (dict(baseline={"codes": torch.ones(4, 11, dtype=torch.long)}), ValueError, "no entry for feature 'labs'"),
    (dict(baseline={"codes": torch.ones(4, 11, dtype=torch.long), "labs": torch.zeros(4, 2, 5)}), ValueError,
     "does not broadcast"),
    (dict(baseline={"codes": torch.ones(4, 11), "labs": torch.zeros(5)}), TypeError, "integer tensor"),
    (dict(baseline={"codes": torch.ones(4, 11, dtype=torch.long), "labs": torch.full((5,), float("nan"))}),
     ValueError, "NaN or Inf"),
    (dict(baseline=[1, 2]), TypeError, "baseline must be a dict"),
])
def test_bad_arguments(counted, kwargs, error, words):
    model, batch, calls = counted
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=words):
        attribute(model, **batch, **kwargs)
    # At most the one batch-sized forward that resolves the target (PyHealth runs it too).
    assert calls["n"] <= 1, "the error must come before any path forward"
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in model.named_parameters())


def test_nan_and_inf_inputs(counted):
    model, batch, calls = counted
    for bad in (float("nan"), float("inf")):
        labs = batch["labs"].clone()
        labs[1, 0, 2] = bad
        with pytest.raises(ValueError, match=r"batch\['labs'\] contains NaN or Inf"):
            attribute(model, **{**batch, "labs": labs})
    assert calls["n"] == 0


def test_empty_batch_and_missing_features(counted):
    model, batch, calls = counted
    with pytest.raises(ValueError, match="empty"):
        attribute(model, codes=batch["codes"][:0], labs=batch["labs"][:0])
    with pytest.raises(ValueError, match="none of the model's feature keys"):
        attribute(model, label=batch["label"], patient_id=batch["patient_id"])
    with pytest.raises(ValueError, match="batch size"):
        attribute(model, codes=batch["codes"], labs=batch["labs"][:3])
    assert calls["n"] == 0


@pytest.mark.parametrize("missing", ["forward_from_embedding", "get_embedding_model"])
def test_model_missing_protocol_method(missing):
    model, _ = own_model("mlp")
    setattr(model, missing, None)
    with pytest.raises(TypeError, match=f"model.{missing}"):
        fastattr.IntegratedGradients(model)


def test_model_without_feature_protocol():
    with pytest.raises(TypeError, match="feature_keys"):
        fastattr.IntegratedGradients(torch.nn.Linear(2, 2))
    model, _ = own_model("mlp")
    model.dataset.input_processors.pop("labs")
    with pytest.raises(TypeError, match="no processor for feature 'labs'"):
        fastattr.IntegratedGradients(model)


def test_constructor_checks_steps_and_backend():
    model, _ = own_model("mlp")
    with pytest.raises(ValueError, match="steps"):
        fastattr.IntegratedGradients(model, steps=0)
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton"):
        fastattr.IntegratedGradients(model, backend="gpu")


def test_environment_backend_is_validated(monkeypatch):
    model, batch = own_model("mlp")
    monkeypatch.setenv("FASTATTR_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTATTR_BACKEND"):
        fastattr.IntegratedGradients(model).attribute(**batch)


def test_model_is_put_in_eval_mode():
    model, _ = own_model("transformer")
    model.train()
    fastattr.IntegratedGradients(model)
    assert not model.training


@pytest.mark.parametrize("target", [np.int64(2), np.int32(2), torch.tensor(2), [2, 2, 2, 2], (2, 2, 2, 2),
                                    np.array([2, 2, 2, 2]), torch.tensor([2, 2, 2, 2], dtype=torch.int32)])
def test_integer_like_targets_are_accepted(target):
    model, batch = own_model("transformer", num_classes=3, seed=21)
    ig = fastattr.IntegratedGradients(model, steps=4)
    ref = ig.attribute(target_class_idx=2, **batch)
    got = ig.attribute(target_class_idx=target, **batch)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])
    chefer = fastattr.CheferRelevance(model)
    ref = chefer.attribute(target_class_idx=2, **batch)
    got = chefer.attribute(target_class_idx=target, **batch)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])


@pytest.mark.parametrize("target, error, match", [
    (True, TypeError, "bool"), (np.bool_(True), TypeError, "bool"), (1.0, TypeError, "target_class_idx"),
    (np.float32(1), TypeError, "target_class_idx"), ([1.0, 1.0, 1.0, 1.0], TypeError, "integer"),
    ([True, False, True, False], TypeError, "integer"), (np.int64(3), ValueError, "out of range"),
    ([[1, 1], [1, 1]], ValueError, "1-D"),
])
def test_non_integer_or_out_of_range_targets_are_refused(target, error, match):
    model, batch = own_model("transformer", num_classes=3, seed=22)
    with pytest.raises(error, match=match):
        fastattr.IntegratedGradients(model, steps=2).attribute(target_class_idx=target, **batch)
    with pytest.raises(error, match=match):
        fastattr.CheferRelevance(model).attribute(target_class_idx=target, **batch)


@pytest.mark.parametrize("method", ["ig", "chefer"])
def test_pyhealth_2_0s_class_index_warns_and_explains_the_argmax(method):
    model, batch = own_model("transformer", num_classes=3)
    interpreter = fastattr.IntegratedGradients(model, steps=3) if method == "ig" else fastattr.CheferRelevance(model)
    plain = interpreter.attribute(**batch)
    with pytest.warns(UserWarning, match="class_index is PyHealth 2.0's name.*target_class_idx"):
        renamed = interpreter.attribute(**batch, class_index=1)
    for key in plain:
        torch.testing.assert_close(renamed[key], plain[key])

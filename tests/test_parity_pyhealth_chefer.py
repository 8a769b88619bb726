"""fastattr.CheferRelevance against the real PyHealth 2.1.0 CheferRelevance."""
import functools

import pytest
import torch
from conftest import rel_err

import fastattr
from fastattr.interpret.attention.chefer import detect_row_picks

pytestmark = pytest.mark.parity

CONFIGS = {
    "transformer-1L1H-binary-seq": ("seq", "Transformer", 2, dict(num_layers=1, heads=1, embedding_dim=32)),
    "transformer-2L2H-multiclass-seq": ("seq", "Transformer", 4, dict(num_layers=2, heads=2, embedding_dim=32)),
    "transformer-4L4H-binary-nested": ("nested", "Transformer", 2, dict(num_layers=4, heads=4, embedding_dim=32)),
    "transformer-3L4H-multiclass-nested": ("nested", "Transformer", 3, dict(num_layers=3, heads=4, embedding_dim=16)),
    # a tensor feature is one token to the Transformer: its relevance stays [B, 1]
    "transformer-2L2H-binary-seq-tensor": ("seq_tensor", "Transformer", 2,
                                           dict(num_layers=2, heads=2, embedding_dim=32)),
    "transformer-1L2H-multiclass-seq-tensor": ("seq_tensor", "Transformer", 3,
                                               dict(num_layers=1, heads=2, embedding_dim=16)),
    "stageattentionnet-binary": ("stagenet", "StageAttentionNet", 2, dict(embedding_dim=32)),
    "stageattentionnet-multiclass": ("stagenet", "StageAttentionNet", 3, dict(embedding_dim=32)),
}


@functools.lru_cache(maxsize=None)
def case(name):
    import pyhealth_cases

    kind, model_name, classes, kwargs = CONFIGS[name]
    return pyhealth_cases.build(kind, model_name, num_classes=classes, seed=len(name) + 1, **kwargs)


def compare(name, target=None, backend=None):
    from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

    model, batch = case(name)
    theirs = PyHealthChefer(model).attribute(target_class_idx=target, **batch)
    model.zero_grad(set_to_none=True)
    ours = fastattr.CheferRelevance(model).attribute(target_class_idx=target, backend=backend, **batch)
    assert set(ours) == set(theirs)
    for key in theirs:
        ref = theirs[key].detach().double()
        got = ours[key].double()
        assert got.shape == ref.shape, key
        assert ref.abs().max() > 0
        err = rel_err(got, ref)
        assert err <= 1e-5, f"{key}: relative error {err:.2e}"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("path", ["rows", "full"])
def test_default_target(name, path, monkeypatch):
    # both ways to R's rows: picked rows (large maps) and the whole R reduced by the model (small ones)
    from fastattr.core import relevance

    monkeypatch.setitem(relevance.FULL_PATH_FLOPS, "cpu", 0.0 if path == "rows" else float("inf"))
    compare(name)


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-4L4H-binary-nested",
                                  "stageattentionnet-multiclass"])
def test_triton_backend(name):
    compare(name, backend="triton")


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c[2] > 2])
def test_target_class_idx(name):
    compare(name, target=0)
    compare(name, target=CONFIGS[name][2] - 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pyhealth_reductions_are_detected_as_row_picks(name):
    model, batch = case(name)
    chefer = fastattr.CheferRelevance(model)
    chefer.attribute(**batch)
    layers = model.get_attention_layers()
    tokens = {k: v[0][0].shape[-1] for k, v in layers.items()}
    picks = detect_row_picks(model, tokens, len(batch["label"]), batch, torch.device("cpu"))
    assert picks is not None, "PyHealth's CLS-row / last-visit reductions are row picks"
    if "transformer" in name:
        assert all(bool((rows == 0).all()) for rows, _ in picks.values())


def fresh(name):
    import pyhealth_cases

    kind, model_name, classes, kwargs = CONFIGS[name]
    return pyhealth_cases.build(kind, model_name, num_classes=classes, seed=len(name) + 1, **kwargs)


def assert_matches(theirs, ours):
    for key in theirs:
        ref, got = theirs[key].detach().double(), ours[key].double()
        err = rel_err(got, ref)
        assert err <= 1e-5, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("frozen", [("conditions",), ("conditions", "procedures")])
@pytest.mark.parametrize("pyhealth_first", [False, True])
def test_frozen_embeddings(frozen, pyhealth_first):
    # Users keep pretrained code embeddings fixed; the backward must still reach every attention
    # map, and gradients PyHealth left on the maps of a same-shaped batch must never be reused.
    from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

    model, batch = fresh("transformer-2L2H-multiclass-seq")
    for key in frozen:
        for p in model.embedding_model.embedding_layers[key].parameters():
            p.requires_grad_(False)
    if pyhealth_first:
        theirs = PyHealthChefer(model).attribute(**batch)
        ours = fastattr.CheferRelevance(model).attribute(**batch)
    else:
        ours = fastattr.CheferRelevance(model).attribute(**batch)
        theirs = PyHealthChefer(model).attribute(**batch)
    assert_matches(theirs, ours)
    model.zero_grad(set_to_none=True)
    fastattr.CheferRelevance(model).attribute(**batch)
    assert all(p.grad is None for p in model.parameters())


def test_numpy_integer_target():
    import numpy as np
    from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

    model, batch = case("transformer-2L2H-multiclass-seq")
    theirs = PyHealthChefer(model).attribute(target_class_idx=np.int64(3), **batch)
    assert_matches(theirs, fastattr.CheferRelevance(model).attribute(target_class_idx=np.int64(3), **batch))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_length_packing_keeps_parity(name, monkeypatch, recwarn):
    """Every distinct length in its own group (groups made free): PyHealth's numbers still, equal
    to the padded batch's. PyHealth's Transformer masks its padding, so its batches really run in
    several trimmed groups; StageAttentionNet, called as Chefer calls it (no mask given), takes
    its mask from the embedded values, and a padded row of a continuous feature embeds to the
    linear layer's bias: that padding counts, and the check must say so and run it padded."""
    from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

    from fastattr.core import packing

    monkeypatch.setitem(packing.GROUP_COST["chefer"], "cpu", 0.0)
    monkeypatch.setitem(packing.CHECK_ROWS, "chefer", 0.0)
    model, batch = case(name)
    theirs = PyHealthChefer(model).attribute(**batch)
    model.zero_grad(set_to_none=True)
    chefer = fastattr.CheferRelevance(model)
    ours = chefer.attribute(**batch)
    groups = chefer.last_groups
    padded = chefer.attribute(pack_lengths=False, **batch)
    assert_matches(theirs, ours)
    for key in ours:
        assert ours[key].shape == theirs[key].shape
        assert rel_err(ours[key], padded[key]) <= 1e-6
    warned = [str(w.message) for w in recwarn if "depends on the padding of" in str(w.message)]
    print(name, "groups:", groups, "padding-dependent:", warned)
    if "transformer" in name:
        assert not warned and len(groups) > 1
    else:
        assert warned and groups == [(len(batch["label"]), None)]

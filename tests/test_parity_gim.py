"""fastattr's GIM and IntegratedGradientGIM against the real PyHealth 2.1.0 classes.

Both sides are built with the same arguments on the same real PyHealth model and called on the same batch
(``tests/pyhealth_cases.py``). Compared per feature key: the key sets and their order, shapes, dtypes and
devices exactly, and the values to ``rel_err(got, ref) <= 1e-4`` (conftest); every reference is checked to be
non-trivial.

Cases: Transformer binary / multiclass / multilabel on flat sequences and binary / multiclass on nested ones
(GIM's attention and LayerNorm rules apply), MLP with token + continuous tensor features and with a tensor
feature alone, StageNet and StageAttentionNet on (time, value) tuples (no module to swap: plain gradients);
PyHealth's defaults, temperatures 1, 3 and 0.5 (clamped to 1), a custom baseline, ``target_class_idx``, a
batch of one, one patient 5x longer than the rest (fastattr's IG-GIM then runs in length groups: checked),
``steps`` in the call, ``__call__``; the model's modules restored afterwards; the same exception type (or a
subclass) wherever PyHealth raises (RNN, no Interpretable; a Transformer over a continuous tensor feature; a
baseline missing a key; ``get_embedding_model()`` returning None); and fastattr's refusals of options outside
their domain at construction.
"""
import pytest
from conftest import raises_like_pyhealth
from pyhealth_cases import (
    MULTICLASS,
    PROTOCOL,
    Method,
    assert_parity,
    bad_call,
    case,
    custom_baseline,
    named,
    with_long_patient,
)

from fastattr.interpret.gradient.gim import GIM
from fastattr.interpret.gradient.ig_gim import IntegratedGradientGIM

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

STEPS = 8  # PyHealth's step loop is the cost of these tests; the rule is the same at any step count

# models PyHealth cannot explain: (kind, model, classes, model kwargs, where it raises)
FAILING = {
    "rnn": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), "init"),
    "transformer-seq+tensor": ("seq_tensor", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16),
                               "attribute"),
}
METHODS = {"gim": Method(GIM, "GIM"),
           "ig_gim": Method(IntegratedGradientGIM, "IntegratedGradientGIM", dict(steps=STEPS))}


def theirs(cls_name):
    return METHODS[cls_name].theirs()


def ours(cls_name):
    return METHODS[cls_name].ours


def same(got, ref):
    # a gradient may be constant along a key (an MLP's mean pooling), but not along all of them
    assert_parity(got, ref, constant_ok=True)


def check(cls_name, model, batch, init=None, **call):
    same(*METHODS[cls_name].run_both(model, batch, init, **call))


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", list(PROTOCOL))
def test_default(name, cls_name):
    model, batch = case(name)
    check(cls_name, model, batch)


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-2L2H-binary-nested"])
def test_temperature(name, temperature, cls_name):
    model, batch = case(name)
    check(cls_name, model, batch, dict(temperature=temperature))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_custom_baseline(name):
    model, batch = case(name)
    check("ig_gim", model, batch, baseline=custom_baseline(model, batch))


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", MULTICLASS)
def test_target_class_idx(name, cls_name):
    model, batch = case(name)
    check(cls_name, model, batch, target_class_idx=1)


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", ["transformer-1L1H-binary-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_batch_of_one(name, cls_name):
    model, batch = case(name, batch=1)
    assert len(batch["patient_id"]) == 1
    check(cls_name, model, batch)


@pytest.mark.parametrize("pack_lengths", ["auto", False])
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-1L2H-multilabel-seq"])
def test_unequal_lengths(name, pack_lengths):
    model, batch = case(name)
    batch = with_long_patient(with_long_patient(batch, "conditions"), "procedures")
    ref = theirs("ig_gim")(model, steps=20).attribute(**batch)
    explainer = IntegratedGradientGIM(model, steps=20, pack_lengths=pack_lengths)
    same(explainer.attribute(**batch), ref)
    groups = [sizes for _, sizes in explainer.last_groups]
    assert (len(groups) > 1) == (pack_lengths == "auto"), explainer.last_groups
    for key in ref:
        pad = batch[key] == 0
        assert bool((ref[key][pad] == 0).all()), key


def test_steps_in_call_and_callable():
    model, batch = case("transformer-2L2H-multiclass-seq")
    ref = theirs("ig_gim")(model, steps=50).attribute(steps=5, target_class_idx=2, **batch)
    same(IntegratedGradientGIM(model)(steps=5, target_class_idx=2, **batch), ref)
    same(GIM(model)(target_class_idx=2, **batch), theirs("gim")(model)(target_class_idx=2, **batch))


def test_pyhealth_defaults():
    model, _ = case("transformer-1L1H-binary-seq")
    for cls_name in ("gim", "ig_gim"):
        ref, got = theirs(cls_name)(model), ours(cls_name)(model)
        for attr in ("temperature", "steps") if cls_name == "ig_gim" else ("temperature",):
            assert getattr(got, attr) == getattr(ref, attr), (cls_name, attr)
    assert ours("gim")(model, temperature=0.5).temperature == theirs("gim")(model, temperature=0.5).temperature == 1.0


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
def test_model_restored(cls_name):
    model, batch = case("transformer-2L2H-multiclass-seq")
    modules = dict(model.named_modules())
    ours(cls_name)(model, **METHODS[cls_name].init).attribute(**batch)
    after = dict(model.named_modules())
    assert list(after) == list(modules) and all(after[k] is modules[k] for k in modules)


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", list(FAILING))
def test_same_errors_as_pyhealth(name, cls_name):
    kind, model_name, classes, model_kwargs, where = FAILING[name]
    model, batch = named(name, kind, model_name, classes, model_kwargs)
    init = METHODS[cls_name].init
    if where == "init":
        raises_like_pyhealth(lambda: theirs(cls_name)(model, **init), lambda: ours(cls_name)(model, **init))
        return
    raises_like_pyhealth(lambda: theirs(cls_name)(model, **init).attribute(**batch),
                         lambda: ours(cls_name)(model, **init).attribute(**batch))


@pytest.mark.parametrize("variant", ["baseline-missing-a-key", "no-embedding-model"])
def test_bad_call_raises_like_pyhealth(variant):
    model, batch = case("transformer-2L2H-multiclass-seq")
    call = bad_call(variant, model, batch) if variant == "baseline-missing-a-key" else {}
    patched = None
    sides = {}
    for side in ("theirs", "ours"):
        explainer = (theirs if side == "theirs" else ours)("ig_gim")(model, steps=2)
        if variant == "no-embedding-model":
            patched = model.get_embedding_model
            model.get_embedding_model = lambda: None
        try:
            with pytest.raises(Exception) as error:
                explainer.attribute(**call, **batch)
        finally:
            if patched is not None:
                del model.get_embedding_model
        sides[side] = error.type
    assert issubclass(sides["ours"], sides["theirs"]), sides


@pytest.mark.parametrize("option", [dict(temperature=float("nan")), dict(temperature=float("inf")),
                                    dict(temperature="hot"), dict(temperature=None), dict(steps=0), dict(steps=-3),
                                    dict(steps=2.5)])
def test_options_outside_their_domain_refused_at_construction(option):
    model, _ = case("transformer-1L1H-binary-seq")
    with pytest.raises(ValueError, match=next(iter(option))):
        IntegratedGradientGIM(model, **option)
    if "temperature" in option:
        with pytest.raises(ValueError, match="temperature"):
            GIM(model, **option)

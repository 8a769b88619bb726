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
import functools

import pytest
import torch
from conftest import rel_err

from fastattr.interpret.gradient.gim import GIM
from fastattr.interpret.gradient.ig_gim import IntegratedGradientGIM

pytestmark = pytest.mark.parity

TOL = 1e-4
STEPS = 8  # PyHealth's step loop is the cost of these tests; the rule is the same at any step count

CONFIGS = {
    "transformer-1L1H-binary-seq": ("seq", "Transformer", 2, dict(num_layers=1, heads=1, embedding_dim=16), {}),
    "transformer-2L2H-multiclass-seq": ("seq", "Transformer", 4, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-1L2H-multilabel-seq": ("seq", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16),
                                        dict(mode="multilabel")),
    "transformer-2L2H-binary-nested": ("nested", "Transformer", 2, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-1L1H-multiclass-nested": ("nested", "Transformer", 3, dict(num_layers=1, heads=1, embedding_dim=16),
                                           {}),
    "mlp-seq+tensor": ("mlp", "MLP", 3, dict(embedding_dim=16, hidden_dim=16), {}),
    "mlp-tensor-only": ("tensor_only", "MLP", 2, dict(embedding_dim=16, hidden_dim=16), {}),
    "stagenet": ("stagenet", "StageNet", 3, dict(embedding_dim=16, chunk_size=16, levels=2), dict(batch=3)),
    "stageattentionnet": ("stagenet", "StageAttentionNet", 2, dict(embedding_dim=16, chunk_size=16, levels=2),
                          dict(batch=3)),
}
TRANSFORMERS = [n for n in CONFIGS if n.startswith("transformer")]
MULTICLASS = [n for n, c in CONFIGS.items() if c[2] > 2]
# models PyHealth cannot explain: (kind, model, classes, model kwargs, where it raises)
FAILING = {
    "rnn": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), "init"),
    "transformer-seq+tensor": ("seq_tensor", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16),
                               "attribute"),
}


@functools.lru_cache(maxsize=None)
def built(kind, model_name, classes, model_kwargs, build_kwargs, seed):
    import pyhealth_cases

    return pyhealth_cases.build(kind, model_name, num_classes=classes, seed=seed, **dict(model_kwargs),
                                **dict(build_kwargs))


def case(name, batch=None):
    kind, model_name, classes, model_kwargs, build_kwargs = CONFIGS[name]
    build_kwargs = dict(build_kwargs, **({"batch": batch} if batch else {}))
    return built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), tuple(sorted(build_kwargs.items())),
                 len(name))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the models are tiny, and on a loaded 2-core machine OpenMP spin-waits. Both sides
    run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def theirs(cls_name):
    from pyhealth.interpret.methods.gim import GIM as TheirGIM
    from pyhealth.interpret.methods.ig_gim import IntegratedGradientGIM as TheirIGGIM

    return TheirGIM if cls_name == "gim" else TheirIGGIM


def ours(cls_name):
    return GIM if cls_name == "gim" else IntegratedGradientGIM


def default_init(cls_name):
    return {} if cls_name == "gim" else dict(steps=STEPS)


def assert_parity(got_all, ref_all):
    assert list(got_all) == list(ref_all)
    # a gradient may be constant along a key (an MLP's mean pooling), but not along all of them
    assert any(bool(ref.max() > ref.min()) for ref in ref_all.values()), "every reference attribution is constant"
    for key, ref in ref_all.items():
        got = got_all[key]
        assert got.shape == ref.shape, f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{key}: dtype {got.dtype} != {ref.dtype}"
        assert got.device == ref.device, key
        assert not got.requires_grad, key
        assert ref.abs().max() > 0, f"{key}: reference attribution is zero"
        err = rel_err(got, ref)
        assert err <= TOL, f"{key}: relative error {err:.2e}"


def run_both(cls_name, model, batch, init=None, **call):
    init = dict(default_init(cls_name), **(init or {}))
    ref = theirs(cls_name)(model, **init).attribute(**call, **batch)
    got = ours(cls_name)(model, **init).attribute(**call, **batch)
    return got, ref


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_default(name, cls_name):
    model, batch = case(name)
    assert_parity(*run_both(cls_name, model, batch))


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-2L2H-binary-nested"])
def test_temperature(name, temperature, cls_name):
    model, batch = case(name)
    assert_parity(*run_both(cls_name, model, batch, dict(temperature=temperature)))


def custom_baseline(model, batch):
    """A real code (id 2) for token features, 0.3 for continuous ones; "label" rides along (ignored)."""
    out = {"label": torch.zeros(3)}
    for key in model.feature_keys:
        feature = batch[key]
        value = feature if isinstance(feature, torch.Tensor) else \
            feature[model.dataset.input_processors[key].schema().index("value")]
        out[key] = torch.full_like(value, 2) if model.dataset.input_processors[key].is_token() \
            else torch.full_like(value, 0.3)
    return out


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_custom_baseline(name):
    model, batch = case(name)
    assert_parity(*run_both("ig_gim", model, batch, baseline=custom_baseline(model, batch)))


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", MULTICLASS)
def test_target_class_idx(name, cls_name):
    model, batch = case(name)
    assert_parity(*run_both(cls_name, model, batch, target_class_idx=1))


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", ["transformer-1L1H-binary-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_batch_of_one(name, cls_name):
    model, batch = case(name, batch=1)
    assert len(batch["patient_id"]) == 1
    assert_parity(*run_both(cls_name, model, batch))


def with_long_patient(batch, key):
    """Patient 0's codes of ``key`` tiled to 5x the others' longest, right-padded with 0 as PyHealth's collate."""
    rows = [v[v != 0] for v in batch[key]]
    long = 5 * max(len(r) for r in rows[1:])
    rows[0] = rows[0].repeat(-(-long // len(rows[0])))[:long]
    out = torch.zeros(len(rows), long, dtype=batch[key].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return {**batch, key: out}


@pytest.mark.parametrize("pack_lengths", ["auto", False])
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "transformer-1L2H-multilabel-seq"])
def test_unequal_lengths(name, pack_lengths):
    model, batch = case(name)
    batch = with_long_patient(with_long_patient(batch, "conditions"), "procedures")
    ref = theirs("ig_gim")(model, steps=20).attribute(**batch)
    explainer = IntegratedGradientGIM(model, steps=20, pack_lengths=pack_lengths)
    assert_parity(explainer.attribute(**batch), ref)
    groups = [sizes for _, sizes in explainer.last_groups]
    assert (len(groups) > 1) == (pack_lengths == "auto"), explainer.last_groups
    for key in ref:
        pad = batch[key] == 0
        assert bool((ref[key][pad] == 0).all()), key


def test_steps_in_call_and_callable():
    model, batch = case("transformer-2L2H-multiclass-seq")
    ref = theirs("ig_gim")(model, steps=50).attribute(steps=5, target_class_idx=2, **batch)
    assert_parity(IntegratedGradientGIM(model)(steps=5, target_class_idx=2, **batch), ref)
    assert_parity(GIM(model)(target_class_idx=2, **batch), theirs("gim")(model)(target_class_idx=2, **batch))


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
    ours(cls_name)(model, **default_init(cls_name)).attribute(**batch)
    after = dict(model.named_modules())
    assert list(after) == list(modules) and all(after[k] is modules[k] for k in modules)


@pytest.mark.parametrize("cls_name", ["gim", "ig_gim"])
@pytest.mark.parametrize("name", list(FAILING))
def test_same_errors_as_pyhealth(name, cls_name):
    kind, model_name, classes, model_kwargs, where = FAILING[name]
    model, batch = built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), (), len(name))
    init = default_init(cls_name)
    if where == "init":
        with pytest.raises(Exception) as pyhealth_error:
            theirs(cls_name)(model, **init)
        with pytest.raises(pyhealth_error.type):
            ours(cls_name)(model, **init)
        return
    with pytest.raises(Exception) as pyhealth_error:
        theirs(cls_name)(model, **init).attribute(**batch)
    with pytest.raises(pyhealth_error.type):
        ours(cls_name)(model, **init).attribute(**batch)


@pytest.mark.parametrize("variant", ["baseline-missing-a-key", "no-embedding-model"])
def test_bad_call_raises_like_pyhealth(variant):
    model, batch = case("transformer-2L2H-multiclass-seq")
    call, patched = {}, None
    if variant == "baseline-missing-a-key":
        base = custom_baseline(model, batch)
        del base["procedures"]
        call = dict(baseline=base)
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

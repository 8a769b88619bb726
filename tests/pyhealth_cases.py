"""Real PyHealth 2.1.0 datasets, models and batches for the parity tests, and what the parity modules share:
the named model configurations and their cached builds, baselines and batch variants, the per-key comparison
with PyHealth's answer, an interpreter pair run on the same arguments, and the checks PyHealth's two sampling
explainers (LIME and SHAP) share."""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from conftest import raises_like_pyhealth, rel_err

SCHEMAS = {
    "seq": {"conditions": "sequence", "procedures": "sequence"},
    "nested": {"visits": "nested_sequence", "procedures": "sequence"},
    "mlp": {"conditions": "sequence", "labs": "tensor"},
    "seq_tensor": {"conditions": "sequence", "labs": "tensor"},
    "tensor_only": {"labs": "tensor"},
    "stagenet": {"codes": "stagenet", "vitals": "stagenet_tensor"},
}


def _label(rng: random.Random, i: int, num_classes: int, mode: str):
    if mode == "multilabel":
        return [f"l{c}" for c in rng.sample(range(num_classes), rng.randint(1, num_classes))]
    return rng.randrange(num_classes) if mode == "multiclass" else i % 2


def _sample(kind: str, rng: random.Random, i: int, num_classes: int, mode: str) -> dict:
    def codes(prefix: str, lo: int, hi: int) -> list[str]:
        return [f"{prefix}{rng.randrange(30)}" for _ in range(rng.randint(lo, hi))]

    sample = {"patient_id": f"p{i}", "visit_id": f"v{i}", "label": _label(rng, i, num_classes, mode)}
    if kind == "seq":
        sample.update(conditions=codes("c", 2, 9), procedures=codes("p", 1, 5))
    elif kind == "nested":
        sample.update(visits=[codes("d", 1, 4) for _ in range(rng.randint(1, 4))], procedures=codes("p", 1, 6))
    elif kind in ("mlp", "tensor_only", "seq_tensor"):
        sample["labs"] = [rng.uniform(-2, 2) for _ in range(6 if kind == "seq_tensor" else 5)]
        if kind != "tensor_only":
            sample["conditions"] = codes("c", 2, 8)
    elif kind == "stagenet":
        n = rng.randint(2, 6)
        times = sorted(rng.uniform(0, 10) for _ in range(n))
        sample["codes"] = (times, [codes("s", 1, 3) for _ in range(n)])
        m = rng.randint(2, 5)
        sample["vitals"] = ([float(t) for t in range(m)], [[rng.uniform(-1, 1) for _ in range(4)] for _ in range(m)])
    return sample


def build(kind: str, model_name: str, num_classes: int = 2, n: int = 12, batch: int = 5, seed: int = 0, **model_kwargs):
    """Return (model, batch) for a PyHealth model on a small random dataset of ``kind``."""
    model, loader = build_loader(kind, model_name, num_classes, n, batch, seed, **model_kwargs)
    return model, next(iter(loader))


def build_loader(kind: str, model_name: str, num_classes: int = 2, n: int = 12, batch: int = 5, seed: int = 0,
                 mode: str | None = None, **model_kwargs):
    """Return (model, PyHealth dataloader) on a small random dataset of ``kind``; ``mode``: the label
    kind (default binary for 2 classes, else multiclass; or "multilabel")."""
    import pyhealth.models as models
    from pyhealth.datasets import create_sample_dataset, get_dataloader
    from pyhealth.models.stagenet_mha import StageAttentionNet

    rng = random.Random(seed)
    mode = mode or ("binary" if num_classes == 2 else "multiclass")
    samples = [_sample(kind, rng, i, num_classes, mode) for i in range(n)]
    output = {"label": mode}
    dataset = create_sample_dataset(samples=samples, input_schema=SCHEMAS[kind], output_schema=output,
                                    dataset_name=f"{kind}-{seed}")
    torch.manual_seed(seed)
    cls = StageAttentionNet if model_name == "StageAttentionNet" else getattr(models, model_name)
    model = cls(dataset=dataset, **model_kwargs)
    # Random, untrained weights give small logits; scale so attributions are not near zero.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    model.eval()
    return model, get_dataloader(dataset, batch_size=batch, shuffle=False)


# -- the named configurations ---------------------------------------------------------------------------------
TOL = 1e-4  # every parity module's tolerance: rel_err(got, ref) (conftest) per feature key
USE_EMBEDDINGS = pytest.mark.parametrize("use_embeddings", [True, False], ids=["embeddings", "no-embeddings"])

# name: (builder kind, PyHealth model, classes, model kwargs, extra build kwargs); a case's seed is len(name)
CASES = {
    "transformer-1L1H-binary-seq": ("seq", "Transformer", 2, dict(num_layers=1, heads=1, embedding_dim=16), {}),
    "transformer-2L2H-binary-seq": ("seq", "Transformer", 2, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-2L2H-multiclass-seq": ("seq", "Transformer", 4, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-3L4H-multiclass-seq": ("seq", "Transformer", 4, dict(num_layers=3, heads=4, embedding_dim=16), {}),
    "transformer-1L1H-multilabel-seq": ("seq", "Transformer", 3, dict(num_layers=1, heads=1, embedding_dim=16),
                                        dict(mode="multilabel")),
    "transformer-1L2H-multilabel-seq": ("seq", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16),
                                        dict(mode="multilabel")),
    "transformer-2L2H-binary-nested": ("nested", "Transformer", 2, dict(num_layers=2, heads=2, embedding_dim=16), {}),
    "transformer-1L1H-multiclass-nested": ("nested", "Transformer", 3, dict(num_layers=1, heads=1, embedding_dim=16),
                                           {}),
    "transformer-1L2H-multiclass-nested": ("nested", "Transformer", 3, dict(num_layers=1, heads=2, embedding_dim=16),
                                           {}),
    "mlp-seq+tensor": ("mlp", "MLP", 3, dict(embedding_dim=16, hidden_dim=16), {}),
    "mlp-tensor-only": ("tensor_only", "MLP", 2, dict(embedding_dim=16, hidden_dim=16), {}),
    "stagenet": ("stagenet", "StageNet", 3, dict(embedding_dim=16, chunk_size=16, levels=2), dict(batch=3)),
    "stageattentionnet": ("stagenet", "StageAttentionNet", 2, dict(embedding_dim=16, chunk_size=16, levels=2),
                          dict(batch=3)),
}
# the protocol models every gradient and sampling parity module runs (a module may swap or add rows of CASES)
PROTOCOL = ("transformer-1L1H-binary-seq", "transformer-2L2H-multiclass-seq", "transformer-1L2H-multilabel-seq",
            "transformer-2L2H-binary-nested", "transformer-1L1H-multiclass-nested", "mlp-seq+tensor",
            "mlp-tensor-only", "stagenet", "stageattentionnet")
MULTICLASS = [name for name in PROTOCOL if CASES[name][2] > 2]  # more than one logit


def configs(*names: str) -> dict:
    """The rows of ``CASES`` named, in that order: a module's table of configurations."""
    return {name: CASES[name] for name in names}



@functools.lru_cache(maxsize=None)
def built(kind, model_name, classes, model_kwargs, build_kwargs, seed):
    """:func:`build` cached on hashable arguments (the kwargs as sorted item tuples): each model is built once."""
    return build(kind, model_name, num_classes=classes, seed=seed, **dict(model_kwargs), **dict(build_kwargs))


def named(name, kind, model_name, classes, model_kwargs, build_kwargs=None, batch=None):
    """(model, batch) of one configuration under ``name`` (seed ``len(name)``); ``batch``: another batch size."""
    build_kwargs = dict(build_kwargs or {}, **({"batch": batch} if batch else {}))
    return built(kind, model_name, classes, tuple(sorted(model_kwargs.items())), tuple(sorted(build_kwargs.items())),
                 len(name))


def case(name, batch=None):
    """(model, batch) of ``CASES[name]``; ``batch``: another batch size (same data, same weights)."""
    return named(name, *CASES[name], batch=batch)


# -- baselines and batch variants -------------------------------------------------------------------------------
def value_of(model, batch, key):
    """The value tensor of feature ``key`` in ``batch`` (the feature itself, or its processor's "value" slot)."""
    feature = batch[key]
    return feature if isinstance(feature, torch.Tensor) else feature[model.dataset.input_processors[key].schema()
                                                                      .index("value")]


def custom_baseline(model, batch, broadcast=False):
    """A real code (id 2) for token features, 0.3 for continuous ones; ``broadcast``: one row for all samples.
    A key that is no feature ("label") rides along: PyHealth ignores it."""
    out = {"label": torch.zeros(3)}
    for key in model.feature_keys:
        value = value_of(model, batch, key)
        value = value[:1] if broadcast else value
        out[key] = torch.full_like(value, 2) if model.dataset.input_processors[key].is_token() \
            else torch.full_like(value, 0.3)
    return out


def with_long_patient(batch, key, long=None, short=None):
    """The batch with patient 0's codes of ``key`` tiled to ``long`` (default: 5x the others' longest) and the
    others' cut to their first ``short`` (default: all), right-padded with 0 as PyHealth's collate does."""
    value = batch[key]
    rows = [v[v != 0] for v in value]
    rows[1:] = [r[:short] for r in rows[1:]]
    long = long or 5 * max(len(r) for r in rows[1:])
    rows[0] = rows[0].repeat(-(-long // len(rows[0])))[:long]
    out = torch.zeros(len(rows), long, dtype=value.dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return {**batch, key: out}


BAD_CALLS = ["baseline-missing-a-key", "baseline-float-token-ids", "baseline-wrong-batch", "target-out-of-range"]


def bad_call(variant, model, batch):
    """The call arguments of one of ``BAD_CALLS`` on a flat-sequence batch (PyHealth raises on each)."""
    if variant == "target-out-of-range":
        return dict(target_class_idx=7)
    base = custom_baseline(model, batch)
    if variant == "baseline-missing-a-key":
        del base["procedures"]
    elif variant == "baseline-float-token-ids":
        base["conditions"] = base["conditions"].float()
    elif variant == "baseline-wrong-batch":
        base["conditions"] = base["conditions"][:2]
    return dict(baseline=base)


# -- comparing with PyHealth ------------------------------------------------------------------------------------
def assert_parity(ours, theirs, ordered=True, trivial_ok=False, constant_ok=False):
    """fastattr's attributions ``ours`` equal PyHealth's ``theirs`` per key: the keys (and their order where
    ``ordered``), tensors of the same shape, dtype and device, detached, values within ``TOL``; every reference
    non-trivial (nonzero and not constant). ``trivial_ok``: where PyHealth's answer is all zeros fastattr's must
    be exactly that; ``constant_ok``: a key's reference may be constant, so long as not every key's is."""
    assert (list(ours) == list(theirs)) if ordered else (set(ours) == set(theirs))
    if constant_ok:
        assert any(bool(ref.max() > ref.min()) for ref in theirs.values()), "every reference attribution is constant"
    for key, ref in theirs.items():
        got = ours[key]
        assert isinstance(got, torch.Tensor), key
        assert got.shape == ref.shape, f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{key}: dtype {got.dtype} != {ref.dtype}"
        assert got.device == ref.device, key
        assert not got.requires_grad, key
        if trivial_ok and not ref.abs().max() > 0:
            assert torch.equal(got, ref), f"{key}: PyHealth gives all zeros, fastattr max |value| {got.abs().max()}"
            continue
        assert ref.abs().max() > 0 and (constant_ok or ref.max() > ref.min()), f"{key}: trivial reference"
        err = rel_err(got, ref)
        assert err <= TOL, f"{key}: relative error {err:.2e}"


@dataclass(frozen=True)
class Method:
    """An interpreter pair: fastattr's class ``ours`` and PyHealth's, named in ``pyhealth.interpret.methods``
    (imported when first used), with the constructor arguments ``init`` both get unless a test overrides them."""
    ours: type
    theirs_name: str
    init: dict = field(default_factory=dict)
    ordered: bool = True  # whether the keys' order is compared too (LIME and SHAP: the key sets only)

    def theirs(self) -> type:
        import pyhealth.interpret.methods as methods

        return getattr(methods, self.theirs_name)

    def run_both(self, model, batch, init=None, **call):
        """Attribute with both classes (same constructor args, same call args); return (ours, theirs)."""
        init = {**self.init, **(init or {})}
        theirs = self.theirs()(model, **init).attribute(**call, **batch)
        ours = self.ours(model, **init).attribute(**call, **batch)
        return ours, theirs

    def assert_parity(self, ours, theirs, **options):
        assert_parity(ours, theirs, ordered=self.ordered, **options)

    def check(self, model, batch, init=None, **call):
        """Both classes on the same arguments give the same attributions (:func:`assert_parity`)."""
        self.assert_parity(*self.run_both(model, batch, init, **call))


@dataclass(frozen=True)
class Sampler(Method):
    """A sampling explainer (LIME, SHAP): ``init`` holds its sample budget and ``quick`` the small one of the
    error checks; ``settings``: the constructor defaults it must share with PyHealth's; ``refused_at_init``: the
    rows of ``REFUSED`` PyHealth's class raises on in its constructor (on the others: in ``attribute``)."""
    ordered: bool = False
    quick: dict = field(default_factory=dict)
    settings: tuple = ()
    refused_at_init: frozenset = frozenset()


# models PyHealth's sampling explainers refuse: (kind, PyHealth model, classes, model kwargs, use_embeddings)
REFUSED = {
    # RNN is no Interpretable (and its forward reads the label, which SHAP filters out of the batch)
    "rnn-embeddings": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), True),
    "rnn-no-embeddings": ("seq", "RNN", 2, dict(embedding_dim=16, hidden_dim=16), False),
    # a continuous tensor is one token to the Transformer, but the appended mask is [B, 6]
    "transformer-seq+tensor-embeddings": ("seq_tensor", "Transformer", 3,
                                          dict(num_layers=1, heads=2, embedding_dim=16), True),
    "transformer-seq+tensor-no-embeddings": ("seq_tensor", "Transformer", 3,
                                             dict(num_layers=1, heads=2, embedding_dim=16), False),
}


# -- the checks LIME and SHAP share (SAMPLER_CHECKS): both modules collect them, run on their ``method`` fixture --
@USE_EMBEDDINGS
@pytest.mark.parametrize("name", list(PROTOCOL))
def test_default_baseline(method, name, use_embeddings):
    method.check(*case(name), dict(use_embeddings=use_embeddings))


@pytest.mark.parametrize("name", list(PROTOCOL))
def test_custom_baseline(method, name):
    model, batch = case(name)
    method.check(model, batch, baseline=custom_baseline(model, batch))


@USE_EMBEDDINGS
@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "mlp-seq+tensor", "stagenet"])
def test_broadcast_baseline(method, name, use_embeddings):
    # one baseline row for the whole batch: PyHealth only broadcasts it against the batch
    model, batch = case(name)
    method.check(model, batch, dict(use_embeddings=use_embeddings), baseline=custom_baseline(model, batch, True))


@pytest.mark.parametrize("name", MULTICLASS)
def test_target_class_idx(method, name):
    model, batch = case(name)
    method.check(model, batch, target_class_idx=0)
    method.check(model, batch, baseline=custom_baseline(model, batch), target_class_idx=CASES[name][2] - 1)


def test_target_class_idx_numpy_and_tensor(method):
    model, batch = case("transformer-2L2H-multiclass-seq")
    method.check(model, batch, target_class_idx=np.int64(3))
    method.check(model, batch, target_class_idx=torch.tensor(1))


def test_target_class_idx_binary_is_ignored(method):
    method.check(*case("transformer-1L1H-binary-seq"), target_class_idx=1)


@pytest.mark.parametrize("name", ["transformer-1L1H-binary-seq", "transformer-1L1H-multiclass-nested",
                                  "mlp-seq+tensor", "stagenet"])
def test_batch_of_one(method, name):
    model, batch = case(name, batch=1)
    assert len(batch["patient_id"]) == 1
    method.check(model, batch)


def test_pyhealth_defaults(method):
    model, batch = case("transformer-1L1H-binary-seq", batch=2)
    theirs, ours = method.theirs()(model), method.ours(model)
    for attr in method.settings:
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    method.assert_parity(ours.attribute(**batch), theirs.attribute(**batch))


@pytest.mark.parametrize("name", ["transformer-2L2H-multiclass-seq", "stagenet"])
def test_unseeded_uses_global_rng_like_pyhealth(method, name):
    """random_seed=None: samples come from the caller's global RNG; same seed, same draws, same state after."""
    model, batch = case(name)
    init = {**method.init, "random_seed": None}
    torch.manual_seed(1234)
    theirs = method.theirs()(model, **init).attribute(**batch)
    theirs_after = torch.get_rng_state()
    torch.manual_seed(1234)
    ours = method.ours(model, **init).attribute(**batch)
    ours_after = torch.get_rng_state()
    method.assert_parity(ours, theirs)
    assert torch.equal(ours_after, theirs_after), "global RNG advanced differently from PyHealth's call"
    # and the seed really matters: another global seed gives other samples
    torch.manual_seed(4321)
    other = method.ours(model, **init).attribute(**batch)
    assert any(rel_err(other[k], theirs[k]) > TOL for k in theirs)


@pytest.mark.parametrize("cls", ["ours", "theirs"])
def test_seeded_call_leaves_global_rng_unchanged(method, cls):
    model, batch = case("transformer-1L1H-binary-seq")
    explainer = (method.ours if cls == "ours" else method.theirs())(model, **method.init, random_seed=7)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    first = explainer.attribute(**batch)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    after_np = np.random.get_state()
    assert after_np[0] == before[2][0] and np.array_equal(after_np[1], before[2][1]) and after_np[2:] == before[2][2:]
    # the seed is reapplied on every call: the same result again, whatever the global state
    torch.manual_seed(5)
    again = explainer.attribute(**batch)
    for key in first:
        assert torch.equal(first[key], again[key]), key


@pytest.mark.parametrize("seed", [0, 2024])
def test_other_random_seed(method, seed):
    method.check(*case("mlp-seq+tensor"), dict(random_seed=seed))


def test_call_interface(method):
    model, batch = case("transformer-2L2H-multiclass-seq")
    theirs = method.theirs()(model, **method.init)(target_class_idx=2, **batch)
    method.assert_parity(method.ours(model, **method.init)(target_class_idx=2, **batch), theirs)


@pytest.mark.parametrize("name", list(REFUSED))
def test_same_errors_as_pyhealth(method, name):
    """Where PyHealth raises (in the constructor or in attribute), fastattr raises there too, an exception of
    PyHealth's type (or a subclass)."""
    kind, model_name, classes, model_kwargs, use_embeddings = REFUSED[name]
    model, batch = named(name, kind, model_name, classes, model_kwargs)
    init = dict(use_embeddings=use_embeddings, **method.quick)
    if name in method.refused_at_init:
        raises_like_pyhealth(lambda: method.theirs()(model, **init), lambda: method.ours(model, **init))
        return
    theirs, ours = method.theirs()(model, **init), method.ours(model, **init)
    raises_like_pyhealth(lambda: theirs.attribute(**batch), lambda: ours.attribute(**batch))


@USE_EMBEDDINGS
@pytest.mark.parametrize("variant", BAD_CALLS)
def test_bad_call_raises_like_pyhealth(method, variant, use_embeddings):
    model, batch = case("transformer-2L2H-multiclass-seq")
    call = bad_call(variant, model, batch)
    init = dict(use_embeddings=use_embeddings, **method.quick)
    raises_like_pyhealth(lambda: method.theirs()(model, **init).attribute(**call, **batch),
                         lambda: method.ours(model, **init).attribute(**call, **batch))


SAMPLER_CHECKS = {name: test for name, test in globals().items() if name.startswith("test_")}

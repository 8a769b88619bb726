"""CheferRelevance on fastattr's own protocol models, without PyHealth."""
import gc
import weakref

import pytest
import torch
from conftest import codes, own_model, rel_err

import fastattr
from fastattr.core import relevance
from fastattr.interpret.attention.chefer import detect_row_picks
from fastattr.loop import full_chefer_relevance


def reference(model, target=None, **batch):
    """PyHealth's algorithm verbatim (fastattr.loop), expanded to nested inputs' shapes as PyHealth
    does (only where the raw value has more dims than the relevance)."""
    return full_chefer_relevance(model, target_class_idx=target, **batch)


def close(got, ref):
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        err = rel_err(got[k], ref[k])
        assert err <= 1e-5, f"{k}: {err:.2e}"


@pytest.fixture(params=["rows", "full"])
def path(request, monkeypatch):
    """Both ways to R's rows: picked rows pushed from the last layer (what large maps take), and
    the whole R reduced by the model (what small maps take on the CPU)."""
    monkeypatch.setitem(relevance.FULL_PATH_FLOPS, "cpu", 0.0 if request.param == "rows" else float("inf"))
    return request.param


@pytest.mark.parametrize("layers, heads", [(1, 1), (2, 2), (4, 4)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_reference_on_own_transformer(layers, heads, backend, path):
    model, batch = own_model("transformer", seed=layers, layers=layers, heads=heads, dim=16)
    close(fastattr.CheferRelevance(model).attribute(backend=backend, **batch), reference(model, **batch))
    close(fastattr.CheferRelevance(model).attribute(target_class_idx=1, backend=backend, **batch),
          reference(model, target=1, **batch))


def test_alias_call_and_per_sample_targets(path):
    model, batch = own_model("transformer", seed=3)
    chefer = fastattr.CheferRelevance(model)
    close(chefer.get_relevance_matrix(**batch), chefer(**batch))
    targets = torch.tensor([0, 2, 1, 2])
    both = chefer.attribute(target_class_idx=targets, **batch)
    for cls in range(3):
        one = chefer.attribute(target_class_idx=cls, **batch)
        for k in both:
            torch.testing.assert_close(both[k][targets == cls], one[k][targets == cls])


def test_own_transformer_is_detected_as_a_row_pick():
    model, batch = own_model("transformer", seed=4)
    tokens = {"codes": 12, "labs": 4}  # CLS + tokens
    picks = detect_row_picks(model, tokens, 4, batch, torch.device("cpu"))
    assert picks is not None
    assert picks["codes"][0].tolist() == [0, 0, 0, 0]
    assert picks["codes"][1].tolist() == [list(range(1, 12))] * 4


class Reduced(fastattr.demo.models.TransformerClassifier):
    """A model whose reduction is not a row pick."""

    reduction = "mean"

    def get_relevance_tensor(self, R, **batch):
        if self.reduction == "mean":
            return {k: r.mean(dim=1)[:, 1:] for k, r in R.items()}
        if self.reduction == "double":
            return {k: 2 * r[:, 0, 1:] for k, r in R.items()}
        if self.reduction == "relu-row":
            return {k: r[:, 0, 1:].clamp(min=0) for k, r in R.items()}
        if self.reduction == "other-sample":
            return {k: r[:, 0, 1:].roll(1, dims=0) for k, r in R.items()}
        raise AssertionError(self.reduction)


@pytest.mark.parametrize("reduction", ["mean", "double", "relu-row", "other-sample"])
def test_non_row_pick_takes_full_path_and_matches(reduction, monkeypatch, path):
    base, batch = own_model("transformer", seed=5)
    model = Reduced(base.dataset, num_classes=3)
    model.load_state_dict(base.state_dict())
    model.reduction = reduction
    model.eval()
    assert detect_row_picks(model, {"codes": 12, "labs": 4}, 4, batch, torch.device("cpu")) is None
    close(fastattr.CheferRelevance(model).attribute(**batch), reference(model, **batch))


def test_stated_rows_are_used():
    from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier

    torch.manual_seed(6)
    model = TransformerClassifier(FeatureSpec({"codes": FeatureProcessor(token=True, size=30)}), num_classes=3).eval()
    batch = {"codes": torch.randint(0, 30, (4, 9))}
    expected = reference(model, **batch)
    model.get_relevance_rows = lambda **b: {"codes": torch.zeros(4, dtype=torch.long)}
    got = fastattr.CheferRelevance(model).attribute(**batch)
    assert got["codes"].shape == (4, 10)  # the whole CLS row, CLS column included
    close({"codes": got["codes"][:, 1:]}, expected)


def test_nested_inputs_are_expanded():
    from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier

    torch.manual_seed(0)
    model = TransformerClassifier(FeatureSpec({"visits": FeatureProcessor(token=True, size=30)}), num_classes=2).eval()
    visits = torch.randint(0, 30, (3, 5, 4))
    out = fastattr.CheferRelevance(model).attribute(visits=visits)
    assert out["visits"].shape == visits.shape
    assert torch.equal(out["visits"][..., 0], out["visits"][..., 3])


def test_a_flat_tensor_feature_keeps_the_models_shape():
    # A [B, F] continuous feature is one token to a Transformer: PyHealth returns its relevance as
    # [B, 1] (the shape get_relevance_tensor gives), never repeated to [B, F].
    from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier

    torch.manual_seed(1)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=30), "labs": FeatureProcessor(token=False, size=6)})
    model = TransformerClassifier(spec, num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    batch = {"codes": codes(5, 7, 30, g), "labs": torch.randn(5, 6, generator=g)}
    got = fastattr.CheferRelevance(model).attribute(**batch)
    assert got["labs"].shape == (5, 1) and got["codes"].shape == (5, 7)
    close(got, reference(model, **batch))


def test_hooks_off_after_call_and_after_error_and_nothing_kept():
    model, batch = own_model("transformer", seed=7)
    chefer = fastattr.CheferRelevance(model)
    chefer.attribute(**batch)
    assert model._capture is False
    assert all(p.grad is None for p in model.parameters())
    attn = model.get_attention_layers()["codes"][0][0]
    ref = weakref.ref(attn)
    del attn
    model(**batch)  # a forward without hooks drops the model's own copies
    gc.collect()
    assert ref() is None, "fastattr kept a reference to an attention map"

    def boom(**kw):
        raise RuntimeError("forward failed")

    model.forward_from_embedding = boom
    with pytest.raises(RuntimeError, match="forward failed"):
        chefer.attribute(**batch)
    assert model._capture is False


def test_missing_gradient_is_a_clear_error():
    model, batch = own_model("transformer", seed=8)
    original = model.get_attention_layers
    model.get_attention_layers = lambda: {k: [(a, None) for a, _ in v] for k, v in original().items()}
    with pytest.raises(ValueError, match="no attention gradient"):
        fastattr.CheferRelevance(model).attribute(**batch)
    model.get_attention_layers = lambda: {k: [(a, None if g is None else g[..., :-1]) for a, g in v]
                                          for k, v in original().items()}
    with pytest.raises(ValueError, match="differ in shape"):
        fastattr.CheferRelevance(model).attribute(**batch)


@pytest.mark.parametrize("missing", ["set_attention_hooks", "get_attention_layers", "get_relevance_tensor"])
def test_model_without_chefer_methods(missing):
    model, _ = own_model("mlp")
    for name in ("set_attention_hooks", "get_attention_layers", "get_relevance_tensor"):
        if name != missing:
            setattr(model, name, lambda *a, **k: None)
    with pytest.raises(TypeError, match=f"model.{missing}"):
        fastattr.CheferRelevance(model)


def test_bad_target_and_batch():
    model, batch = own_model("transformer", seed=9)
    chefer = fastattr.CheferRelevance(model)
    with pytest.raises(ValueError, match="out of range"):
        chefer.attribute(target_class_idx=5, **batch)
    with pytest.raises(ValueError, match="none of the model's feature keys"):
        chefer.attribute(label=batch["label"])
    with pytest.raises(ValueError, match="backend must be one of"):
        chefer.attribute(backend="tpu", **batch)
    assert model._capture is False


@pytest.mark.parametrize("frozen", [("codes",), ("codes", "labs"), "all"])
def test_frozen_embeddings_reach_every_attention_map(frozen):
    # Freezing a key's embedding (pretrained codes) must not hide that key's attention maps from
    # the backward, nor let gradients an earlier call left on the maps be read again.
    model, batch = own_model("transformer", seed=40)
    expected = reference(model, **batch)
    model.zero_grad(set_to_none=True)
    params = list(model.parameters()) if frozen == "all" else [
        p for key in frozen for p in model.embedding_model.layers[key].parameters()]
    for p in params:
        p.requires_grad_(False)
    # an earlier call on a same-shaped batch of other values leaves its gradients on the maps
    other = {**batch, "codes": torch.roll(batch["codes"], 1, dims=0), "labs": batch["labs"].flip(0)}
    fastattr.CheferRelevance(model).attribute(**other)
    close(fastattr.CheferRelevance(model).attribute(**batch), expected)
    assert all(p.grad is None for p in model.parameters())


def test_stale_attention_gradients_are_refused():
    model, batch = own_model("transformer", seed=41)
    chefer = fastattr.CheferRelevance(model)
    chefer.attribute(**batch)
    stale = model.get_attention_layers()
    model.get_attention_layers = lambda: stale  # a model whose hooks stopped recording
    with pytest.raises(ValueError, match="earlier call"):
        chefer.attribute(**batch)


class AveragedHeads(fastattr.demo.models.TransformerClassifier):
    """Hands Chefer head-averaged maps, ``[(a.mean(1), g.mean(1)), ...]``, on the layers named in
    ``averaged`` (all by default): computing on the gradients, as the protocol allows, means
    ``get_attention_layers`` only works after the backward."""

    averaged = None

    def get_attention_layers(self):
        return {k: [(a.mean(1), g.mean(1)) if self.averaged is None or i in self.averaged else (a, g)
                    for i, (a, g) in enumerate(pairs)]
                for k, pairs in super().get_attention_layers().items()}


@pytest.mark.parametrize("averaged", [None, (0,), (1,)], ids=["all-3d", "first-3d", "last-3d"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_model_that_computes_on_its_gradients_in_get_attention_layers(averaged, backend, path):
    base, batch = own_model("transformer", seed=42, heads=2, layers=2)
    model = AveragedHeads(base.dataset, num_classes=3, heads=2, layers=2)
    model.load_state_dict(base.state_dict())
    model.averaged = averaged
    model.eval()
    with pytest.raises(AttributeError):  # what reading the layers before a backward does to this model
        model.get_attention_layers()
    chefer = fastattr.CheferRelevance(model)
    got = chefer.attribute(backend=backend, **batch)
    close(got, reference(model, **batch))
    assert any(v.abs().max() > 0 for v in got.values())
    close(chefer.attribute(backend=backend, **batch), got)  # a second call reads fresh gradients again


class KeepsOldGradients(fastattr.demo.models.TransformerClassifier):
    """PyHealth's hooks keep a layer's last gradient until a new one arrives. ``cut="input"``: the
    ``labs`` encoder gets its input detached (its attention maps are reached only through its
    weights); ``cut="output"``: the logits do not depend on the ``labs`` encoder at all."""

    cut = None

    def forward_from_embedding(self, **batch):
        kept = {id(b.attention): b.attention.attn_grad for blocks in self.encoders.values() for b in blocks}
        pooled = []
        for key in self.feature_keys:
            x, mask = self._tokens(key, batch[key])
            if self.cut == "input" and key == "labs":
                x = x.detach()
            x = torch.cat([self.cls[key].expand(x.shape[0], 1, -1), x], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
            for block in self.encoders[key]:
                x = block(x, mask, self._capture)
            pooled.append(x[:, 0].detach() if self.cut == "output" and key == "labs" else x[:, 0])
        for blocks in self.encoders.values():
            for b in blocks:
                if b.attention.attn_grad is None:
                    b.attention.attn_grad = kept[id(b.attention)]
        return self._outputs(self.head(self.norm(torch.cat(pooled, dim=-1))), batch)


def keeps_old_gradients(seed):
    base, batch = own_model("transformer", seed=seed)
    model = KeepsOldGradients(base.dataset, num_classes=3)
    model.load_state_dict(base.state_dict())
    return model.eval(), batch


def test_maps_reached_only_through_weights_are_reached_as_pyhealth_reaches_them():
    model, batch = keeps_old_gradients(43)
    chefer = fastattr.CheferRelevance(model)
    chefer.attribute(**batch)  # leaves gradients on every map
    model.cut = "input"
    close(chefer.attribute(**batch), reference(model, **batch))
    assert all(p.grad is None for p in model.parameters())


def test_gradients_an_earlier_call_left_are_refused_without_reading_layers_early():
    model, batch = keeps_old_gradients(44)
    chefer = fastattr.CheferRelevance(model)
    close(chefer.attribute(**batch), reference(model, **batch))
    model.cut = "output"
    with pytest.raises(ValueError, match="layer 0 of 'labs' still holds the gradient of an earlier call"):
        chefer.attribute(**batch)
    assert all(p.grad is None for p in model.parameters())


def test_tensor_register_hook_is_torchs_own_outside_a_chefer_forward():
    original = torch.Tensor.register_hook
    model, batch = own_model("transformer", seed=45)
    chefer = fastattr.CheferRelevance(model)
    chefer.attribute(**batch)
    assert torch.Tensor.register_hook is original
    with pytest.raises(ValueError, match="none of the model's feature keys"):
        chefer.attribute(label=batch["label"])
    def fail(*args):
        raise RuntimeError("the head failed")
    handle = model.head.register_forward_hook(fail)  # after every attention map was hooked
    with pytest.raises(RuntimeError, match="the head failed"):
        chefer.attribute(**batch)
    handle.remove()
    assert torch.Tensor.register_hook is original and model._capture is False


def test_chefer_from_several_threads_at_once():
    # one model per thread (a model keeps its maps in its modules, so it explains one batch at a
    # time, as in PyHealth); the recording of hooked tensors is per thread
    import concurrent.futures

    _, batch = own_model("transformer", seed=46)
    models = [own_model("transformer", seed=47 + i)[0] for i in range(6)]
    expected = [reference(m, **batch) for m in models]
    original = torch.Tensor.register_hook

    def run(i):
        chefer = fastattr.CheferRelevance(models[i])
        return [chefer.attribute(**batch) for _ in range(3)]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for i, results in enumerate(pool.map(run, range(6))):
            for got in results:
                close(got, expected[i])
    assert torch.Tensor.register_hook is original

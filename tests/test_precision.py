"""The precision option: float32 stays exact; tf32 and bf16 run the model's own calls in faster
arithmetic while fastattr's reductions stay float32. (Their fidelity on a trained model is
measured by benchmarks/precision.py, not asserted here beyond sanity.)"""
import warnings

import pytest
import torch
from conftest import codes, own_model, rel_err

import fastattr
from fastattr.core import packing
from fastattr.core.precision import model_precision
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier


def test_precision_is_validated():
    model, batch = own_model("transformer", seed=50)
    for cls in (fastattr.IntegratedGradients, fastattr.CheferRelevance):
        with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16"):
            cls(model, precision="fp16")
        with pytest.raises(ValueError, match="precision must be one of"):
            cls(model).attribute(precision="half", **batch)


def test_tf32_is_float32_on_the_cpu():
    model, batch = own_model("transformer", seed=51)
    ig = fastattr.IntegratedGradients(model, steps=4)
    chefer = fastattr.CheferRelevance(model)
    for fp32, tf32 in ((ig.attribute(**batch), ig.attribute(precision="tf32", **batch)),
                       (chefer.attribute(**batch), chefer.attribute(precision="tf32", **batch))):
        for key in fp32:
            assert torch.equal(fp32[key], tf32[key])


def test_bf16_runs_the_model_in_bfloat16_and_keeps_fastattrs_sums_in_float32(monkeypatch):
    model, batch = own_model("transformer", seed=52)
    seen = []
    model.head.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    ig = fastattr.IntegratedGradients(model, steps=8)
    fp32, d32 = ig.attribute(return_convergence_delta=True, **batch)
    targets32 = ig.last_predictions[1]
    bf16, d16 = ig.attribute(precision="bf16", return_convergence_delta=True, **batch)
    assert torch.bfloat16 in seen and torch.float32 in seen
    assert torch.equal(ig.last_predictions[1], targets32), "IG picks the class to explain in float32"
    for key in fp32:
        assert bf16[key].dtype == torch.float32 and torch.isfinite(bf16[key]).all()
        assert 0 < rel_err(bf16[key], fp32[key]) < 0.1
    assert d16.dtype == torch.float32
    chefer = fastattr.CheferRelevance(model)
    # Chefer takes its argmax from the (bfloat16) forward it explains: give the class to compare
    r32 = chefer.attribute(target_class_idx=targets32, **batch)
    r16 = chefer.attribute(target_class_idx=targets32, precision="bf16", **batch)
    for key in r32:
        assert r16[key].dtype == torch.float32 and 0 < rel_err(r16[key], r32[key]) < 0.1
    assert chefer.last_predictions[0].dtype == torch.float32


@pytest.mark.parametrize("method", ["ig", "chefer"])
def test_the_padding_check_is_made_in_float32_so_bf16_still_packs(method, monkeypatch):
    for m in packing.GROUP_COST:
        monkeypatch.setitem(packing.GROUP_COST[m], "cpu", 0.0)
    torch.manual_seed(53)
    model = TransformerClassifier(FeatureSpec({"codes": FeatureProcessor(token=True, size=40)}), num_classes=3,
                                  dim=16).eval()
    x = codes(8, 15, 40, torch.Generator().manual_seed(53), min_len=2)
    interp = fastattr.IntegratedGradients(model, steps=4) if method == "ig" else fastattr.CheferRelevance(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = interp.attribute(precision="bf16", codes=x)["codes"]
    assert len(interp.last_groups) > 1
    padded = interp.attribute(precision="bf16", pack_lengths=False, codes=x)["codes"]
    assert rel_err(packed, padded) < 0.1


def test_model_precision_restores_the_tf32_switches():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with model_precision("tf32", torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with model_precision("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")

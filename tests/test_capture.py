"""Chefer's machinery on its own: recording the tensors a forward hooks, the stale-gradient check,
and row-pick detection with its cache (fastattr.interpret.attention.capture, fastattr.interpret.attention.row_picks)."""
import threading

import torch
from torch import nn

from fastattr.interpret.attention.capture import HookedTensors, ModuleState, OldTensors, gradient_sinks
from fastattr.interpret.attention.row_picks import RowPicks, detect_row_picks


def test_hooked_tensors_records_this_threads_hooks_and_restores_torch():
    original = torch.Tensor.register_hook
    x = torch.randn(3, requires_grad=True)
    seen_elsewhere = []

    def other_thread():
        y = torch.randn(2, requires_grad=True) * 2
        y.register_hook(lambda g: g)
        seen_elsewhere.append(y)

    with HookedTensors() as found:
        y = x * 2
        y.register_hook(lambda g: g)
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        with HookedTensors() as inner:
            z = x + 1
            z.register_hook(lambda g: g)
        assert len(inner) == 1 and inner[0] is z
    assert len(found) == 1 and found[0] is y, "only this thread's hooks, and not the inner context's"
    assert torch.Tensor.register_hook is original
    y.sum().backward()  # the hooks registered through the wrapper work


def test_gradient_sinks_collect_outputs_and_make_frozen_ones_require_grad():
    embed = nn.Embedding(5, 3)
    embed.weight.requires_grad_(False)
    sinks = []
    handle = embed.register_forward_hook(gradient_sinks(sinks))
    out = embed(torch.tensor([[1, 2]]))
    handle.remove()
    assert len(sinks) == 1 and sinks[0] is out and out.requires_grad


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.kept = None
        self.maps = []


def test_a_gradient_held_before_the_backward_and_unchanged_is_stale():
    model = Holder()
    old_grad = torch.randn(4)
    model.kept = old_grad
    model.maps = [torch.randn(3)]
    old = OldTensors(ModuleState(model), [])
    assert old.stale(old_grad) and old.stale(model.maps[0])
    assert not old.stale(torch.randn(4)), "a new tensor is fresh"
    old_grad.add_(1)  # written since: its version moved on
    assert not old.stale(old_grad)


def probe_model(reduce):
    class Reducer:
        def get_relevance_tensor(self, R, **data):
            return {k: reduce(r) for k, r in R.items()}
    return Reducer()


def test_row_picks_are_found_and_other_reductions_are_not():
    device = torch.device("cpu")
    picks = detect_row_picks(probe_model(lambda r: r[:, 0]), {"codes": 6}, 3, {}, device)
    rows, cols = picks["codes"]
    assert rows.tolist() == [0, 0, 0] and cols[0].tolist() == list(range(6))
    for reduce in (lambda r: r.sum(1), lambda r: r[:, 0] * 2, lambda r: r[:, 0].clamp(min=0), lambda r: r.mean(1)):
        assert detect_row_picks(probe_model(reduce), {"codes": 6}, 3, {}, device) is None


def test_row_pick_verdicts_are_cached_per_layout():
    calls = []

    def reduce(r):
        calls.append(1)
        return r[:, -1]
    cache, model = RowPicks(), probe_model(reduce)
    assert cache.find(model, ("a",), {"codes": 5}, 2, {}, torch.device("cpu")) is not None
    first = len(calls)
    assert cache.find(model, ("a",), {"codes": 5}, 2, {}, torch.device("cpu")) is not None
    assert len(calls) - first == 1, "a known row pick needs only the index-coded probe"
    summing = probe_model(lambda r: r.sum(1))
    assert cache.find(summing, ("b",), {"codes": 5}, 2, {}, torch.device("cpu")) is None
    calls.clear()
    assert cache.find(probe_model(reduce), ("b",), {"codes": 5}, 2, {}, torch.device("cpu")) is None
    assert not calls, "a layout found not to be a row pick is never probed again"

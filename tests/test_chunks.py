"""IG's CPU chunk probe (fastattr.core.chunks.ChunkSizer): it counts the bytes autograd saves that grow with
the rows, and not the model's weights, however autograd holds them (``F.linear`` saves ``weight.t()``, a
view), trained or frozen; chunks keep the largest activation under CPU_TENSOR_BYTES (glibc's fresh pages
from 32 MiB on) and all of them under CPU_CHUNK_BYTES, in whole path points where one fits."""
import pytest
import torch
from conftest import own_model

import fastattr
from fastattr.core import chunks
from fastattr.core.chunks import ChunkSizer, RowBytes


def probe(model, rows, width, mask=None):
    sizer = ChunkSizer(None, rows, 50, torch.device("cpu"), row_elements=1 << 20)
    x = torch.randn(rows, width, requires_grad=True)
    with torch.enable_grad(), sizer.watch():
        hidden = torch.relu(model(x))  # relu saves its output: rows x out floats
        if mask is not None:
            hidden = hidden * mask  # mul saves the mask (an input without grad: it grows with the rows)
    sizer.end(rows)
    return sizer


@pytest.mark.parametrize("frozen", [False, True])
def test_the_probe_counts_activations_not_weights(frozen):
    model = torch.nn.Linear(512, 256)  # 512 KiB of weight, saved by linear as weight.t()
    model.requires_grad_(not frozen)
    sizer = probe(model, rows=8, width=512)
    assert sizer.per_row == RowBytes(256 * 4, 256 * 4)


def test_inputs_without_grad_that_grow_with_the_rows_are_counted():
    mask = (torch.rand(8, 256) > 0.5).float()
    sizer = probe(torch.nn.Linear(64, 256), rows=8, width=64, mask=mask)
    assert sizer.per_row == RowBytes(2 * 256 * 4, 256 * 4)  # relu's output and the mask


def sized(batch, per_row, points=50):
    return ChunkSizer(None, batch, points, torch.device("cpu"), row_elements=1 << 20, per_row=per_row).rows


def test_the_largest_activation_bounds_a_chunk_in_whole_path_points():
    mib = 1 << 20
    assert sized(16, RowBytes(4 * mib, 1 * mib)) == 16  # 256 codes: 1 MiB attention maps a row
    assert sized(16, RowBytes(1.5 * mib, mib / 4)) == 64
    assert sized(16, RowBytes(mib / 4, mib / 64)) == 16 * chunks.CPU_MAX_POINTS  # at most 16 points
    assert sized(16, RowBytes(mib / 4, mib / 64), points=5) == 16 * 5  # or the whole path
    assert sized(16, RowBytes(8 * mib, mib / 64)) == 64  # all of them under CPU_CHUNK_BYTES (512 MiB)
    assert sized(8, RowBytes(10 * mib, 4 * mib)) == 4  # less than a path point: as many rows as fit
    assert sized(8, RowBytes(40 * mib, 20 * mib)) == 1


def test_chunks_are_sized_as_the_probe_says_and_results_do_not_move(monkeypatch):
    model, batch = own_model("transformer", num_classes=3, seed=4)
    ig = fastattr.IntegratedGradients(model, steps=20)
    monkeypatch.setattr(chunks, "CPU_SMALL_PATH", 0)  # a small path would run whole, unprobed
    auto = ig.attribute(**batch)
    probed = ig.last_internal_batch_size
    monkeypatch.setattr(chunks, "CPU_TENSOR_BYTES", 1)  # every chunk one row
    one = ig.attribute(**batch)
    assert ig.last_internal_batch_size == 1 < probed
    assert all(torch.allclose(auto[k], one[k], rtol=1e-5, atol=1e-7) for k in auto)

"""A torchrun run's stored rows against one process's (issue #36), for IG and Chefer.

Both runs cut the same batches, and rank r runs batches r, r + 2, ... of them, so the only thing that
can differ is the arithmetic inside each process. On a CPU that depends on PyTorch's intra-op thread
count (its CPU softmax backward, for one, rounds differently on one thread than on several), and
torchrun gives each rank ``OMP_NUM_THREADS=1``. So a run is bitwise the one process's run at the
same thread count, and within float rounding of the one process on its default threads."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import cli, rel_err
from test_cohort import same_runs

from fastattr.cohort import load_attributions
from fastattr.demo.models import FeatureProcessor, FeatureSpec, TransformerClassifier, save_checkpoint
from fastattr.demo.synthetic import SyntheticCohort

pytestmark = pytest.mark.slow

PATIENTS, BATCH = 60, 8  # 8 sorted batches: each rank attributes 4, none of the other's
# a few float32 ulps of a row's largest |value|: the thread count moves the last bits only
# (measured at most 5.7e-7 of it: this model and the demo's, IG and Chefer, 60 to 300 patients)
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """A seeded two-layer Transformer checkpoint (the demo's shape): with one layer Chefer's
    attention gradients pass through no softmax backward and would not show the thread count."""
    cohort = SyntheticCohort(patients=10, seed=3)
    torch.manual_seed(0)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(TransformerClassifier(spec, num_classes=2, dim=32, heads=2, layers=2).eval(), path,
                    cohort={"seed": 3, "vocab": cohort.vocab})
    return path


def attribute(out, method: str, checkpoint, processes: int, threads: int | None):
    """``fastattr attribute`` over the synthetic cohort in ``processes`` processes (torchrun for more
    than one), with ``OMP_NUM_THREADS=threads`` (``None``: unset, as a user leaves it)."""
    args = ["attribute", "--size", PATIENTS, "--checkpoint", checkpoint, "--method", method, "--batch-size", BATCH,
            *(["--steps", 8] if method == "ig" else []), "--device", "cpu", "--out", out]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["TRITON_INTERPRET"] = "0"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        done = cli(*args, env=env)
    else:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(processes), "-m", "fastattr", *map(str, args)], capture_output=True, text=True,
                              env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module", params=["ig", "chefer"])
def runs(request, two_layers, tmp_path_factory):
    """The method's runs: ``two`` under plain torchrun (2 processes, OMP_NUM_THREADS left to
    torchrun), ``one_thread`` in one process on one thread, ``one`` in one process on its default
    threads."""
    folder = tmp_path_factory.mktemp(request.param)
    return {name: attribute(folder / name, request.param, two_layers, processes, threads)
            for name, processes, threads in (("two", 2, None), ("one_thread", 1, 1), ("one", 1, None))}


def test_torchrun_rows_are_bitwise_one_process_at_the_same_thread_count(runs):
    store = load_attributions(runs["two"])
    assert len(store) == PATIENTS
    batches = [entry["batch"] for entry in store.shards.values()]
    assert sorted(batches) == list(range(PATIENTS // BATCH + 1))
    assert {b % 2 for b in batches} == {0, 1}, "both ranks wrote shards"
    same_runs(runs["one_thread"], runs["two"])  # every stored tensor and every row, torch.equal


def test_torchrun_rows_are_one_process_on_its_default_threads_to_float_rounding(runs):
    one, two = load_attributions(runs["one"]), load_attributions(runs["two"])
    assert one.patient_ids == two.patient_ids
    for i in one:
        a, b = one[i], two[i]
        assert a.keys() == b.keys()
        for key in a:
            if a[key].is_floating_point():  # attributions, probabilities: the last bits may differ
                assert a[key].shape == b[key].shape and rel_err(b[key], a[key]) <= ROUNDING, (i, key)
            else:  # token ids, padding masks, row shapes, targets: exact
                assert torch.equal(a[key], b[key]), (i, key)

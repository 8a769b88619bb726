"""Cohort-scale attribution: shards, lazy loading, resume after SIGKILL, torchrun, checksums."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cli, rel_err, tiny_model
from safetensors import safe_open
from test_padding_check import MATCH_LABS, InfersMaskFromEmbeddings, sensitive_model
from test_row_shapes import Patients
from test_row_shapes import collate as patients_collate

import fastattr
from fastattr.cohort import LengthSortedBatches, attribute_dataset, load_attributions, padding_probe
from fastattr.core import packing
from fastattr.demo.models import TransformerClassifier, load_checkpoint
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort
from fastattr.interpret import padding
from fastattr.interpret.attention import chefer as chefer_module
from fastattr.interpret.features import FeatureBatch


def loader(cohort, batch_size=8):
    return torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=batch_size, shuffle=False)


def same_runs(a: Path, b: Path) -> None:
    sa, sb = load_attributions(a), load_attributions(b)
    assert sa.patient_ids == sb.patient_ids
    assert len(set(sa.patient_ids)) == len(sa), "every patient exactly once"
    ta, tb = sa.all(), sb.all()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for i in sa:  # each row: its own shape, the same in both runs
        ra, rb = sa[i], sb[i]
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra), i


def test_roundtrip_lazy_load_by_id(tmp_path):
    cohort = SyntheticCohort(patients=37, seed=1)
    model = tiny_model(cohort)
    ig = fastattr.IntegratedGradients(model, steps=3)
    attribute_dataset(ig, loader(cohort), tmp_path, return_convergence_delta=True)
    store = load_attributions(tmp_path)
    assert len(store) == 37 and store.patient_ids[0] == "P00000000" and store.complete
    everything = store.all()
    assert everything["attr/codes"].shape == (37, cohort.max_codes)
    assert everything["probability"].shape == (37, 1)
    assert everything["convergence_delta"].shape == (37,)
    assert torch.equal(everything["target"], torch.zeros(37, dtype=torch.long))  # a single logit
    direct = ig.attribute(**cohort.batch(range(32, 37)))["codes"]
    torch.testing.assert_close(store[34]["attr/codes"], direct[2])
    (row,) = store.lookup("P00000034")
    torch.testing.assert_close(row["attr/codes"], direct[2])
    with pytest.raises(KeyError, match="P99"):
        store.lookup("P99")
    with pytest.raises(KeyError, match="store.lookup"):
        store["P00000034"]


def test_checkpoint_roundtrip(tmp_path, checkpoint):
    model, extra = load_checkpoint(checkpoint)
    assert extra == {"cohort": {"seed": 3, "vocab": 100}}
    cohort = SyntheticCohort(patients=10, seed=3)
    torch.testing.assert_close(model(**cohort.batch(range(4)))["logit"],
                               tiny_model(cohort)(**cohort.batch(range(4)))["logit"])
    with pytest.raises(ValueError, match="not a fastattr model checkpoint"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shards_are_detected_at_load_and_redone_on_resume(tmp_path, damage):
    cohort = SyntheticCohort(patients=24, seed=2)
    chefer = fastattr.CheferRelevance(tiny_model(cohort))
    attribute_dataset(chefer, loader(cohort), tmp_path / "a")
    attribute_dataset(chefer, loader(cohort), tmp_path / "clean")
    shard = tmp_path / "a" / "shard-00000001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    store = load_attributions(tmp_path / "a")
    store[0]  # shard 0 is fine
    with pytest.raises(ValueError, match="shard-00000001.*SHA-256"):
        store.lookup("P00000009")
    with pytest.warns(UserWarning, match="corrupt"):
        attribute_dataset(chefer, loader(cohort), tmp_path / "a")
    same_runs(tmp_path / "a", tmp_path / "clean")


def test_resume_checks_the_order_and_no_resume_refuses(tmp_path):
    cohort = SyntheticCohort(patients=16, seed=4)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    attribute_dataset(ig, loader(cohort), tmp_path)
    shuffled = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="shuffle=False"):
        attribute_dataset(ig, shuffled, tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        attribute_dataset(ig, loader(cohort), tmp_path, resume=False)


class Flaky:
    """Raises CUDA out-of-memory for batches larger than ``limit`` patients."""

    def __init__(self, inner, limit):
        self.inner, self.model, self.limit, self.sizes = inner, inner.model, limit, []

    def attribute(self, **batch):
        size = batch["codes"].shape[0]
        self.sizes.append(size)
        if size > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.attribute(**batch)


def test_out_of_memory_batches_are_split_then_fail_naming_the_batch(tmp_path):
    cohort = SyntheticCohort(patients=13, seed=5)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    flaky = Flaky(ig, limit=3)
    attribute_dataset(flaky, loader(cohort), tmp_path / "split")
    attribute_dataset(ig, loader(cohort), tmp_path / "whole")
    assert max(s for s in flaky.sizes if s <= 3) <= 3 and 8 in flaky.sizes
    store, whole = load_attributions(tmp_path / "split").all(), load_attributions(tmp_path / "whole").all()
    torch.testing.assert_close(store["attr/codes"], whole["attr/codes"])
    with pytest.raises(RuntimeError, match="batch 0 ran out of memory even one patient at a time"):
        attribute_dataset(Flaky(ig, limit=0), loader(cohort), tmp_path / "fail")


class FailsAt:
    """Raises on the ``fail``-th batch (0-based), as a crash mid-run would stop it."""

    def __init__(self, inner, fail):
        self.inner, self.model, self.fail, self.calls = inner, inner.model, fail, 0

    @property
    def last_predictions(self):
        return self.inner.last_predictions

    def attribute(self, **batch):
        self.calls += 1
        if self.calls > self.fail:
            raise KeyboardInterrupt("stopped")
        return self.inner.attribute(**batch)


def test_journal_is_append_only_and_a_torn_line_is_redone(tmp_path):
    cohort = SyntheticCohort(patients=40, seed=6)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(FailsAt(ig, 3), loader(cohort, batch_size=5), tmp_path / "run", progress=False)
    journal = tmp_path / "run" / "manifest.rank0.jsonl"
    lines = journal.read_bytes().split(b"\n")
    assert len(lines) == 1 + 3 + 1 and lines[-1] == b"", "a format line, one line per finished shard, newline-ended"
    assert not (tmp_path / "run" / "manifest.json").exists()
    # a kill in the middle of the next append: the shard is on disk, its line cut short
    (tmp_path / "run" / "shard-00000003.safetensors").write_bytes(b"half a shard")
    with open(journal, "ab") as f:
        f.write(lines[1][: len(lines[1]) // 2].replace(b'"batch": 0', b'"batch": 3'))
    resumed = FailsAt(ig, 100)
    attribute_dataset(resumed, loader(cohort, batch_size=5), tmp_path / "run", progress=False)
    assert resumed.calls == 5, "batches 3..7 are attributed, 0..2 kept"
    attribute_dataset(ig, loader(cohort, batch_size=5), tmp_path / "whole", progress=False)
    same_runs(tmp_path / "run", tmp_path / "whole")
    assert not list((tmp_path / "run").glob("manifest.rank*"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run(tmp_path):
    cohort = SyntheticCohort(patients=1200, seed=6)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    samples = []

    class Measured:
        model = ig.model

        def attribute(self, **batch):
            samples.append(rss_mib())
            return ig.attribute(**batch)

    attribute_dataset(Measured(), loader(cohort, batch_size=4), tmp_path)
    assert len(samples) == 300
    growth = samples[-1] - samples[30]
    assert growth < 25, f"RSS grew {growth:.1f} MiB between batch 30 and batch 300"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL test uses POSIX signals")
def test_killed_run_resumes_without_losing_or_duplicating(tmp_path, checkpoint):
    args = ["attribute", "--size", 240, "--checkpoint", checkpoint, "--batch-size", 4, "--steps", 30, "--device", "cpu"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "fastattr", *map(str, args), "--out", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed").glob("shard-*.safetensors"))) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((tmp_path / "killed").glob("shard-*.safetensors")))
    assert 8 <= written < 60, "the kill must land mid-run"
    assert not (tmp_path / "killed" / "manifest.json").exists()
    assert cli(*args, "--out", tmp_path / "killed", env=env).returncode == 0
    assert cli(*args, "--out", tmp_path / "whole", env=env).returncode == 0
    same_runs(tmp_path / "killed", tmp_path / "whole")
    assert len(load_attributions(tmp_path / "killed")) == 240


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, checkpoint):
    args = ["attribute", "--size", 50, "--checkpoint", checkpoint, "--batch-size", 6, "--steps", 4, "--device", "cpu"]
    env = {**os.environ, "TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1"}
    single = cli(*args, "--out", tmp_path / "one", env=env)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "fastattr", *map(str, args), "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    same_runs(tmp_path / "one", tmp_path / "two")
    assert len(load_attributions(tmp_path / "two")) == 50
    assert not list((tmp_path / "two").glob("manifest.rank*"))
    if importlib.util.find_spec("pandas") and importlib.util.find_spec("pyarrow"):
        from fastattr.runs import tables

        for by_class in (False, True):  # the summary is identical, not merely close
            one, two = tables.summarize(tmp_path / "one", by_class), tables.summarize(tmp_path / "two", by_class)
            assert one.equals(two) and len(one) > 10
        assert tables.to_dataframe(tmp_path / "one").equals(tables.to_dataframe(tmp_path / "two"))


class RepeatedIds(torch.utils.data.Dataset):
    """Samples whose (patient, visit) ids repeat: three samples of one visit, visits missing."""

    def __init__(self, cohort):
        self.inner = CohortDataset(cohort)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        item = dict(self.inner[index])
        item["patient_id"] = f"P{index // 3}"
        item["visit_id"] = "v0"
        return item


def test_repeated_ids_keep_every_row_and_the_store_is_a_mapping(tmp_path):
    import collections.abc

    cohort = SyntheticCohort(patients=10, seed=4)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=3)
    data = torch.utils.data.DataLoader(RepeatedIds(cohort), batch_size=4, shuffle=False)
    attribute_dataset(ig, data, tmp_path)
    store = load_attributions(tmp_path)
    assert isinstance(store, collections.abc.Mapping)
    assert len(store) == 10 and list(store) == list(range(10)) and set(store) == set(range(10))
    assert list(store.keys()) == list(range(10)) and 9 in store and 10 not in store and "P0" not in store
    direct = ig.attribute(**cohort.batch(range(10)))["codes"]
    for position, row in store.items():
        torch.testing.assert_close(row["attr/codes"], direct[position])
    assert store.patient_ids == [f"P{i // 3}" for i in range(10)] and set(store.visit_ids) == {"v0"}
    assert store.find("P1") == [3, 4, 5] and store.find("P1", "v0") == [3, 4, 5] and store.find("P1", "v9") == []
    rows = store.lookup("P3")
    assert len(rows) == 1 and torch.equal(rows[0]["attr/codes"], store[9]["attr/codes"])
    assert len(store.lookup("P2", visit_id="v0")) == 3


class Counted:
    """Wraps an interpreter; counts the model's forwards."""

    def __init__(self, inner):
        self.inner, self.model, self.forwards = inner, inner.model, 0
        self.model.register_forward_hook(self._count)

    def _count(self, *args):
        self.forwards += 1

    @property
    def last_predictions(self):
        return self.inner.last_predictions

    def attribute(self, **batch):
        return self.inner.attribute(**batch)


@pytest.fixture
def probe_forwards(monkeypatch):
    """The forwards of attribute_dataset's padding probe (fastattr.check_padding's, one call each)."""
    calls = []
    original = padding.input_logits
    monkeypatch.setattr(padding, "input_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("method", ["ig", "chefer"])
def test_length_sorted_batches_keep_positions_and_results(tmp_path, method, probe_forwards):
    cohort = SyntheticCohort(patients=23, seed=8, lengths="lognormal", median_codes=6, longest=40)
    model = tiny_model(cohort)
    interp = fastattr.IntegratedGradients(model, steps=3) if method == "ig" else fastattr.CheferRelevance(model)
    dataset = CohortDataset(cohort)
    plain = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=False, collate_fn=CohortDataset.collate)
    attribute_dataset(interp, plain, tmp_path / "plain", sort_by_length=False)
    counted = Counted(interp)
    attribute_dataset(counted, plain, tmp_path / "sorted", sort_by_length=True)
    run_forwards, counted.forwards = counted.forwards, 0
    for batch in LengthSortedBatches(dataset, model, batch_size=5, collate_fn=CohortDataset.collate):
        interp.attribute(**batch)
    # the run adds no forward for the stored probabilities; its padding probe is three no-grad forwards (the
    # first PADDING_PROBE_SAMPLES patients as collated, their codes padded further, and trimmed)
    assert len(probe_forwards) == 3 and run_forwards == counted.forwards + len(probe_forwards)
    a, b = load_attributions(tmp_path / "plain"), load_attributions(tmp_path / "sorted")
    assert a.patient_ids == b.patient_ids == [f"P{i:08d}" for i in range(23)]
    manifest_widths = {b[i]["attr/codes"].shape[0] for i in range(23)}
    assert len(manifest_widths) > 1, "sorted batches are padded to different widths"
    for i in range(23):
        x, y = a[i]["attr/codes"], b[i]["attr/codes"]
        n = min(len(x), len(y))
        torch.testing.assert_close(y[:n], x[:n], rtol=1e-5, atol=1e-6)
        assert not x[n:].any() and not y[n:].any()  # beyond the shorter width: padding, exact zeros
        torch.testing.assert_close(a[i]["probability"], b[i]["probability"], rtol=1e-5, atol=1e-6)
        assert torch.equal(a[i]["target"], b[i]["target"])
    full = b.all()["attr/codes"]
    assert full.shape[0] == 23 and torch.equal(full[7, : len(b[7]["attr/codes"])], b[7]["attr/codes"])
    # deterministic: resuming the sorted run finds every batch done and the same ids
    attribute_dataset(interp, plain, tmp_path / "sorted", sort_by_length=True)
    same_runs(tmp_path / "sorted", tmp_path / "sorted")


@pytest.mark.parametrize("pack", [False, "auto"])
def test_no_extra_forward_for_probabilities(tmp_path, pack, monkeypatch, probe_forwards):
    monkeypatch.setitem(packing.GROUP_COST["chefer"], "cpu", 0.0)  # length groups wherever lengths differ
    cohort = SyntheticCohort(patients=12, seed=2)
    chefer = fastattr.CheferRelevance(tiny_model(cohort), pack_lengths=pack)
    counted = Counted(chefer)
    passes = []
    original = chefer._pass
    chefer._pass = lambda *a, **k: passes.append(1) or original(*a, **k)
    checks = []
    logits = chefer_module.input_logits
    monkeypatch.setattr(chefer_module, "input_logits", lambda *a, **k: checks.append(1) or logits(*a, **k))
    attribute_dataset(counted, loader(cohort, batch_size=4), tmp_path)
    # Chefer's own forwards only: its passes and its padding checks (no-grad forwards of trimmed groups), and the
    # run's padding probe before it sorts (three no-grad forwards of the first patients: once per run)
    assert len(probe_forwards) == 3 and counted.forwards == len(passes) + len(checks) + len(probe_forwards)
    if pack is False:
        assert len(passes) == 3 and not checks  # one per batch
    else:
        assert len(passes) > 3 and checks  # groups of each batch, and the padded batch once for the padding check


def test_length_sorted_batches_by_tokens():
    cohort = SyntheticCohort(patients=40, seed=9, lengths="lognormal", median_codes=8, longest=60)
    model = tiny_model(cohort)
    batches = LengthSortedBatches(CohortDataset(cohort), model, batch_tokens=64, collate_fn=CohortDataset.collate)
    listed = list(batches.with_positions())
    assert sorted(i for p, _ in listed for i in p) == list(range(40))
    for members, batch in listed:
        assert batch["codes"].shape[0] == len(members)
        assert len(members) == 1 or batch["codes"].numel() <= 64 + 3 * (2 + 4)  # distractors/pairs may add codes
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        LengthSortedBatches(CohortDataset(cohort), model)
    with pytest.raises(ValueError, match="batch_tokens"):
        LengthSortedBatches(CohortDataset(cohort), model, batch_tokens=0)


class CountsReads(torch.utils.data.Dataset):
    """A map-style dataset that counts how often each sample is read."""

    def __init__(self, inner):
        self.inner, self.reads = inner, {}

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads[i] = self.reads.get(i, 0) + 1
        return self.inner[i]


@pytest.mark.parametrize("method", ["ig", "chefer"])
def test_runs_sort_by_length_by_default_reading_each_sample_once(tmp_path, method):
    cohort = SyntheticCohort(patients=41, seed=12, lengths="lognormal", median_codes=6, longest=60)
    model = tiny_model(cohort)
    interp = fastattr.IntegratedGradients(model, steps=3) if method == "ig" else fastattr.CheferRelevance(model)
    dataset = CountsReads(CohortDataset(cohort))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=CohortDataset.collate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sortable loader: no note
        attribute_dataset(interp, loader, tmp_path / "default")
    assert dataset.reads == dict.fromkeys(range(41), 1), "every sample read exactly once"
    attribute_dataset(interp, loader, tmp_path / "plain", sort_by_length=False)
    sorted_run, plain = load_attributions(tmp_path / "default"), load_attributions(tmp_path / "plain")
    assert sorted_run.info["batching"] == {"sorted": True, "batch_size": 8, "batch_tokens": None,
                                           "window": LengthSortedBatches(dataset, model, batch_size=8).window}
    assert plain.info["batching"] == {"sorted": False}
    widths = [e["patients"] for e in sorted_run.shards.values()]
    assert sum(widths) == 41 and max(widths) == 8
    assert sorted_run.patient_ids == plain.patient_ids
    for i in range(41):
        x, y = sorted_run[i]["attr/codes"], plain[i]["attr/codes"]
        n = min(len(x), len(y))
        torch.testing.assert_close(x[:n], y[:n], rtol=1e-5, atol=1e-6)
        assert not x[n:].any() and not y[n:].any()
    padded = {name: load_attributions(tmp_path / "default").shards[name] for name in sorted_run.shards}
    assert len(padded) == 6


def test_a_batch_size_one_loader_is_rebatched_by_tokens_and_resumed_as_cut(tmp_path, monkeypatch):
    from fastattr import cohort as runner

    monkeypatch.setitem(runner.COHORT_BATCH_TOKENS, "cpu", 40)
    cohort = SyntheticCohort(patients=30, seed=13, lengths="lognormal", median_codes=6, longest=30)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    one = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=1, collate_fn=CohortDataset.collate)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(FailsAt(ig, 2), one, tmp_path / "run", progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["batching"]["batch_tokens"] == 40 and info["batching"]["batch_size"] is None
    monkeypatch.setitem(runner.COHORT_BATCH_TOKENS, "cpu", 4096)  # another default now: the run resumes as cut
    attribute_dataset(ig, one, tmp_path / "run", progress=False)
    store = load_attributions(tmp_path / "run")
    assert len(store) == 30 and 2 < len(store.shards) < 30
    for entry in store.shards.values():
        with safe_open(tmp_path / "run" / entry["file"], framework="pt") as f:
            codes = f.get_tensor("input/codes")
        assert codes.shape[0] == 1 or codes.numel() <= 40
    attribute_dataset(ig, torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=30,
                                                      collate_fn=CohortDataset.collate), tmp_path / "whole",
                      sort_by_length=False)
    whole = load_attributions(tmp_path / "whole")
    for i in range(30):
        x, y = store[i]["attr/codes"], whole[i]["attr/codes"]
        torch.testing.assert_close(x, y[: len(x)], rtol=1e-5, atol=1e-6)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, cohort):
        self.cohort = cohort

    def __iter__(self):
        data = CohortDataset(self.cohort)
        return (data[i] for i in range(len(data)))


@pytest.mark.parametrize("kind", ["iterable", "shuffled", "list"])
def test_loaders_that_cannot_be_sorted_keep_their_order_and_say_so_once(tmp_path, kind):
    cohort = SyntheticCohort(patients=12, seed=14)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    if kind == "iterable":
        loader = torch.utils.data.DataLoader(Stream(cohort), batch_size=4, collate_fn=CohortDataset.collate)
        why = "iterable dataset"
    elif kind == "shuffled":
        loader = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=4, shuffle=True,
                                             collate_fn=CohortDataset.collate)
        why = "sampler of its own"
    else:
        loader = [CohortDataset.collate([CohortDataset(cohort)[i] for i in range(j, j + 4)]) for j in (0, 4, 8)]
        why = "not a torch DataLoader"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attribute_dataset(ig, loader, tmp_path / "run", progress=False)
    notes = [str(w.message) for w in caught if "not sorted by length" in str(w.message)]
    assert len(notes) == 1 and why in notes[0]
    assert load_attributions(tmp_path / "run").info["batching"] == {"sorted": False}
    with pytest.raises(ValueError, match=why):
        attribute_dataset(ig, loader, tmp_path / "strict", sort_by_length=True)
    with pytest.raises(ValueError, match="sort_by_length must be"):
        attribute_dataset(ig, loader, tmp_path / "bad", sort_by_length="yes")
    with pytest.raises(ValueError, match="batch_tokens applies only"):
        attribute_dataset(ig, loader, tmp_path / "bad", sort_by_length=False, batch_tokens=64)


def test_a_run_begun_in_the_loaders_order_resumes_in_it(tmp_path):
    # begun with sort_by_length=False (or by a fastattr that did not sort), resumed with the
    # defaults: the same batches, not a new length-sorted cut the interrupted shards do not match
    cohort = SyntheticCohort(patients=30, seed=15, lengths="lognormal", median_codes=6, longest=40)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(FailsAt(ig, 2), loader(cohort, batch_size=6), tmp_path / "run", sort_by_length=False,
                          progress=False)
    resumed = FailsAt(ig, 100)
    attribute_dataset(resumed, loader(cohort, batch_size=6), tmp_path / "run", progress=False)
    assert resumed.calls == 3 and load_attributions(tmp_path / "run").info["batching"] == {"sorted": False}
    attribute_dataset(ig, loader(cohort, batch_size=6), tmp_path / "whole", sort_by_length=False, progress=False)
    same_runs(tmp_path / "run", tmp_path / "whole")


def padding_run(method: str, seed: int):
    """A model whose output depends on the padding of 'labs' (bias-embedded, attended where padded), its
    interpreter, and samples of unequal lengths counted as read."""
    model = sensitive_model(seed=seed)
    interp = fastattr.IntegratedGradients(model, steps=3) if method == "ig" else fastattr.CheferRelevance(model)
    return interp, CountsReads(Patients(23, seed=seed))


def patients_loader(data, batch_size: int = 5) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=patients_collate)


def padding_notes(caught) -> list[str]:
    return [str(w.message) for w in caught if "depends on the padding" in str(w.message)]


def assert_loader_results(store, interp, loader) -> None:
    """Each stored row is bitwise the interpreter's result for its patient in the loader's own batch."""
    position = 0
    for batch in loader:
        expected = interp.attribute(**batch)
        for j in range(batch["codes"].shape[0]):
            row = store[position]
            for key, value in expected.items():
                got = row[f"attr/{key}"]
                assert torch.equal(got, value[j][tuple(slice(0, n) for n in got.shape)]), (position, key)
            position += 1
    assert position == len(store)


@pytest.mark.parametrize("method", ["ig", "chefer"])
def test_a_model_that_depends_on_padding_keeps_the_loaders_batches_by_default(tmp_path, method):
    interp, data = padding_run(method, seed=21)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attribute_dataset(interp, patients_loader(data), tmp_path / "default", progress=False)
    # one warning of the batching, and the model's own report once (in it, or the interpreter's during the probe)
    assert sum("keep the loader's order and size" in str(w.message) for w in caught) == 1
    assert len(padding_notes(caught)) == 1 and MATCH_LABS in padding_notes(caught)[0]
    assert data.reads == dict.fromkeys(range(23), 1), "every sample read exactly once, the probe's included"
    store = load_attributions(tmp_path / "default")
    assert store.info["batching"] == {"sorted": False, "batch_dependent": True, "batch_size": 5,
                                      "order": "the loader's, as given", "padding_dependent": ["labs"],
                                      "padding": "each batch as the loader pads it (test_row_shapes.collate)"}
    assert [e["patients"] for e in store.shards.values()] == [5, 5, 5, 5, 3]
    assert_loader_results(store, interp, patients_loader(data))
    # interrupted (after the probe's calls of the method, two batches), then resumed with the defaults: the
    # loader's batches again, no probe, the record kept
    probe_calls = 1 + padding_probe.CONFIRM_ALONE
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="keep the loader's order and size"):
        attribute_dataset(FailsAt(interp, probe_calls + 2), patients_loader(data), tmp_path / "run", progress=False)
    assert len(list((tmp_path / "run").glob("shard-*"))) == 2
    resumed = FailsAt(interp, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribute_dataset(resumed, patients_loader(data), tmp_path / "run", progress=False)
    assert resumed.calls == 3
    assert load_attributions(tmp_path / "run").info["batching"] == store.info["batching"]
    same_runs(tmp_path / "run", tmp_path / "default")
    with pytest.raises(ValueError, match="batches of 5 patients and its model's output depends on padding.*not 4"):
        attribute_dataset(interp, patients_loader(data, 4), tmp_path / "run", progress=False)


def test_sort_by_length_true_sorts_a_model_that_depends_on_padding_and_says_so(tmp_path):
    interp, data = padding_run("ig", seed=22)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attribute_dataset(interp, patients_loader(data), tmp_path / "sorted", sort_by_length=True, progress=False)
    assert sum("sort_by_length=True sorts" in str(w.message) for w in caught) == 1
    assert len(padding_notes(caught)) == 1 and MATCH_LABS in padding_notes(caught)[0]
    assert data.reads == dict.fromkeys(range(23), 1)
    batching = load_attributions(tmp_path / "sorted").info["batching"]
    assert batching["sorted"] is True and batching["batch_dependent"] is True
    assert batching["padding_dependent"] == ["labs"] and batching["order"].startswith("sorted by length")
    attribute_dataset(interp, patients_loader(data), tmp_path / "plain", sort_by_length=False, progress=False)
    sorted_run, plain = load_attributions(tmp_path / "sorted").all(), load_attributions(tmp_path / "plain").all()
    assert_loader_results(load_attributions(tmp_path / "plain"), interp, patients_loader(data))
    # not vacuous: sorting gives some patient other neighbours, and other values
    assert any(rel_err(sorted_run[k], plain[k]) > 1e-3 for k in ("attr/codes", "attr/labs"))
    with pytest.raises(ValueError, match="batch_tokens cuts batches sorted by length.*depend on the padding of 'labs'"):
        attribute_dataset(interp, patients_loader(data), tmp_path / "tokens", batch_tokens=64, progress=False)


def test_a_batch_size_one_loader_keeps_one_patient_per_batch_for_a_model_that_depends_on_padding(tmp_path):
    interp, data = padding_run("ig", seed=23)
    one = patients_loader(data, 1)
    with pytest.warns(UserWarning, match="keep the loader's order and size"):
        attribute_dataset(interp, one, tmp_path, progress=False)
    store = load_attributions(tmp_path)
    assert store.info["batching"]["batch_size"] == 1 and store.info["batching"]["sorted"] is False
    assert len(store.shards) == 23 and data.reads == dict.fromkeys(range(23), 1)
    assert_loader_results(store, interp, one)


class InfersMaskUnlessGiven(InfersMaskFromEmbeddings):
    """PyHealth's StageNet's and Transformer's rule: a mask given with a feature is used, else one is
    inferred from the embeddings. Called as a batch gives it (no masks: the user, Chefer, the evaluator)
    it attends the padded rows of its bias-embedded 'labs'; IG calls it with each feature's mask."""

    inferring = False

    def forward(self, **batch):
        self.inferring = bool(FeatureBatch.from_batch(self, batch).appended)  # no mask given
        try:
            return super().forward(**batch)
        finally:
            self.inferring = False

    def _tokens(self, key, feature):
        return super()._tokens(key, feature) if self.inferring else TransformerClassifier._tokens(self, key, feature)


def test_the_methods_values_decide_whether_a_model_that_depends_on_padding_is_sorted(tmp_path):
    model = sensitive_model(InfersMaskUnlessGiven, seed=24)
    data = Patients(23, seed=24)
    assert fastattr.check_padding(model, patients_collate([data[i] for i in range(8)])).features == ("labs",)
    ig = fastattr.IntegratedGradients(model, steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # IG's values ignore the padding its masks cover: sorted, no warning
        attribute_dataset(ig, patients_loader(data), tmp_path / "ig", progress=False)
    attribute_dataset(ig, patients_loader(data), tmp_path / "ig-plain", sort_by_length=False, progress=False)
    sorted_run, plain = load_attributions(tmp_path / "ig"), load_attributions(tmp_path / "ig-plain")
    assert sorted_run.info["batching"] == {"sorted": True, "batch_size": 5, "batch_tokens": None,
                                           "window": fastattr.cohort.SORT_WINDOW}
    for i in range(23):
        for key in ("attr/codes", "attr/labs"):
            torch.testing.assert_close(sorted_run[i][key], plain[i][key], rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="keep the loader's order and size") as caught:
        attribute_dataset(fastattr.CheferRelevance(model), patients_loader(data), tmp_path / "chefer", progress=False)
    assert len(padding_notes(caught)) == 1
    assert load_attributions(tmp_path / "chefer").info["batching"]["padding_dependent"] == ["labs"]


@pytest.mark.parity
def test_pyhealth_transformer_with_vitals_keeps_the_loaders_batches_for_chefer_and_sorts_for_ig(tmp_path):
    # PyHealth's Transformer infers the attention mask of a feature given without one from its embeddings: the
    # padded steps of the bias-embedded 'vitals' are attended when the model runs as the batch gives it (PyHealth's
    # and fastattr's Chefer), not when the interpreter passes the masks (IG)
    import pyhealth_cases
    from pyhealth.interpret.methods import CheferRelevance as PyHealthChefer

    model, loader = pyhealth_cases.build_loader("stagenet", "Transformer", num_classes=2, n=23, batch=5, seed=5,
                                                embedding_dim=16, heads=2, num_layers=1)
    model.eval()
    with pytest.warns(UserWarning, match="keep the loader's order and size.*padding of 'vitals'"):
        attribute_dataset(fastattr.CheferRelevance(model), loader, tmp_path / "chefer", progress=False)
    store = load_attributions(tmp_path / "chefer")
    assert store.info["batching"]["sorted"] is False and store.info["batching"]["padding_dependent"] == ["vitals"]
    theirs, position = PyHealthChefer(model), 0
    for batch in loader:
        expected = theirs.attribute(**batch)
        for j in range(len(batch["patient_id"])):
            for key, value in expected.items():
                got = store[position][f"attr/{key}"]
                torch.testing.assert_close(got, value[j][tuple(slice(0, n) for n in got.shape)], rtol=1e-5, atol=1e-6)
            position += 1
    ig = fastattr.IntegratedGradients(model, steps=4)
    attribute_dataset(ig, loader, tmp_path / "ig", progress=False)
    attribute_dataset(ig, loader, tmp_path / "ig-plain", progress=False, sort_by_length=False)
    sorted_run, plain = load_attributions(tmp_path / "ig"), load_attributions(tmp_path / "ig-plain")
    assert sorted_run.info["batching"]["sorted"] is True and "padding_dependent" not in sorted_run.info["batching"]
    for i in range(23):
        for key in ("attr/codes", "attr/vitals"):
            torch.testing.assert_close(sorted_run[i][key], plain[i][key], rtol=1e-5, atol=1e-6)

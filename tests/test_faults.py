"""Faults a cohort run meets, with real processes and real files: a second writer of the same run,
a writer killed with SIGKILL, journal lines that are not ours, a shard replaced under the run,
and a full disk. What the user sees is part of each test."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, tiny_model

import fastattr
from fastattr.cohort import attribute_dataset, load_attributions
from fastattr.demo.models import load_checkpoint
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort
from fastattr.runs import DiskFullError, RunLockedError, ShardStore
from fastattr.runs import writer as run_writer


def loader(cohort, batch_size=8):
    return torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=batch_size, collate_fn=CohortDataset.collate)


def same_as_direct(run: Path, checkpoint: Path, size: int, steps: int, rows=(0, 1, 2, 3)) -> None:
    """Every shard verifies; the given patients' attributions equal a direct call's."""
    store = load_attributions(run)
    assert len(store) == size and store.complete
    store.all()  # reads (and checks) every shard
    model, extra = load_checkpoint(checkpoint)
    cohort = SyntheticCohort(**{**extra["cohort"], "patients": size})
    ig = fastattr.IntegratedGradients(model, steps=steps)
    for i in rows:
        direct = ig.attribute(**cohort.batch([i], pad_to_longest=True))["codes"][0]
        got = store[i]["attr/codes"]
        torch.testing.assert_close(got[: len(direct)], direct, rtol=1e-5, atol=1e-6)
        assert not got[len(direct):].any()


# -- one writer per run --------------------------------------------------------------------------

def test_a_second_writer_of_a_rank_fails_at_once_naming_the_holder(tmp_path):
    first = ShardStore(tmp_path, 0, 1)
    first.lock()
    second = ShardStore(tmp_path, 0, 1)
    with pytest.raises(RunLockedError, match=f"rank 0 is held by process {os.getpid()} on host"):
        second.lock()
    ShardStore(tmp_path, 1, 2).lock  # noqa: B018 (another rank of a 2-process run is another lock...)
    with pytest.raises(RunLockedError, match="another fastattr run with 1 processes"):
        ShardStore(tmp_path, 1, 2).lock()  # ...but a run with another number of processes may not join
    first.release()
    second.lock()  # free again
    second.release()


def test_ranks_of_one_run_hold_their_own_locks(tmp_path):
    ranks = [ShardStore(tmp_path, r, 3) for r in range(3)]
    for s in ranks:
        s.lock()
    holders = [json.loads((tmp_path / f".lock.rank{r}").read_text()) for r in range(3)]
    assert [h["rank"] for h in holders] == [0, 1, 2] and {h["world"] for h in holders} == {3}
    for s in ranks:
        s.release()


def test_the_cli_refuses_a_folder_another_run_holds(tmp_path, checkpoint):
    holder = ShardStore(tmp_path / "run", 0, 1)
    (tmp_path / "run").mkdir()
    holder.lock()
    try:
        done = cli("attribute", "--size", 20, "--steps", 2, "--checkpoint", checkpoint, "--out", tmp_path / "run")
    finally:
        holder.release()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "run") in lines[0] and f"process {os.getpid()}" in lines[0]
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_two_real_writers_then_a_sigkill_then_the_resume(tmp_path, checkpoint):
    run = tmp_path / "run"
    command = ["attribute", "--size", 6000, "--steps", 20, "--checkpoint", checkpoint, "--out", run]
    first = subprocess.Popen([sys.executable, "-m", "fastattr", *map(str, command)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # until the first writer holds the run and has finished a shard
            journal = run / "manifest.rank0.jsonl"
            if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        second = cli(*command)
        assert first.poll() is None, "the first writer must still be running while the second one starts"
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"process {first.pid} on host" in lines[0] and str(run) in lines[0]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert not (run / "manifest.json").exists()
    resumed = cli(*command)  # a killed writer's lock went with it
    assert resumed.returncode == 0, resumed.stderr
    same_as_direct(run, checkpoint, 6000, 20, rows=(0, 1, 2, 5999))


# -- journals, and shards replaced under a run ---------------------------------------------------------

class StopsAfter:
    def __init__(self, inner, batches):
        self.inner, self.model, self.left = inner, inner.model, batches

    @property
    def last_predictions(self):
        return self.inner.last_predictions

    def attribute(self, **batch):
        if self.left == 0:
            raise KeyboardInterrupt("stopped")
        self.left -= 1
        return self.inner.attribute(**batch)


def test_journal_lines_that_are_not_ours_are_skipped_and_their_shards_redone(tmp_path):
    cohort = SyntheticCohort(patients=40, seed=6)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(StopsAfter(ig, 3), loader(cohort), tmp_path / "run", progress=False)
    journal = tmp_path / "run" / "manifest.rank0.jsonl"
    lines = journal.read_bytes().split(b"\n")[1:-1]  # drop the format line: a journal another writer began
    journal.write_bytes(b"\n".join([lines[0], b'{"note": "not ours"}', b"[1, 2]", b"garbage", lines[2],
                                    lines[1].replace(b'"batch": 1', b'"batch": "one"')]) + b"\n")
    resumed = StopsAfter(ig, 100)
    attribute_dataset(resumed, loader(cohort), tmp_path / "run", progress=False)
    assert resumed.left == 100 - 3, "batches 0 and 2 are kept; 1 (its line was not ours) and 3, 4 are redone"
    attribute_dataset(ig, loader(cohort), tmp_path / "clean", progress=False)
    a, b = load_attributions(tmp_path / "run").all(), load_attributions(tmp_path / "clean").all()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    journal.write_text(json.dumps({"format": "something-else/2"}) + "\n")
    with pytest.raises(ValueError, match="not a fastattr attribution journal"):
        attribute_dataset(ig, loader(cohort), tmp_path / "run", progress=False)


class ReplacesAShard:
    """Attributes batches; before the last one, another process's bytes replace shard 0."""

    def __init__(self, inner, out, last):
        self.inner, self.model, self.out, self.last, self.calls = inner, inner.model, out, last, 0

    @property
    def last_predictions(self):
        return self.inner.last_predictions

    def attribute(self, **batch):
        self.calls += 1
        if self.calls == self.last:
            journal = self.out / "manifest.rank0.jsonl"
            while b"shard-00000000" not in journal.read_bytes():  # shards are written behind the attribution
                time.sleep(0.01)
            shard = self.out / "shard-00000000.safetensors"
            other = bytearray(shard.read_bytes())
            other[-2] ^= 0x55
            tmp = shard.with_name("elsewhere")
            tmp.write_bytes(bytes(other))
            os.replace(tmp, shard)
        return self.inner.attribute(**batch)


def test_a_manifest_never_names_bytes_another_process_replaced(tmp_path):
    cohort = SyntheticCohort(patients=24, seed=7)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    with pytest.raises(RuntimeError, match="replaced by another process after this run wrote them"):
        attribute_dataset(ReplacesAShard(ig, tmp_path / "run", 3), loader(cohort), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert (tmp_path / "run" / "manifest.rank0.jsonl").exists(), "the journal stays for the resume"
    with pytest.warns(UserWarning, match="shard-00000000.safetensors is missing or corrupt"):
        attribute_dataset(ig, loader(cohort), tmp_path / "run", progress=False)
    attribute_dataset(ig, loader(cohort), tmp_path / "clean", progress=False)
    a, b = load_attributions(tmp_path / "run").all(), load_attributions(tmp_path / "clean").all()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- a full disk -------------------------------------------------------------------------------------

def test_a_full_disk_leaves_no_temporary_file_and_the_run_resumes(tmp_path, monkeypatch):
    cohort = SyntheticCohort(patients=40, seed=8)
    ig = fastattr.IntegratedGradients(tiny_model(cohort), steps=2)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 6:  # the 3rd shard's bytes (journal, run.json, then a shard and its line each)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(run_writer.os, "fsync", fsync)
    with pytest.raises(DiskFullError) as caught:
        attribute_dataset(ig, loader(cohort), tmp_path / "run", progress=False)
    message = str(caught.value)
    assert str(tmp_path / "run") in message and "disk is full" in message and "run the same command again" in message
    assert not list((tmp_path / "run").glob("*.tmp*")), "no temporary file is left behind"
    monkeypatch.setattr(run_writer.os, "fsync", real_fsync)
    attribute_dataset(ig, loader(cohort), tmp_path / "run", progress=False)
    attribute_dataset(ig, loader(cohort), tmp_path / "clean", progress=False)
    a, b = load_attributions(tmp_path / "run").all(), load_attributions(tmp_path / "clean").all()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _private_tmpfs_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _private_tmpfs_works(), reason="needs unshare and a private tmpfs mount (user namespaces)")
def test_the_cli_on_a_600_kb_disk_says_so_in_one_line_and_a_copy_resumes(tmp_path, checkpoint):
    # A real process on a real, private 600 KB tmpfs; then the folder is copied to a larger disk
    # and the same command finishes it there.
    mount, copy = tmp_path / "small", tmp_path / "big"
    mount.mkdir()
    command = [sys.executable, "-m", "fastattr", "attribute", "--size", "3000", "--steps", "5", "--checkpoint",
               str(checkpoint)]
    script = (f"mount -t tmpfs -o size=600k tmpfs {mount} && {' '.join(command)} --out {mount}/run; "
              f"echo rc=$? >&2; cp -r {mount}/run {copy}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("rc=")]
    assert "rc=2" in done.stderr, done.stderr
    assert len(lines) == 1 and "the disk is full" in lines[0] and f"{mount}/run" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not list(copy.glob("*.tmp*")) and list(copy.glob("shard-*.safetensors"))
    resumed = subprocess.run(command + ["--out", str(copy)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    same_as_direct(copy, checkpoint, 3000, 5, rows=(0, 1, 2999))

"""Faithfulness of whole stored runs (fastattr evaluate / fastattr.report.scores.evaluate_run): each
patient scored as PyHealth's Evaluator scores a batch of one, stored checksummed and resumable, one
writer at a time, carried by the tables and the report. Real processes and files for the faults."""
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import cli

import fastattr
from fastattr.cohort import attribute_dataset
from fastattr.demo.models import load_checkpoint
from fastattr.demo.synthetic import CohortDataset, SyntheticCohort
from fastattr.metrics import Evaluator, threshold_sample_filter
from fastattr.report.page import write_report
from fastattr.report.scores import evaluate_run, load_scores
from fastattr.runs import RunLockedError, tables

EVERYONE = threshold_sample_filter(0.0)  # every binary sample scored (an untrained model predicts few positive)


def attributed(tmp_path, checkpoint, size=30, method="chefer", batch_size=8):
    model, extra = load_checkpoint(checkpoint)
    cohort = SyntheticCohort(**{**extra["cohort"], "patients": size, "lengths": "lognormal", "median_codes": 6,
                                "longest": 25})
    loader = torch.utils.data.DataLoader(CohortDataset(cohort), batch_size=batch_size, collate_fn=CohortDataset.collate)
    interpreter = fastattr.CheferRelevance(model) if method == "chefer" else \
        fastattr.IntegratedGradients(model, steps=4)
    run = tmp_path / method
    attribute_dataset(interpreter, loader, run, progress=False, vocab={"codes": cohort.names})
    return model, run


def test_each_patient_scored_as_pyhealths_evaluator_with_a_batch_of_one(tmp_path, checkpoint):
    model, run = attributed(tmp_path, checkpoint)
    scores = evaluate_run(run, model, sample_filter=EVERYONE, progress=False)
    store = fastattr.load_attributions(run)
    evaluator = Evaluator(model, sample_filter=EVERYONE)
    assert len(scores) == len(store) == 30
    for i in range(len(store)):
        row, got = store[i], scores[i]
        own = int(row["keep/codes"].nonzero().max()) + 1
        ref = evaluator.evaluate({"codes": row["input/codes"][:own][None]},
                                 {"codes": row["attr/codes"][:own][None].float()}, return_per_percentage=True)
        for metric, drops in ref.items():
            expected = torch.stack([drops[p][0] for p in (1, 5, 10, 20, 50)])
            torch.testing.assert_close(got[f"drops/{metric}"], expected, rtol=0, atol=1e-6)
            assert abs(got[metric] - expected.sum() / 5) <= 1e-6
        assert bool(got["valid"]) and torch.isfinite(got["random/comprehensiveness"]).all()


def test_tables_and_the_report_carry_the_scores(tmp_path, checkpoint):
    model, run = attributed(tmp_path, checkpoint)
    assert load_scores(run) is None
    scores = evaluate_run(run, model, sample_filter=EVERYONE, progress=False).all()
    frame = fastattr.load_attributions(run).to_dataframe()
    for i in (0, 7):
        assert (frame[frame["sample"] == i]["comprehensiveness"] == scores["comprehensiveness"][i].item()).all()
    summary = tables.summarize(run)
    assert {"mean_comprehensiveness", "mean_sufficiency"} <= set(summary.columns)
    assert summary["mean_comprehensiveness"].notna().all()
    page = write_report(run, tmp_path / "report.html").read_text()
    assert "<h2>Faithfulness</h2>" in page and page.count("data:image/png;base64,") >= 2


def test_a_run_without_inputs_cannot_be_scored(tmp_path, checkpoint):
    model, run = attributed(tmp_path, checkpoint, size=8)
    model.feature_keys = ["codes", "labs"]
    with pytest.raises(ValueError, match=r"does not keep the inputs of feature\(s\) \['labs'\]"):
        evaluate_run(run, model, progress=False)


SLOW_SCORER = """
import sys, time
import fastattr.report.scores as scores
from fastattr.demo.models import load_checkpoint
inner = scores._score_shard
def slow(*args):
    time.sleep(float(sys.argv[3]))
    return inner(*args)
scores._score_shard = slow
model, _ = load_checkpoint(sys.argv[2])
scores.evaluate_run(sys.argv[1], model, progress=False)
"""


def _journal_lines(run) -> int:
    path = run / "faithfulness" / "manifest.rank0.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_killed_scoring_resumes_and_a_second_writer_is_refused(tmp_path, checkpoint):
    model, run = attributed(tmp_path, checkpoint, size=40, batch_size=4)
    # 2 s a shard (10 shards): the child still holds the run while a second process starts and is refused
    # (at 0.3 s a slow interpreter start let the child finish first on CI)
    child = subprocess.Popen([sys.executable, "-c", SLOW_SCORER, str(run), str(checkpoint), "2.0"])
    try:
        deadline = time.time() + 120
        while _journal_lines(run) < 3 and time.time() < deadline:  # the format line and two shards
            time.sleep(0.05)
        assert _journal_lines(run) >= 3, "the scoring process wrote no shard"
        with pytest.raises(RunLockedError, match="being written by another fastattr run"):
            evaluate_run(run, model, progress=False)
        done = cli("evaluate", run, "--checkpoint", checkpoint)
        assert child.poll() is None, "the scoring process ended before the second writer was tried"
        assert done.returncode == 2 and done.stderr.startswith("fastattr evaluate: ") and \
            len(done.stderr.strip().splitlines()) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    resumed = evaluate_run(run, model, progress=False).all()
    fresh_run = tmp_path / "fresh"
    fresh_run.mkdir()
    for path in run.iterdir():
        if path.is_file():
            (fresh_run / path.name).write_bytes(path.read_bytes())
    fresh = evaluate_run(fresh_run, model, progress=False).all()
    assert set(resumed) == set(fresh)
    for key, value in fresh.items():
        assert torch.equal(resumed[key], value), key


def test_the_cli_scores_a_run_and_names_its_errors(tmp_path, checkpoint):
    _, run = attributed(tmp_path, checkpoint, size=12)
    done = cli("evaluate", run, "--checkpoint", checkpoint, "--percentages", "10", "50")
    assert done.returncode == 0, done.stderr
    assert "patients of" in done.stdout and (run / "faithfulness" / "manifest.json").exists()
    assert load_scores(run)[0]["drops/comprehensiveness"].shape == (2,)
    again = cli("evaluate", run, "--checkpoint", checkpoint, "--no-resume")
    assert again.returncode == 2 and "already holds faithfulness scores" in again.stderr
    missing = cli("evaluate", tmp_path / "nothing", "--checkpoint", checkpoint)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    bad = cli("evaluate", run, "--checkpoint", checkpoint, "--percentages", "0")
    assert bad.returncode == 2 and "--percentages" in bad.stderr

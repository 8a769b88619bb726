"""A run's rows against PyHealth's own batch-of-one output: one shape and the same values for every
sample, whether the run was sorted by length, rebatched from a loader of batch size 1, kept in the
loader's order, or split over two torchrun processes."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastattr

pytestmark = pytest.mark.parity

CASES = {  # kind, model, classes, model kwargs, interpreter
    "flat-ig": ("seq", "Transformer", 3, dict(embedding_dim=16, heads=2, num_layers=2), "ig"),
    "flat-chefer": ("seq", "Transformer", 3, dict(embedding_dim=16, heads=2, num_layers=2), "chefer"),
    "nested-ig": ("nested", "Transformer", 2, dict(embedding_dim=16, heads=2, num_layers=1), "ig"),
    "nested-chefer": ("nested", "Transformer", 2, dict(embedding_dim=16, heads=2, num_layers=1), "chefer"),
    "stagenet-ig": ("stagenet", "StageNet", 2, dict(embedding_dim=16, chunk_size=16, levels=2), "ig"),
}
STEPS = 6


def build(name: str, n: int = 34, batch: int = 16):
    import pyhealth_cases

    kind, model_name, classes, kwargs, _ = CASES[name]
    return pyhealth_cases.build_loader(kind, model_name, num_classes=classes, n=n, batch=batch, seed=11, **kwargs)


def interpreters(name: str, model):
    from pyhealth.interpret.methods import CheferRelevance, IntegratedGradients

    if CASES[name][4] == "ig":
        return fastattr.IntegratedGradients(model, steps=STEPS), IntegratedGradients(model)
    return fastattr.CheferRelevance(model), CheferRelevance(model)


def pyhealth_batch_of_one(name: str, model, theirs) -> list[dict[str, torch.Tensor]]:
    from pyhealth.datasets import get_dataloader

    kwargs = {"steps": STEPS} if CASES[name][4] == "ig" else {}
    return [{k: v[0].detach() for k, v in theirs.attribute(**kwargs, **batch).items()}
            for batch in get_dataloader(model.dataset, batch_size=1, shuffle=False)]


def assert_rows(store, expected: list[dict[str, torch.Tensor]], where: str) -> None:
    assert len(store) == len(expected)
    for i, reference in enumerate(expected):
        row = store[i]
        for key, value in reference.items():
            got = row[f"attr/{key}"]
            assert got.shape == value.shape, f"{where}: sample {i}, {key}: {tuple(got.shape)} != {tuple(value.shape)}"
            torch.testing.assert_close(got, value, rtol=1e-4, atol=2e-6, msg=f"{where}: sample {i}, {key}")


@pytest.mark.parametrize("name", list(CASES))
def test_rows_equal_pyhealths_batch_of_one_whatever_the_batching(tmp_path, name):
    from pyhealth.datasets import get_dataloader

    model, loader = build(name)
    ours, theirs = interpreters(name, model)
    expected = pyhealth_batch_of_one(name, model, theirs)
    shapes = {tuple(v.shape) for row in expected for v in row.values()}
    assert len(shapes) > 4, "the cohort's samples must differ in shape"
    runs = {"sorted": (loader, {}),
            "rebatched from batch size 1": (get_dataloader(model.dataset, batch_size=1, shuffle=False),
                                            {"batch_tokens": 60}),
            "in order": (loader, {"sort_by_length": False})}
    for where, (source, kwargs) in runs.items():
        out = tmp_path / where.replace(" ", "-")
        fastattr.attribute_dataset(ours, source, out, progress=False, **kwargs)
        store = fastattr.load_attributions(out)
        assert store.info["batching"]["sorted"] is (where != "in order")
        assert_rows(store, expected, where)


TORCHRUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import fastattr, pyhealth_cases
    model, loader = pyhealth_cases.build_loader({kind!r}, {model!r}, num_classes={classes}, n=34, batch=16, seed=11,
                                                **{kwargs!r})
    fastattr.attribute_dataset(fastattr.IntegratedGradients(model, steps={steps}), loader, sys.argv[1],
                               progress=False)
""")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flat-ig", "nested-ig"])
def test_torchrun_rows_equal_pyhealths_batch_of_one(tmp_path, name):
    kind, model_name, classes, kwargs, _ = CASES[name]
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN.format(tests=os.path.dirname(__file__), kind=kind, model=model_name, classes=classes,
                                      kwargs=kwargs, steps=STEPS))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "two")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    store = fastattr.load_attributions(tmp_path / "two")
    assert len({s["batch"] % 2 for s in store.shards.values()}) == 2, "both ranks wrote shards"
    model, _ = build(name)
    _, theirs = interpreters(name, model)
    assert_rows(store, pyhealth_batch_of_one(name, model, theirs), "torchrun")


def test_a_nested_runs_patients_are_scored_as_pyhealths_evaluator_scores_a_batch_of_one(tmp_path):
    # Scoring a stored run cuts each patient to the row shape the run kept: PyHealth's batch of one
    # (visits as wide as the processor pads them; a mask-trimmed width changes this model's logits).
    from pyhealth.datasets import get_dataloader
    from pyhealth.metrics.interpretability import Evaluator as PyHealthEvaluator
    from pyhealth.metrics.interpretability.utils import threshold_sample_filter

    from fastattr.report.scores import evaluate_run

    model, loader = build("nested-chefer", n=20)
    fastattr.attribute_dataset(fastattr.CheferRelevance(model), loader, tmp_path / "run", progress=False)
    everyone = threshold_sample_filter(0.0)
    scores = evaluate_run(tmp_path / "run", model, sample_filter=everyone, progress=False)
    store = fastattr.load_attributions(tmp_path / "run")
    theirs = PyHealthEvaluator(model, sample_filter=everyone)
    for i, batch in enumerate(get_dataloader(model.dataset, batch_size=1, shuffle=False)):
        row = store[i]
        attributions = {k: row[f"attr/{k}"][None].float() for k in model.feature_keys}
        with torch.no_grad():
            ref = theirs.evaluate({k: batch[k] for k in model.feature_keys}, attributions, return_per_percentage=True)
        for metric, drops in ref.items():
            expected = torch.stack([drops[p][0] for p in sorted(drops)])
            torch.testing.assert_close(scores[i][f"drops/{metric}"], expected.float(), rtol=0, atol=1e-5)

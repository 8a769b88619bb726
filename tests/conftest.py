import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

# Without a GPU the kernels run in Triton's CPU interpreter. Triton picks interpreter or
# compiler when a kernel is decorated, so this is set before fastattr is imported. With a GPU
# the compiled kernels are what the tests check.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastattr.demo.models import FeatureProcessor, FeatureSpec, MLPClassifier, TransformerClassifier, save_checkpoint
from fastattr.demo.synthetic import SyntheticCohort


def pyhealth_import_error() -> str | None:
    try:
        import pyhealth.interpret.methods  # noqa: F401
    except Exception as exc:  # PyHealth's import chain fails in many ways (torchvision, deps)
        return f"{type(exc).__name__}: {exc}"
    return None


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))
    parity = [item for item in items if "parity" in item.keywords]
    error = pyhealth_import_error() if parity else None
    if error is None:
        return
    if os.environ.get("FASTATTR_REQUIRE_PYHEALTH") == "1":
        raise pytest.UsageError(f"FASTATTR_REQUIRE_PYHEALTH=1 but PyHealth does not import: {error}")
    for item in parity:
        item.add_marker(pytest.mark.skip(reason=f"PyHealth 2.1.0 is not importable here ({error})"))


def codes(batch: int, length: int, vocab: int, generator: torch.Generator, min_len: int = 1) -> torch.Tensor:
    """Random token ids in [2, vocab) with random right padding (0), at least ``min_len`` real."""
    ids = torch.randint(2, vocab, (batch, length), generator=generator)
    lengths = torch.randint(min_len, length + 1, (batch,), generator=generator)
    return ids * (torch.arange(length) < lengths[:, None])


def own_model(kind: str = "transformer", num_classes: int = 3, seed: int = 0, **kwargs):
    """A fastattr protocol model with a token feature and a continuous one, and a random batch."""
    g = torch.Generator().manual_seed(seed)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=40),
                        "labs": FeatureProcessor(token=False, size=5)})
    torch.manual_seed(seed)
    cls = TransformerClassifier if kind == "transformer" else MLPClassifier
    model = cls(spec, num_classes=num_classes, **kwargs).eval()
    batch = {
        "codes": codes(4, 11, 40, g),
        "labs": torch.randn(4, 3, 5, generator=g),
        "label": torch.zeros(4, dtype=torch.long),
        "patient_id": ["a", "b", "c", "d"],
    }
    return model, batch


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FASTATTR_BACKEND", raising=False)


def pytest_terminal_summary(terminalreporter):
    ran = [r for r in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
           if "parity" in r.keywords]
    terminalreporter.write_line(f"PyHealth parity cases run: {len(ran)}")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (float64)."""
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def raises_like_pyhealth(theirs, ours):
    """``theirs()`` (PyHealth's side) raises, and ``ours()`` raises its exception type (or a subclass)."""
    with pytest.raises(Exception) as pyhealth_error:
        theirs()
    with pytest.raises(pyhealth_error.type):
        ours()


@pytest.fixture
def repeatable_lstsq():
    """``torch.linalg.lstsq`` that gives one answer per system, for a test that compares two fits of one
    system (fastattr's and the oracle's, a run and its resume). Before the fix of pytorch#187411, torch's CPU
    ``gelsy`` (``lstsq``'s default driver, PyHealth's solver) reads its pivot array uninitialised: columns
    that stale memory marks are pinned, so an ill-conditioned fit moves with the heap (torch 2.13: up to 10%
    of the largest value; torch 2.15 repeats itself). This solves the same system by SVD (``gelsd``) in
    float64, the solution cast back: what such a test checks is the system fastattr builds and what it
    does with the solution. The parity tier checks PyHealth's solver itself, on torch 2.15."""
    solve = torch.linalg.lstsq

    def lstsq(a, b, *args, **kwargs):
        assert not args and not kwargs, "PyHealth's fits call lstsq with its defaults"
        return SimpleNamespace(solution=solve(a.double(), b.double(), driver="gelsd").solution.to(a.dtype))

    with pytest.MonkeyPatch.context() as patch:  # its own: a test's monkeypatch.undo() leaves it in place
        patch.setattr(torch.linalg, "lstsq", lstsq)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytest.mark.usefixtures("one_thread")``): the models are tiny, and on
    a loaded 2-core machine two OpenMP threads per forward spin-wait each call 10-100x slower. Both sides of a
    parity check run under the same setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(cohort: SyntheticCohort) -> TransformerClassifier:
    """A seeded one-layer Transformer over a synthetic cohort's codes (the cohort and fault tests)."""
    torch.manual_seed(0)
    spec = FeatureSpec({"codes": FeatureProcessor(token=True, size=len(cohort.names))}, {"label": "binary"})
    return TransformerClassifier(spec, num_classes=2, dim=16, heads=2, layers=1).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved :func:`tiny_model` with its cohort, as ``fastattr attribute --checkpoint`` reads it."""
    cohort = SyntheticCohort(patients=10, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(tiny_model(cohort), path, cohort={"seed": 3, "vocab": cohort.vocab})
    return path


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """``python -m fastattr ARGS`` in a real process, output captured as text."""
    return subprocess.run([sys.executable, "-m", "fastattr", *map(str, args)], capture_output=True, text=True,
                          **kwargs)

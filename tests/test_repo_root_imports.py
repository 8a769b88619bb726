"""Commands run from the repository root (``python -m benchmarks.<script>``, ``python -c ...``) put the root first
on ``sys.path``: a top-level folder or module there named like an installed package hides that package. A
``kernels/`` folder at the root did so for the PyPI package ``kernels`` that transformers >= 5 imports
(``transformers.integrations.hub_kernels``; PyHealth imports transformers): ``import pyhealth.models`` failed with
``ImportError: cannot import name 'CUDAProperties' from 'kernels'``. Neither check needs transformers installed."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level modules that transformers (and PyHealth through it) import, directly or as optional integrations.
THIRD_PARTY = ("kernels", "transformers", "huggingface_hub", "tokenizers", "safetensors", "accelerate", "peft",
               "datasets", "torch", "triton", "numpy", "pandas", "regex", "yaml", "tqdm", "packaging", "filelock",
               "requests", "pyhealth", "captum")
# a child interpreter as a user starts it: the working directory first on sys.path (no -P)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}


def root_importables() -> set[str]:
    """The names ``import <name>`` finds at the repository root: its folders (a package, or a namespace
    portion when nothing else has the name) and its ``.py`` files."""
    names = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()}
    return names | {p.stem for p in ROOT.glob("*.py")}


def test_no_top_level_name_at_the_root_is_a_package_transformers_imports():
    clash = sorted(root_importables() & set(THIRD_PARTY))
    assert not clash, f"top-level names at the repository root that hide installed packages: {clash}"


def test_from_the_root_the_third_party_names_do_not_resolve_into_the_repository():
    # As a user runs it: a fresh interpreter whose working directory, the root, comes first on sys.path.
    probe = ("import importlib.util, json, sys\n"
             "out = {}\n"
             "for name in sys.argv[1:]:\n"
             "    spec = importlib.util.find_spec(name)\n"
             "    out[name] = None if spec is None else [spec.origin or '', *(spec.submodule_search_locations or [])]\n"
             "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", probe, *THIRD_PARTY], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    inside = {name: where for name, where in found.items()
              if where and any(w and Path(w).resolve().is_relative_to(ROOT) for w in where)}
    assert not inside, f"from the repository root these resolve into the repository: {inside}"


def test_the_kernels_are_fastattrs_own_subpackage():
    spec = importlib.util.find_spec("fastattr.kernels")
    assert spec is not None and Path(spec.origin).resolve() == ROOT / "fastattr" / "kernels" / "__init__.py"


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed here")
def test_transformers_hub_kernels_imports_from_the_root():
    done = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

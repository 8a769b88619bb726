#!/usr/bin/env bash
# Prints the path of a virtual environment in which the real PyHealth 2.1.0 imports and runs,
# building it on first use. Why a second environment: PyHealth imports torchvision at module
# level, and no torchvision wheel loads with the CPU-only torch build that fastattr's own
# environment pins. The registry's torch + torchvision (a CUDA build, which runs on the CPU)
# does, and PyHealth 2.1.0 (declared for Python >= 3.12) runs on 3.11 installed --no-deps with
# its runtime imports. Versions are pinned by tests/pyhealth-constraints.txt.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${FASTATTR_PYHEALTH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastattr/pyhealth-2.1.0-py311}"
constraints="$root/tests/pyhealth-constraints.txt"
stamp="$venv/.ready"
# The machine's pip config may point find-links at a CPU-only torch file; torchvision needs the
# registry's build, so find-links is switched off for this environment.
export PIP_FIND_LINKS=""
if [ ! -f "$stamp" ] || ! cmp -s "$constraints" "$stamp"; then
  echo "building the PyHealth parity environment in $venv (one time, a few minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c "$constraints" torch torchvision >&2
  "$venv/bin/pip" install -q --no-deps --ignore-requires-python pyhealth==2.1.0 >&2
  "$venv/bin/pip" install -q -c "$constraints" platformdirs litdata pyarrow "polars~=1.35" "dask[complete]" \
    narwhals more-itertools scipy orjson "mne~=1.10" pydantic transformers scikit-learn rdkit peft einops \
    "pandas<3" tqdm numpy pytest pytest-benchmark hypothesis captum matplotlib >&2
  cp "$constraints" "$stamp"
fi
"$venv/bin/pip" install -q --no-deps -e "$root" >&2
echo "$venv"

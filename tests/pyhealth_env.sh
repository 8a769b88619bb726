#!/usr/bin/env bash
# Prints the path of a virtual environment with the real PyHealth 2.1.0 as its users have it:
# Python 3.12 (PyHealth 2.1.0 requires >= 3.12) and `pip install pyhealth==2.1.0` with pip's own
# resolution (no --no-deps, no --ignore-requires-python), so its dataset loaders and tasks run as
# shipped. Then the test tools and fastattr itself (editable; its own dependencies resolved by pip
# against what PyHealth brought). Built on first use (about 10 minutes and 6.7 GB: PyHealth pulls the
# registry's CUDA build of torch, which runs on the CPU) and cached under ~/.cache/fastattr/ until
# this script changes.
# The Python: FASTATTR_PYHEALTH_PYTHON, else pyenv's newest 3.12, else python3.12 on PATH (one that runs).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${FASTATTR_PYHEALTH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastattr/pyhealth-2.1.0-py312}"
stamp="$venv/.ready"
# The machine's pip config may point find-links at a CPU-only torch file of another version; PyHealth's
# users get the registry's build, so find-links is switched off for this environment.
export PIP_FIND_LINKS=""
is_312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }
find_python() {
  local candidate
  for candidate in "${FASTATTR_PYHEALTH_PYTHON:-}" \
      $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r) \
      "$(command -v python3.12 || true)"; do
    if [ -n "$candidate" ] && is_312 "$candidate"; then echo "$candidate"; return; fi
  done
  echo "no working Python 3.12 found for the PyHealth 2.1.0 parity environment: install one" \
       "(e.g. pyenv install 3.12) or set FASTATTR_PYHEALTH_PYTHON" >&2
  exit 1
}
if [ ! -f "$stamp" ] || ! cmp -s "$0" "$stamp"; then
  python="$(find_python)"
  echo "building the PyHealth 2.1.0 parity environment in $venv with $python (one time, about 10 minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q pyhealth==2.1.0 >&2
  "$venv/bin/pip" install -q pytest pytest-benchmark hypothesis captum >&2
  "$venv/bin/pip" install -q -e "$root" >&2
  "$venv/bin/pip" check >&2
  cp "$0" "$stamp"
fi
"$venv/bin/pip" install -q --no-deps -e "$root" >&2
echo "$venv"

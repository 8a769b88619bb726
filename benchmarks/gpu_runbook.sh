#!/usr/bin/env bash
# GPU runbook for a session lent a device (the device tool's `run`, from the repository root), in
# parts of a few minutes each so none outruns a 10-minute call:
#   bash benchmarks/gpu_runbook.sh tests     # install check + the GPU test tier (pytest -m gpu)
#   bash benchmarks/gpu_runbook.sh kernels   # kernels alone: do_bench, GB/s vs copy, TFLOP/s vs cuBLAS
#   bash benchmarks/gpu_runbook.sh e2e       # IG and Chefer end to end vs the step loop, Captum, floor
#   bash benchmarks/gpu_runbook.sh longtail  # long-tailed lengths: packed vs padded IG, sorted cohorts
#   bash benchmarks/gpu_runbook.sh tables    # 100,000 patients attributed, then summarised, exported and
#                                            # reported (needs pandas and pyarrow wheels in .whl/:
#                                            # cp312 pandas 2.3.3 + pyarrow 16.1.0 + tzdata, pytz,
#                                            # python-dateutil, six fit the 64 MiB carry with Captum)
# Several parts may be named in one call. Logs go to $OUT (or ./gpu-results). The device image has
# torch, Triton, pytest, safetensors, tqdm and matplotlib but no package registry: Captum travels
# as a wheel in .whl/ (see README, "Benchmarks"); PyHealth's imports are too large to carry, so the
# baseline there is fastattr.loop, PyHealth's algorithms restated, and every table says so.
set -euo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastattr-site .whl/*.whl
  export PYTHONPATH="/tmp/fastattr-site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { cat "$out/install.log"; echo "install failed"; exit 1; }
python3 - <<'PY' | tee "$out/device.txt"
import torch, triton
import fastattr.kernels.interpolate, fastattr.kernels.relevance  # the import check comes first
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name()} | {p.multi_processor_count} SMs | {p.total_memory / 2**30:.0f} GiB | "
      f"torch {torch.__version__} | triton {triton.__version__}")
PY

for part in "$@"; do
  case "$part" in
    tables)  # cohort tables: 100,000 patients attributed on the GPU, then summarised, exported, reported
      python3 -m fastattr demo --quick --device cuda --save-model "$out/model.pt" --out /tmp/fastattr-demo \
        > "$out/demo.log" 2>&1 || { tail -20 "$out/demo.log"; exit 1; }
      python3 -m benchmarks.cohort_tables --checkpoint "$out/model.pt" --size "${TABLES_SIZE:-100000}" \
        --out /tmp/fastattr-run --device cuda --batch-size 512 2>&1 | tee "$out/tables.log" ;;
    tests)
      python3 -m pytest -m gpu tests -q -p no:cacheprovider -rs 2>&1 | tee "$out/gpu-tests.log" ;;
    kernels)
      python3 -m benchmarks.kernels_gpu --csv "$out/kernels.csv" 2>&1 | tee "$out/kernels.log" ;;
    e2e)
      {
        python3 -m benchmarks.ig_compare --device cuda --layers 2 --heads 4 --dim 128 --length 100 --batch 32 \
          --steps 50 --repeats 20
        python3 -m benchmarks.chefer_compare end2end --device cuda --layers 4 --heads 4 --dim 128 --tokens 512 \
          --batch 32 --repeats 20
        for n in 128 512 2048; do
          python3 -m benchmarks.chefer_compare relevance --device cuda --batch 4 --heads 4 --tokens "$n" --layers 6 \
            --full --repeats 20
        done
      } 2>&1 | tee "$out/e2e.log" ;;
    longtail)
      {
        python3 -m benchmarks.long_tail batch --device cuda --dim 128 --repeats 20
        python3 -m benchmarks.long_tail batch --device cuda --dim 64 --repeats 20
        python3 -m benchmarks.long_tail cohort --device cuda --dim 128 --repeats 5
      } 2>&1 | tee "$out/longtail.log" ;;
    *) echo "unknown part $part (tests, kernels, e2e, longtail)"; exit 2 ;;
  esac
done

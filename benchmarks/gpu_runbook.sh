#!/usr/bin/env bash
# GPU runbook for a session lent a device (the device tool's `run`, from the repository root). The
# whole check is one command that fits a task's device time (at most 8 minutes, leaving room for a
# rerun), prepared and dry-run on the CPU first:
#   V=$(bash tests/pyhealth_env.sh); $V/bin/python -m benchmarks.pyhealth_device prepare --out .carry  # here, once
#   bash benchmarks/gpu_runbook.sh all                 # on the device, with carry [".carry"]
#   DEVICE=cpu bash benchmarks/gpu_runbook.sh all      # the dry run here (small sizes, same code paths)
# "all" is: tests (the GPU tier), pyhealth (IG in fp32/tf32/bf16, SHAP / LIME / IG-GIM on a batch of 32,
# and the three ways users call IG and Chefer, against the real PyHealth: benchmarks/pyhealth_device.py), pipeline (fastattr attribute's
# runner against attribute() alone) and precision (the fidelity of tf32/bf16 on the demo's model).
# Earlier parts, a few minutes each: accuracy (steps="auto" against fixed rules), kernels (GB/s vs copy, TFLOP/s vs cuBLAS), e2e (vs the
# fastattr.loop stand-in, Captum, the floor), longtail, tables (100,000 patients summarised,
# exported, reported; needs pandas and pyarrow wheels in .whl/).
# Logs go to $OUT (or ./gpu-results). The device image has torch, Triton, pytest, safetensors,
# tqdm and matplotlib but no package registry: PyHealth travels as its wheel in .carry/ (with the
# cases built here), Captum as a wheel in .whl/.
set -euo pipefail
out="${OUT:-gpu-results}"
device="${DEVICE:-cuda}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "$device" = cpu ]; then  # the dry run: PyHealth's environment, small sizes
  py="${PYHEALTH_PYTHON:-$(bash tests/pyhealth_env.sh)/bin/python}"
  small=1
else
  py=python3
  small=0
fi
parts=("$@")
[ "${parts[0]:-}" = all ] && parts=(tests pyhealth pipeline precision)

if [ "$device" != cpu ]; then
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
fi

for part in "${parts[@]}"; do
  case "$part" in
    pyhealth)  # the real PyHealth on the device: checked against fastattr, then timed
      if [ "$small" = 1 ]; then extra=(--as-device --repeats 1 --loop-repeats 1 --ig-patients 16); else extra=(); fi
      "$py" -m benchmarks.pyhealth_device run --carry .carry --device "$device" --parts ig methods loops "${extra[@]}" \
        2>&1 | grep -v -i "warning" | tee "$out/pyhealth.log" ;;
    pipeline)  # does the cohort runner keep the device busy
      if [ "$small" = 1 ]; then size=2000; batch=64; else size="${PIPELINE_SIZE:-20000}"; batch=512; fi
      "$py" -m benchmarks.pipeline --size "$size" --batch-size "$batch" --device "$device" 2>&1 | tee "$out/pipeline.log" ;;
    precision)  # tf32 and bf16 against fp32 on the demo's trained model
      if [ "$small" = 1 ]; then sizes=(--patients 500 --updates 100); else sizes=(); fi
      "$py" -m benchmarks.precision --device "$device" "${sizes[@]}" 2>&1 | tee "$out/precision.log" ;;
    tables)  # cohort tables: 100,000 patients attributed on the GPU, then summarised, exported, reported
      python3 -m fastattr demo --quick --device cuda --save-model "$out/model.pt" --out /tmp/fastattr-demo \
        > "$out/demo.log" 2>&1 || { tail -20 "$out/demo.log"; exit 1; }
      python3 -m benchmarks.cohort_tables --checkpoint "$out/model.pt" --size "${TABLES_SIZE:-100000}" \
        --out /tmp/fastattr-run --device cuda --batch-size 512 2>&1 | tee "$out/tables.log" ;;
    accuracy)  # steps="auto" against the fixed rules on the demo's trained model (not in "all": ~2 minutes)
      "$py" -m benchmarks.ig_accuracy --models demo --device "$device" --repeats 3 2>&1 | tee "$out/accuracy.log" ;;
    tests)
      "$py" -m pytest -m gpu tests -q -p no:cacheprovider -rs 2>&1 | tail -30 | tee "$out/gpu-tests.log" ;;
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
    *) echo "unknown part $part (all, tests, pyhealth, pipeline, precision, kernels, e2e, longtail, tables)"; exit 2 ;;
  esac
done

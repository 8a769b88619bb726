#!/usr/bin/env bash
# For a session lent a GPU (the device tool's `run`, from the repository root): the GPU test tier,
# then the GPU measurements, each log written under $OUT (or ./gpu-results). Not run yet: no
# session so far was lent a device. The device image has torch, Triton, safetensors, tqdm,
# pytest, hypothesis and matplotlib, but no network, hence --no-build-isolation.
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log"
python3 benchmarks/kernels_gpu.py 2>&1 | tee "$out/kernels.log"
python3 benchmarks/chefer_compare.py relevance --device cuda --batch 8 --heads 4 --tokens 2048 --layers 6 --full \
  2>&1 | tee "$out/relevance.log"
python3 -m fastattr bench --device cuda --lengths 128 512 2048 --batch 32 --dim 128 --out "$out" 2>&1 | tee "$out/bench.log"

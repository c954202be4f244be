#!/usr/bin/env bash
# The gpu-marked checks and the serving compute benchmark, as one script for a lent GPU machine
# (no Ray there: the Ray-dependent gpu check, tests/bench/test_serve_load.py, needs a GPU cluster).
#   OUT=/some/dir bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -m gpu -p no:cacheprovider tests/cluster/test_device_paths.py tests/cluster/test_serving.py -s 2>&1 \
    | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|DEVICE_PATHS|Error|SKIPPED|\{'" | tail -30
$PY -m bench.serve_compute --config configs/ml1m.yaml --name ml1m_h200 --device cuda --seconds 2 --results-dir "$OUT" 2>&1 | tail -12
$PY -m bench.serve_compute --config configs/ml1m.yaml --name ml1m_h200_host_cpu --device cpu --seconds 1 --batches 1,32 \
    --results-dir "$OUT" 2>&1 | tail -6

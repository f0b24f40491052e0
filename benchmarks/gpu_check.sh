#!/usr/bin/env bash
# GPU checks for the SGMV kernels on one CUDA device (sized for well under 8 minutes on one H200):
#   1. the kernel tests on CUDA, including the larger @pytest.mark.gpu grid;
#   2. benchmarks/kernel_bench.py: Triton vs gather + bmm and vs copy bandwidth, table to stdout,
#      JSON to benchmarks/results/, a dated section appended to benchmarks/RESULTS.md.
# Extra arguments go to kernel_bench (for example --dtype float16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET OPENLORA_KERNELS  # compiled kernels, chosen by device

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device visible to torch")'
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'

echo "== kernel tests on CUDA (including the gpu-marked grid)"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m "gpu or not gpu"

echo "== kernel benchmark"
timeout 240 "$PY" -m benchmarks.kernel_bench "$@"

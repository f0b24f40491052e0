#!/usr/bin/env bash
# GPU checks on one CUDA device, sized for under 8 minutes on one H200 (each step has its own limit):
#   1. the kernel tests on CUDA, including the larger @pytest.mark.gpu grid, SGMV and paged attention (210 s);
#   1b. the engine's slot-load ordering on CUDA: loads on the side stream against running forwards (120 s);
#   1c. the int8/int4 QuantLinear kernels on CUDA against their references, odd shapes included (90 s);
#   2. benchmarks/kernel_bench.py: Triton vs gather + bmm and vs copy bandwidth, table to stdout,
#      JSON to benchmarks/results/, a dated section appended to benchmarks/RESULTS.md (120 s);
#   2b. benchmarks/attention_bench.py on CUDA: the paged decode attention kernel against the padded
#      gather + SDPA at 1-256 sequences, short and long contexts, table to stdout and JSON to
#      benchmarks/results/ (its correctness on CUDA is in step 1: tests/kernels/test_paged_attention.py) (90 s);
#   3. benchmarks/gpu_e2e.sh: the end-to-end issue-6 scenarios on a 1.1B bf16 model against
#      transformers + PEFT, with whatever time is left of the 8 minutes (at least 120 s);
#   4. benchmarks/quant_bench.py on CUDA: int8/int4 kernels vs bf16 at 1 and 32 rows, then batch-1 and
#      batch-32 decode of the 1.1B model held bf16, int8 and int4 (240 s, beyond the 8 minutes above).
# Extra arguments go to kernel_bench (for example --dtype float16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET OPENLORA_KERNELS  # compiled kernels, chosen by device

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device visible to torch")'
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'

echo "== kernel tests on CUDA (including the gpu-marked grid)"
START_S=$SECONDS
timeout 210 "$PY" -m pytest -q -p no:cacheprovider tests/kernels -m "gpu or not gpu"

echo "== adapter slot loads ordered against forwards on CUDA"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda_slot_ordering.py -m gpu

echo "== quantized base: int8 and int4 QuantLinear kernels on CUDA against their references"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/quant/test_quant_linear.py -m "gpu or not gpu"

echo "== kernel benchmark"
timeout 120 "$PY" -m benchmarks.kernel_bench "$@"

echo "== paged decode attention: Triton kernel vs gather + SDPA"
timeout 90 "$PY" -m benchmarks.attention_bench --device cuda --out benchmarks/results/attention_bench_cuda.json

left_s=$((460 - (SECONDS - START_S)))
[ "$left_s" -lt 120 ] && left_s=120
E2E_TIMEOUT_S=$left_s bash benchmarks/gpu_e2e.sh

echo "== quantized base: kernels at 1 and 32 rows, batch-1 and batch-32 decode of the 1.1B model, bf16 vs int8 vs int4"
timeout 240 "$PY" -m benchmarks.quant_bench --device cuda --decode-steps 32 --out benchmarks/results/quant_bench_cuda.json

#!/usr/bin/env bash
# End-to-end GPU run of the issue-6 benchmark, meant to be called from benchmarks/gpu_check.sh after the
# kernel checks: a synthetic 1.1B Llama in bf16 served by `openlora up` on cuda, scenario 1 (offline,
# 256 requests over 100 adapters, against transformers + PEFT's static-batch sweep on the same GPU) and
# scenario 2 (capacity under a TTFT p99 bound at 1 and 1,000 adapters), plus the cost estimate. Fixtures are written on the machine
# (about 1 minute: the model and 1,000 rank-16 q/v adapters of 4.5 MB).
#
# Writes benchmarks/results/bench-gpu.json (+ -records.json, PNG plots) and the GPU section of
# benchmarks/RESULTS.md; a run cut short by the time limit still writes what it measured.
# Environment: E2E_TIMEOUT_S (default 540), E2E_DATABASE_URL / E2E_REDIS_URL (default: embedded).
# Extra arguments go to `python -m benchmarks.run --gpu` (for example --s2-adapters 100,1000).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_e2e: no CUDA device visible to torch")'
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name(0))'

args=(--gpu)
[ -n "${E2E_DATABASE_URL:-}" ] && args+=(--database-url "$E2E_DATABASE_URL")
[ -n "${E2E_REDIS_URL:-}" ] && args+=(--redis-url "$E2E_REDIS_URL")

echo "== end-to-end: OpenLoRA against transformers + PEFT (1.1B bf16)"
# SIGTERM at the limit lets the run stop the system and write partial results; SIGKILL 30 s later.
timeout -k 30 "${E2E_TIMEOUT_S:-540}" "$PY" -m benchmarks.run "${args[@]}" "$@"

#!/usr/bin/env bash
# One-shot GPU check (scripts/gpu_check.py): CUDA-vs-CPU parity, large-batch time, actor layouts -> JSON.
# Needs only torch and transformers (verl's source tree is read, not imported: see scripts/verl_stand_in.py).
#   bash scripts/gpu_check.sh --out gpu_check.json                 # on the GPU machine, <= 8 minutes on an H200
#   bash scripts/gpu_check.sh --device cpu --small --out x.json    # seconds on CPU
# PYTHON picks the interpreter (default: the repository's .venv if present, else python3).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
# steppo_verl from this checkout (not installed on the GPU machine), bench_layout's rollout shapes.
export PYTHONPATH="$repo:$repo/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$repo/scripts/gpu_check.py" "$@"

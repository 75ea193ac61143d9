#!/usr/bin/env bash
# Every benchmark, one after the other, each with its default sizes (hours on 2 cores: the 500k-paragraph
# retrieval index and the learning runs dominate). Each prints its ratios and writes benchmarks/results/*.json.
#   PYTHON=.venv/bin/python bash benchmarks/run_all.sh
set -euo pipefail
: "${PYTHON:=python3}"
cd "$(dirname "$0")/.."
for bench in advantage layout agent_loop branching retrieval credit learning; do
  echo "== benchmarks/bench_$bench.py"
  "$PYTHON" "benchmarks/bench_$bench.py"
done

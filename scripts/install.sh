#!/usr/bin/env bash
# Install StepPO for verl on a CPU machine into a virtual environment (default: ./.venv).
#   bash scripts/install.sh            # runtime only
#   bash scripts/install.sh test       # plus the test dependencies and the optional `textworld` extra,
#                                      # so its tests (TextWorld games through verl's trainer) run
# The order matters: torch's CPU build first, so nothing later pulls a CUDA build; then verl with
# only its `verl-core` extra (verl's vllm/fsdp/cpu extras pin CUDA torch); then this package,
# which never reinstalls torch or verl. On GPU nodes install into your existing verl instead:
# `pip install -e .[vllm]`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STEPPO_VENV:-.venv}"
TORCH_VERSION="${STEPPO_TORCH_VERSION:-2.13.0}"
VERL_VERSION="${STEPPO_VERL_VERSION:-0.9.1}"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==${TORCH_VERSION}"
"${PIP[@]}" "verl[verl-core]==${VERL_VERSION}"
if [ "${1:-}" = "test" ]; then
  "${PIP[@]}" -e ".[test,textworld]"
else
  "${PIP[@]}" -e .
fi
"$VENV/bin/python" - <<'PY'
import torch, verl
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
assert "steppo" in ADV_ESTIMATOR_REGISTRY, "steppo_verl's verl plugin did not register"
print(f"installed: torch {torch.__version__}, verl {verl.__version__}, steppo_verl plugin registered")
PY

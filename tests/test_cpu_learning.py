"""StepPO learns: the vault task (steppo_verl/data/vault.py) trained end to end on CPU through the real
trainer (recipe/steppo/run_cpu_vault.sh: task data, warm start of the tiny policy, then StepPO with its
critic, agent loop, estimator and loss), on a fixed seed."""

from __future__ import annotations

import math
import os
import statistics
import sys
from pathlib import Path

import pytest

from steppo_verl.cpu.runs import run_in_session

pytestmark = pytest.mark.ray

RECIPE = Path(__file__).resolve().parents[1] / "recipe" / "steppo" / "run_cpu_vault.sh"
STEPS = 8
ROLLOUTS_PER_STEP = 16 * 4  # config/task/vault.yaml: 16 prompts x 4 rollouts
LAST = 2
TIMEOUT_S = 1500


def difference_threshold(baseline: float) -> float:
    """How far above ``baseline`` the trained success must be: 3 standard errors of the difference
    between a rate measured on one step's rollouts and one measured on the last ``LAST`` steps', both
    at the baseline's rate (floored at the random-door rate 1/8, so a lucky-low baseline does not make
    the bar easy). An untrained policy clears it by chance with probability ~0.1%."""
    p = max(baseline, 1 / 8)
    variance = p * (1 - p) * (1 / ROLLOUTS_PER_STEP + 1 / (LAST * ROLLOUTS_PER_STEP))
    return 3 * math.sqrt(variance)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_steppo_improves_on_the_untrained_policy(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "WORK_DIR": str(tmp_path), "ESTIMATOR": "steppo", "SEED": "0",
           "STEPS": str(STEPS), "RAY_DEDUP_LOGS": "0"}
    result = run_in_session(["bash", str(RECIPE)], tmp_path / "train.log", TIMEOUT_S, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.log[-5000:]
    metrics = result.metrics
    assert sorted(metrics) == list(range(1, STEPS + 1)), result.log[-5000:]
    success = [metrics[step]["critic/score/mean"] for step in sorted(metrics)]
    # Step 1's rollouts come from the untrained (warm-started) policy: the baseline, measured here.
    baseline, final = success[0], statistics.mean(success[-LAST:])
    print(f"vault success per step: {[round(s, 3) for s in success]}; {result.wall_s:.0f} s wall")
    assert final > baseline + difference_threshold(baseline), (baseline, final, success)
    for step in metrics.values():
        assert math.isfinite(step["steppo/step_advantage/mean"]) and math.isfinite(step["critic/vf_loss"])

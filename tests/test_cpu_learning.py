"""StepPO learns: the vault task (steppo_verl/tasks/vault/prepare.py) trained end to end on CPU through the real
trainer, on one fixed seed and world. The run is ``recipe/steppo/run_cpu_vault.sh`` exactly as a user runs it:
task data, warm start of the tiny policy on random-door demonstrations, then StepPO with its critic (trained at
step starts), agent loop, endings policy, step GAE and step-aligned loss.

15 steps, not the recipe's 10: runs are not reproducible at one seed (the ``hf`` server batches whatever
requests are in flight), and at 10 steps this check failed in 3 of 7 runs of seed 0 (2026-12-02: two of three
CI runs and one of four local ones, in which the policy stopped opening doors for three steps, then
recovered), while the four local runs that went on to step 15 cleared the bar there by 0.30-0.40
(benchmarks/README.md, "The CI learning test"). About 4.5 minutes on 2 cores, warm start included."""

from __future__ import annotations

import math
import os
import statistics
import sys
from pathlib import Path

import pytest

from steppo_verl.dev.runs import run_in_session

pytestmark = pytest.mark.ray

RECIPE = Path(__file__).resolve().parents[1] / "recipe" / "steppo" / "run_cpu_vault.sh"
STEPS = 15
ROLLOUTS_PER_STEP = 8 * 8  # config/task/vault.yaml: 8 prompts x 8 rollouts
LAST = 3
FIRST = 2  # the baseline: mean success of the first two steps (the untrained policy and one update)
RANDOM_DOOR_SUCCESS = 1 / 8  # three rooms, two doors each
TIMEOUT_S = 900  # a run takes ~4.5 minutes on 2 cores, warm start included (259 s on 2026-12-03)
SEED = 0


def improvement_needed(baseline: float) -> float:
    """How far above ``baseline`` the trained success must be: 3 standard errors of the difference between
    a success rate measured on the first ``FIRST`` steps' rollouts and one measured on the last ``LAST``
    steps', both at the baseline's rate (floored at the random-door rate, so that a lucky-low baseline does
    not make the bar easy). A policy that did not improve clears it by chance with probability ~0.1%; step
    2 already had one update, which can only raise the baseline."""
    p = max(baseline, RANDOM_DOOR_SUCCESS)
    variance = p * (1 - p) * (1 / (FIRST * ROLLOUTS_PER_STEP) + 1 / (LAST * ROLLOUTS_PER_STEP))
    return 3 * math.sqrt(variance)


def test_improvement_needed_is_three_standard_errors():
    assert improvement_needed(0.25) == pytest.approx(3 * math.sqrt(0.25 * 0.75 * (1 / 128 + 1 / 192)))
    assert improvement_needed(0.0) == improvement_needed(RANDOM_DOOR_SUCCESS)


def train_steppo(work_dir: Path, seed: int) -> list[float]:
    """One recipe run of StepPO on the vault task; returns the success of each step's rollouts, in order."""
    env = {**os.environ, "PYTHON": sys.executable, "WORK_DIR": str(work_dir), "ESTIMATOR": "steppo",
           "SEED": str(seed), "STEPS": str(STEPS), "RAY_DEDUP_LOGS": "0",
           "RUN_DIR": str(work_dir / "runs" / f"steppo-{seed}")}
    log = work_dir / f"train-{seed}.log"
    result = run_in_session(["bash", str(RECIPE)], log, TIMEOUT_S, cwd=work_dir, env=env)
    assert result.returncode == 0, result.log[-5000:]
    metrics = result.metrics
    assert sorted(metrics) == list(range(1, STEPS + 1)), result.log[-5000:]
    for step in metrics.values():  # StepPO ran: step-level advantages from the critic's values at step starts
        keys = ("steppo/step_advantage/mean", "steppo/step_value/mean", "critic/vf_loss")
        for key in (*keys, "steppo/critic/state_abs_error"):
            assert math.isfinite(step[key]), key
    success = [metrics[step]["critic/score/mean"] for step in sorted(metrics)]
    print(f"seed {seed}: vault success per step {[round(s, 3) for s in success]}; {result.wall_s:.0f} s wall")
    return success


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_steppo_improves_on_the_untrained_policy(tmp_path):
    success = train_steppo(tmp_path, SEED)
    # Step 1's rollouts come from the untrained (warm-started) policy, measured in this run.
    baseline, final = statistics.mean(success[:FIRST]), statistics.mean(success[-LAST:])
    assert final > baseline + improvement_needed(baseline), (
        f"StepPO did not improve on the untrained policy: baseline {baseline:.3f}, final {final:.3f}, "
        f"curve {[round(s, 3) for s in success]}"
    )

"""StepPO learns: the vault task (steppo_verl/data/vault.py) trained end to end on CPU through the real
trainer, on a fixed seed. The run is ``recipe/steppo/run_cpu_vault.sh`` exactly as a user runs it: task
data, warm start of the tiny policy on random-door demonstrations, then StepPO with its critic, agent loop,
step GAE and step-aligned loss (~8 minutes on 2 cores, most of it the 10 training steps; the task and the
warm-started model are built once and shared by a second run if one is needed)."""

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
STEPS = 10
ROLLOUTS_PER_STEP = 8 * 8  # config/task/vault.yaml: 8 prompts x 8 rollouts
LAST = 3
RANDOM_DOOR_SUCCESS = 1 / 8  # three rooms, two doors each
TIMEOUT_S = 900  # per run; a run takes ~6-8 minutes on 2 cores
SEEDS = (0, 1)


def improvement_needed(baseline: float) -> float:
    """How far above ``baseline`` the trained success must be: 3 standard errors of the difference between
    a success rate measured on one step's rollouts and one measured on the last ``LAST`` steps', both at
    the baseline's rate (floored at the random-door rate, so that a lucky-low baseline does not make the
    bar easy). A policy that did not improve clears it by chance with probability ~0.1%."""
    p = max(baseline, RANDOM_DOOR_SUCCESS)
    variance = p * (1 - p) * (1 / ROLLOUTS_PER_STEP + 1 / (LAST * ROLLOUTS_PER_STEP))
    return 3 * math.sqrt(variance)


def test_improvement_needed_is_three_standard_errors():
    assert improvement_needed(0.25) == pytest.approx(3 * math.sqrt(0.25 * 0.75 * (1 / 64 + 1 / 192)))
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
        for key in ("steppo/step_advantage/mean", "steppo/step_value/mean", "critic/vf_loss"):
            assert math.isfinite(step[key]), key
    success = [metrics[step]["critic/score/mean"] for step in sorted(metrics)]
    print(f"seed {seed}: vault success per step {[round(s, 3) for s in success]}; {result.wall_s:.0f} s wall")
    return success


@pytest.mark.timeout(len(SEEDS) * (TIMEOUT_S + 60))
def test_steppo_improves_on_the_untrained_policy(tmp_path):
    # A second seed only runs if the first does not clear the bar: about one run in four of this
    # configuration diverged early (benchmarks/README.md, "Learning"), and the bar stays strict: a policy
    # that does not improve clears it in either of the two runs with probability ~0.3%.
    outcomes = []
    for seed in SEEDS:
        success = train_steppo(tmp_path, seed)
        # Step 1's rollouts come from the untrained (warm-started) policy: the baseline, measured in this run.
        baseline, final = success[0], statistics.mean(success[-LAST:])
        outcomes.append((seed, baseline, final, success))
        if final > baseline + improvement_needed(baseline):
            return
    pytest.fail(f"StepPO did not improve on the untrained policy (seed, baseline, final, curve): {outcomes}")

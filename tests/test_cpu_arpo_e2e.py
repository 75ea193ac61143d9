"""ARPO end to end on CPU: the QA smoke recipe (tiny local model, bundled questions, embedded BM25) with
``steppo_agent``'s branching rollouts, the branch-scoring agent-loop manager and the ``arpo`` estimator
(hard attribution, so the actor's mask is rewritten too), two training steps of the real trainer and a
validation (which runs plain rollouts)."""

from __future__ import annotations

import re
import sys
from importlib.resources import files

import pytest
from test_cpu_e2e import RECIPE, RUN_TIMEOUT_S, assert_two_finite_steps, run_in_session

from steppo_verl.branch_worker import branching_overrides

pytestmark = pytest.mark.ray

BRANCHING = {"initial_rollouts": 2, "total_rollouts": 4, "beam": 2, "entropy_window": 5, "top_k": 5}


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_arpo_on_branching_rollouts_trains_two_steps_on_cpu(tmp_path):
    branching = branching_overrides(files("steppo_verl") / "config" / "agent_loop.yaml", BRANCHING,
                                    tmp_path / "agent_loop.yaml")
    cmd = [
        "bash", str(RECIPE / "run_cpu_smoke.sh"),
        "algorithm.adv_estimator=arpo", "algorithm.arpo.attribution=hard", "critic.enable=false",
        "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
        "actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.2",
        *branching,  # its yaml, the branch-scoring manager, rollout.n=1 (the budget replaces rollout.n copies)
        "trainer.steppo_dump.every_n_steps=0",
        "trainer.test_freq=2",  # validation after the last step: plain rollouts, no branching
    ]
    result = run_in_session(cmd, tmp_path, PYTHON=sys.executable, WORK_DIR=str(tmp_path / "smoke"), STEPS="2")
    assert_two_finite_steps(result, "steppo/num_steps/mean", "perf/total_num_tokens")
    for step in result.metrics.values():
        # Every sample filled its budget: 4 prompts (platform/cpu.yaml) x total_rollouts rows per step.
        rows = step["perf/total_num_tokens"] / (step["prompt_length/mean"] + step["response_length/mean"])
        assert round(rows, 6) == 4 * BRANCHING["total_rollouts"]
    # verl logs validation scores as numpy reprs (np.float64(...)), which the step parser leaves out.
    assert re.search(r"step:2 - .* - val-core/hotpotqa/reward/mean@1:", result.log), result.log[-5000:]

"""Outcome reward of the vault task (:mod:`steppo_verl.tasks.vault.prepare`): 1 if the vault was opened and the
final answer says so, else 0.

    reward.custom_reward_function.path=pkg://steppo_verl.tasks.vault.reward   (set by config/task/vault.yaml)

Each side is read from the text its author wrote (:mod:`steppo_verl.transcript`): whether the vault was
opened from the environment's observations (the vault's observation carries the question's code, the ground
truth), the answer from the policy's own steps. Reading the whole transcript instead would pay a policy that
writes "Vault open. Code: ..." itself (a guess among a few codes) without opening a door. The observations
come from the step agent loop through ``extra_info``; without them the reward refuses to score rather than
fall back to the transcript.
"""

from typing import Any

from steppo_verl.tasks.vault.env import vault_observation
from steppo_verl.transcript import OBSERVATION_TEXTS, gold_answers, observation_texts, policy_answer

OPENED_ANSWER = "open"


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> float:
    """1.0 if an observation shows the vault open for ``ground_truth`` (the code) and the policy's last
    ``<answer>`` is ``open``; 0.0 otherwise.

    Raises:
        ValueError: ``extra_info`` lacks the observations the step agent loop records.
    """
    code = gold_answers(ground_truth)[0]
    observations = observation_texts(extra_info)
    if observations is None:
        raise ValueError(
            f"vault reward: extra_info has no {OBSERVATION_TEXTS!r}; the vault task must run the steppo_agent "
            "loop with rewards computed in the agent loop (no colocated reward model)"
        )
    opened = any(vault_observation(code) in observation for observation in observations)
    answer = policy_answer(solution_str, extra_info)
    return float(opened and answer is not None and answer.lower() == OPENED_ANSWER)

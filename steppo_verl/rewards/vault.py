"""Outcome reward of the vault task (:mod:`steppo_verl.data.vault`): 1 if the vault was opened and the
final answer says so, else 0.

    reward.custom_reward_function.path=pkg://steppo_verl.rewards.vault   (set by config/task/vault.yaml)

Whether the vault was opened is read from the transcript verl scores (the response: the policy's turns and
the tool's observations). The vault's observation carries the question's code (the ground truth), which no
other observation shows and the policy cannot know before the vault opens, so the policy cannot fake it.
"""

from typing import Any

from steppo_verl.rewards.qa import extract_answer, gold_answers
from steppo_verl.tools.vault import vault_observation

OPENED_ANSWER = "open"


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any) -> float:
    """1.0 if ``solution_str`` holds the vault's observation for ``ground_truth`` (the code) and its last
    ``<answer>`` is ``open``; 0.0 otherwise."""
    code = gold_answers(ground_truth)[0]
    answer = extract_answer(solution_str)
    opened = vault_observation(code) in solution_str
    return float(opened and answer is not None and answer.lower() == OPENED_ANSWER)

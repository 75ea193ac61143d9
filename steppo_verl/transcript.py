"""Who wrote what: the policy's own text and the environment's, kept apart for reward functions.

verl scores a rollout with ``solution_str``, the decoded response: the policy's steps and the tool
observations between them, as one string. A reward that reads an answer there also reads answers quoted by
a retrieved passage, and a reward that looks for the environment's evidence there also finds it when the
policy merely writes it. So the step agent loop records both sides in its ``extra_fields``
(:func:`transcript_fields`), and verl 0.9.1 hands them to the reward function: its agent loop passes every
trajectory's ``extra_fields`` to the reward loop as ``tool_extra_fields``, and the reward managers (naive,
limited, remote in ``verl/experimental/reward_loop/reward_manager``) merge those into ``extra_info``.

That path is taken whenever verl computes rewards inside the agent loop, which it does unless a reward
*model* shares the actor's resource pool (``reward.reward_model.enable_resource_pool=false``). There, with
verl's ``dapo`` and ``gdpo`` reward managers (which do not merge them), and with other agent loops (e.g.
verl's ``tool_agent``), ``extra_info`` lacks the two keys and each reward says what it falls back to.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

__all__ = ["ACTION_TEXTS", "OBSERVATION_TEXTS", "action_texts", "observation_texts", "transcript_fields"]

ACTION_TEXTS = "action_texts"  # list[str]: the decoded text of each policy step, in order
OBSERVATION_TEXTS = "observation_texts"  # list[str]: the decoded text of each observation in the response


def transcript_fields(
    tokenizer: Any, response_ids: Sequence[int], response_mask: Sequence[int]
) -> dict[str, list[str]]:
    """The response split into its runs of policy tokens and of environment tokens, each run decoded.

    Args:
        response_ids: ``[R]`` token ids of the response (steps and observations).
        response_mask: ``[R]`` 1 on tokens the policy generated, 0 on observation tokens; each maximal run
            of 1s is one step, as in the step protocol.

    Returns ``{ACTION_TEXTS: [...], OBSERVATION_TEXTS: [...]}``; both keys always, so every sample of a batch
    has the same ``extra_fields`` keys. Decoded without special tokens, like verl's ``solution_str``.
    """
    texts: dict[str, list[str]] = {ACTION_TEXTS: [], OBSERVATION_TEXTS: []}
    for is_action, run in itertools.groupby(zip(response_ids, response_mask, strict=True), key=lambda pair: pair[1]):
        ids = [token for token, _ in run]
        texts[ACTION_TEXTS if is_action else OBSERVATION_TEXTS].append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def action_texts(solution_str: str, extra_info: dict[str, Any] | None) -> list[str]:
    """The policy's own text: its steps from the step agent loop, else the whole ``solution_str``.

    The fallback is exact for single-turn rollouts (the response is all policy text); for another multi-turn
    agent loop it also holds the observations, as verl's own reward functions assume.
    """
    recorded = (extra_info or {}).get(ACTION_TEXTS)
    return [solution_str] if recorded is None else [str(text) for text in recorded]


def observation_texts(extra_info: dict[str, Any] | None) -> list[str] | None:
    """The environment's observations from the step agent loop; None where verl did not pass them."""
    recorded = (extra_info or {}).get(OBSERVATION_TEXTS)
    return None if recorded is None else [str(text) for text in recorded]

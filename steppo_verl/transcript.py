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

Every task reads the policy's final answer (:func:`policy_answer`, its last ``<answer>...</answer>``) and the
row's gold answers (:func:`gold_answers`) here, so that all tasks read them alike.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "ACTION_TEXTS",
    "OBSERVATION_TEXTS",
    "action_texts",
    "extract_answer",
    "gold_answers",
    "observation_texts",
    "policy_answer",
    "transcript_fields",
]

ACTION_TEXTS = "action_texts"  # list[str]: the decoded text of each policy step, in order
OBSERVATION_TEXTS = "observation_texts"  # list[str]: the decoded text of each observation in the response
# One pass over the tags (a lazy `<answer>(.*?)</answer>` rescans the rest of the text from every
# unclosed opening tag: quadratic, seconds on 128 KB of them).
_ANSWER_TAGS = re.compile(r"<(/?)answer>", re.IGNORECASE)


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


def extract_answer(solution_str: str) -> str | None:
    """Return the stripped content of the last ``<answer>...</answer>`` pair, or None if there is none.

    A pair is a closing tag and the latest opening tag before it (``<answer>a <answer>b</answer>`` answers
    ``b``); closing tags without an opening one are ignored. Linear in the length of the text.
    """
    answer, opened_at = None, None
    for tag in _ANSWER_TAGS.finditer(solution_str):
        if not tag[1]:
            opened_at = tag.end()
        elif opened_at is not None:
            answer, opened_at = solution_str[opened_at : tag.start()], None
    return None if answer is None else answer.strip()


def policy_answer(solution_str: str, extra_info: dict[str, Any] | None) -> str | None:
    """The last answer in the policy's own text (:func:`action_texts`).

    Each step is read on its own, so a pair never spans an observation; the latest step with an answer wins.
    """
    answers = (extract_answer(text) for text in reversed(action_texts(solution_str, extra_info)))
    return next((answer for answer in answers if answer is not None), None)


def gold_answers(ground_truth: Any) -> list[str]:
    """The accepted answers as a non-empty list of non-blank strings.

    verl hands over parquet list columns as numpy arrays, so those are accepted like lists. A blank
    gold answer would score an empty answer as exact, so it is rejected rather than silently scored.
    """
    if ground_truth is None:
        raise ValueError("ground_truth is None; the example has no gold answer")
    if isinstance(ground_truth, np.ndarray):
        ground_truth = ground_truth.tolist()
    golds = [ground_truth] if isinstance(ground_truth, str) else ground_truth
    if not isinstance(golds, (list, tuple)):
        raise TypeError(f"ground_truth must be a string or a list of strings, got {type(ground_truth).__name__}")
    if not golds:
        raise ValueError(f"ground_truth is empty: {ground_truth!r}")
    for gold in golds:
        if not isinstance(gold, str):
            raise TypeError(f"every ground_truth answer must be a string, got {gold!r} in {ground_truth!r}")
        if not gold.strip():
            raise ValueError(f"ground_truth contains a blank answer: {ground_truth!r}")
    return golds

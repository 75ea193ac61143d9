"""Exact-match and F1 reward for question answering, scored like the official HotpotQA evaluation.

The policy puts its final answer in ``<answer>...</answer>``; the last such pair the *policy* wrote counts:
with the step agent loop, only its own steps are read (``extra_info["action_texts"]``, see
:mod:`steppo_verl.transcript`), so an answer tag quoted by a retrieved passage scores nothing. Without those
(a single-turn rollout, another agent loop) the whole ``solution_str`` is read. Answers are compared to the
gold answer(s) after SQuAD normalisation.

Use it as verl's custom reward function (verl 0.9.1 reads ``reward.custom_reward_function`` in
``verl/trainer/ppo/reward.py::get_custom_reward_fn``)::

    reward.custom_reward_function.path=pkg://steppo_verl.tasks.qa.reward
    reward.custom_reward_function.name=compute_score            # the default
    +reward.custom_reward_function.reward_kwargs.metric=f1      # optional; EM is the default

``reward_kwargs`` is not in verl's packaged ``reward/reward.yaml``, hence the ``+`` in a Hydra override.
verl merges it into every call, so ``metric`` arrives as a keyword argument of :func:`compute_score`.
"""

import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from steppo_verl.transcript import gold_answers, policy_answer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# HotpotQA gives no partial credit on these: "yes it is" must not half-match "yes".
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _normalize_pair(prediction: str, gold: str) -> tuple[str, str]:
    """Both sides normalised; lighter normalisation where the official one erases the gold answer.

    HotpotQA dev has answers such as "The The" and "!!!" (band names) that SQuAD normalisation turns
    into "", which would make them unanswerable (F1 0) and match any empty prediction. For those
    golds both sides are only lowercased and whitespace-collapsed: a deliberate deviation from the
    official script that affects 2 of the 7,405 dev questions.
    """
    gold_norm = normalize_answer(gold)
    if gold_norm:
        return normalize_answer(prediction), gold_norm
    return " ".join(prediction.lower().split()), " ".join(gold.lower().split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if prediction and gold are equal after normalisation, else 0.0."""
    prediction_norm, gold_norm = _normalize_pair(prediction, gold)
    return float(prediction_norm == gold_norm)


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between the normalised prediction and gold, with HotpotQA's yes/no/noanswer rule."""
    prediction_norm, gold_norm = _normalize_pair(prediction, gold)
    if prediction_norm != gold_norm and {prediction_norm, gold_norm} & _CLOSED_ANSWERS:
        return 0.0
    prediction_tokens, gold_tokens = prediction_norm.split(), gold_norm.split()
    overlap = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _best(metric: Callable[[str, str], float], prediction: str, golds: list[str]) -> float:
    """The prediction's score against whichever accepted answer suits it best."""
    return max(metric(prediction, gold) for gold in golds)


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str | list[str] | tuple[str, ...] | np.ndarray,
    extra_info: dict | None = None,
    metric: str = "em",
    **kwargs: Any,
) -> dict[str, float]:
    """Score one response for verl: ``{"score", "em", "f1"}``, each the best over the accepted answers.

    The answer is :func:`steppo_verl.transcript.policy_answer`'s (the policy's steps from ``extra_info`` when
    the step agent loop recorded them, else ``solution_str``). ``data_source`` is part of verl's call and unused here;
    ``**kwargs`` absorbs what some reward managers add (e.g. ``reward_router_address``). ``metric`` ("em"
    or "f1") picks which of the two becomes ``score``. A response without a complete answer tag scores 0.
    """
    if metric not in ("em", "f1"):
        raise ValueError(f"unknown metric {metric!r}; expected 'em' or 'f1'")
    golds = gold_answers(ground_truth)
    prediction = policy_answer(solution_str, extra_info)
    if prediction is None:
        scores = {"em": 0.0, "f1": 0.0}
    else:
        scores = {"em": _best(exact_match, prediction, golds), "f1": _best(f1_score, prediction, golds)}
    return {"score": scores[metric], **scores}

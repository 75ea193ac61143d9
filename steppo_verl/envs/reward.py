"""verl's reward function for environment tasks: the environment's rewards already count, so it adds none.

    reward.custom_reward_function.path=pkg://steppo_verl.envs.reward   (config/task/textworld.yaml)

Why the score is 0: with ``steppo_env_agent`` every reward the environment gives (TextWorld's score delta,
the corridor's 1 for opening the door) is already in the trajectory's ``env_rewards``, on the last token of
the step that earned it, and the StepPO trainer adds ``env_rewards`` to verl's ``token_level_rewards`` (the
reward function's score, ``rm_scores``) before every estimator of this package (steppo, gigpo, step_grpo,
step_rloo, hgpo). Scoring the outcome here as well would count a win twice, and at the last token instead of
the step that won it. verl's own estimators (grpo, gae, ...) read only ``token_level_rewards``: with this
reward function they see no reward at all.

What it reports instead is the environment's own verdict, read from the agent loop's ``env_info`` (the
environment's last ``info``, which verl merges into ``extra_info``; see :mod:`steppo_verl.transcript` for
that path): ``acc`` is 1 for a won episode, so verl's validation shows the success rate as its core metric
(``val-core/<data_source>/acc/mean@N``), and ``lost`` the share the environment ended as lost. Nothing is
read from the text the policy wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ENV_INFO", "compute_score"]

ENV_INFO = "env_info"  # the environment's last info dict (steppo_verl.env_loop)


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None, **kwargs: Any
) -> dict[str, float]:
    """``{"score": 0.0, "acc": won, "lost": lost}`` for one trajectory, from ``extra_info["env_info"]``.

    ``data_source``, ``solution_str`` and ``ground_truth`` are part of verl's call and unused.

    Raises:
        ValueError: ``extra_info`` has no ``env_info`` mapping (the rollout did not run ``steppo_env_agent``,
            or verl did not pass its fields through), so the outcome is unknown.
    """
    info = (extra_info or {}).get(ENV_INFO)
    if not isinstance(info, Mapping):
        raise ValueError(
            f"environment reward: extra_info has no {ENV_INFO!r} mapping (got {info!r}); run the "
            "steppo_env_agent loop with rewards computed in the agent loop (no colocated reward model)"
        )
    return {"score": 0.0, "acc": float(bool(info.get("won"))), "lost": float(bool(info.get("lost")))}

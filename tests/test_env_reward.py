"""verl's reward function for environment tasks (steppo_verl.envs.reward): the outcome as reported metrics,
no score on top of the environment's own rewards."""

from __future__ import annotations

import pytest

from steppo_verl.envs.reward import compute_score


@pytest.mark.parametrize(
    "info, acc, lost",
    [({"won": True, "lost": False, "score": 1}, 1.0, 0.0), ({"won": False, "lost": True}, 0.0, 1.0), ({}, 0.0, 0.0)],
)
def test_env_info_outcome_is_reported_and_the_score_adds_nothing(info, acc, lost):
    result = compute_score("textworld/tw-coin_collector", "<action>take coin</action>", "won", {"env_info": info})
    assert result == {"score": 0.0, "acc": acc, "lost": lost}, "env_rewards already carry the game's reward"


def test_policy_text_claiming_a_win_scores_nothing():
    result = compute_score("corridor", "You won! The door opens.", "won", {"env_info": {"won": False, "lost": False}})
    assert result["acc"] == 0.0


@pytest.mark.parametrize("extra_info", [None, {}, {"env_info": None}, {"env_info": "won"}])
def test_extra_info_without_env_info_is_rejected_naming_the_loop(extra_info):
    with pytest.raises(ValueError, match=r"no 'env_info' mapping .* steppo_env_agent"):
        compute_score("corridor", "", "won", extra_info)

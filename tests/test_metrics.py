"""Step-level metrics: the critic's error at repeated states against a hand computation, observed returns,
ending fractions."""

from __future__ import annotations

import math

import pytest
import torch

from steppo_verl.metrics import (
    critic_state_metrics,
    explained_variance,
    observed_returns,
    state_mean_returns,
    step_metrics,
)
from steppo_verl.protocol import locate_steps


def test_critic_state_error_matches_a_hand_computation():
    # Three trajectories; states A (start), B (room 2), D (dead end); mask off the absent third step.
    keys = torch.tensor([[10, 20, 20], [10, 30, 0], [10, 20, 0]])
    step_mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    values = torch.tensor([[0.6, 0.7, 0.9], [0.5, 0.4, 9.0], [0.4, 0.5, 9.0]])
    outcomes = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 9.0], [0.0, 0.0, 9.0]])
    metrics = critic_state_metrics(values, outcomes, keys, step_mask)
    # A: visits 3, mean V 0.5, mean outcome 1/3; B: visits 3 (two in row 0), mean V 0.7, mean outcome 2/3;
    # C (key 30): one visit, not repeated.
    error_a, error_b = abs(0.5 - 1 / 3), abs(0.7 - 2 / 3)
    assert metrics["steppo/critic/state_abs_error"] == pytest.approx((3 * error_a + 3 * error_b) / 6)
    assert metrics["steppo/critic/repeated_states"] == 2
    # slope of mean V on mean outcome over (1/3, 0.5) and (2/3, 0.7): 0.2 / (1/3)
    assert metrics["steppo/critic/state_slope"] == pytest.approx(0.6)
    # A's outcomes 1, 0, 0 and B's 1, 1, 0 (rows 0, 0, 2): sample variance 1/3 each, so a critic that knew both
    # values would still be off by sqrt(2 / pi) * sqrt(1/3 / 3) on average.
    assert metrics["steppo/critic/state_abs_error_floor"] == pytest.approx(math.sqrt(2 / math.pi) / 3)


def test_the_error_floor_is_zero_where_every_visit_of_a_state_returned_the_same():
    keys = torch.tensor([[1, 2], [1, 2]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    metrics = critic_state_metrics(torch.zeros(2, 2), torch.tensor([[0.5, 1.0], [0.5, 1.0]]), keys, mask)
    assert metrics["steppo/critic/state_abs_error_floor"] == 0.0
    assert metrics["steppo/critic/state_abs_error"] == pytest.approx(0.75)


def test_state_mean_returns_leave_each_steps_own_return_out():
    keys = torch.tensor([[10, 20, 20], [10, 30, 0], [10, 20, 0]])
    step_mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    outcomes = torch.tensor([[1.0, 1.0, 0.5], [0.0, 0.0, 9.0], [0.0, 0.25, 9.0]])
    values, known = state_mean_returns(outcomes, keys, step_mask)
    # State 10: returns 1, 0, 0; state 20 (three visits): 1, 0.5, 0.25; state 30: one visit, unknown.
    expected = torch.tensor([[0.0, 0.375, 0.625], [0.5, 0.0, 0.0], [0.5, 0.75, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values, expected)
    assert known.tolist() == [[True, True, True], [True, False, False], [True, True, False]]


def test_critic_state_metrics_without_repeated_states_are_empty():
    keys = torch.tensor([[1, 2], [3, 4]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    assert critic_state_metrics(torch.zeros(2, 2), torch.zeros(2, 2), keys, mask) == {}
    assert critic_state_metrics(torch.zeros(2, 2), torch.zeros(2, 2), keys, torch.zeros(2, 2, dtype=torch.bool)) == {}


def test_a_flat_critic_has_slope_zero_and_a_calibrated_one_slope_one():
    keys = torch.tensor([[1, 2], [1, 2], [3, 3]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    outcomes = torch.tensor([[0.2, 0.8], [0.2, 0.8], [0.5, 0.5]])
    flat = critic_state_metrics(torch.full((3, 2), 0.5), outcomes, keys, mask)
    calibrated = critic_state_metrics(outcomes.clone(), outcomes, keys, mask)
    assert flat["steppo/critic/state_slope"] == pytest.approx(0.0, abs=1e-9)
    assert calibrated["steppo/critic/state_slope"] == pytest.approx(1.0)
    assert calibrated["steppo/critic/state_abs_error"] == pytest.approx(0.0, abs=1e-9)


def test_observed_returns_add_the_discounted_bootstrap_value():
    mask = torch.tensor([[1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]])
    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    steps = locate_steps(mask)
    out = observed_returns(rewards, steps, gamma=0.5, bootstrap_values=torch.tensor([4.0, 0.0]))
    # row 0: r = [0.5, 0, 1], then V_K = 4 after the third step: G_2 = 1 + 0.5*4 = 3, G_1 = 1.5, G_0 = 0.5 + 0.75
    assert out[0].tolist() == pytest.approx([1.25, 1.5, 3.0])
    assert out[1].tolist() == pytest.approx([2.0, 0.0, 0.0])  # one step, terminal; absent steps are 0


def test_step_metrics_report_ending_fractions_and_the_critic_state_error():
    mask = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 0, 1]])
    steps = locate_steps(mask)
    values = torch.tensor([[0.5, 0.0, 0.2], [0.5, 0.0, 0.0], [0.5, 0.0, 0.8]])
    zeros = torch.zeros(3, 3)
    keys = torch.tensor([[7, 8], [7, 0], [7, 8]])
    outcomes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    metrics = step_metrics(steps, zeros, zeros, values, torch.tensor([False, True, False]), keys,
                           ["answer", "length_limit", "answer"], outcomes)
    assert metrics["steppo/ending/answer"] == pytest.approx(2 / 3)
    assert metrics["steppo/ending/length_limit"] == pytest.approx(1 / 3)
    assert metrics["steppo/ending/timeout"] == 0.0
    assert metrics["steppo/truncated_frac"] == pytest.approx(1 / 3)
    # state 7: V 0.5 vs outcome 2/3 (3 visits); state 8: V 0.5 vs 0.5 (2 visits)
    assert metrics["steppo/critic/state_abs_error"] == pytest.approx(3 * (2 / 3 - 0.5) / 5)


def test_explained_variance_of_a_perfect_and_a_constant_prediction():
    target = torch.tensor([0.0, 1.0, 2.0])
    assert explained_variance(target, target) == pytest.approx(1.0)
    assert explained_variance(torch.full((3,), 1.0), target) == pytest.approx(0.0)


def test_episode_reward_is_what_each_trajectory_earned_without_a_bootstrap_value():
    mask = torch.tensor([[1, 0, 1], [1, 0, 0]])
    steps = locate_steps(mask)
    zeros = torch.zeros(2, 3)
    # row 0 earned 0.5 from the environment and 1 at the end; row 1 nothing (and bootstraps V = 3, not earned)
    rewards = torch.tensor([[0.5, 0.0, 1.0], [0.0, 0.0, 0.0]])
    metrics = step_metrics(steps, zeros, zeros, episode_rewards=rewards.sum(dim=-1),
                           outcomes=observed_returns(rewards, steps, 1.0, torch.tensor([0.0, 3.0])))
    assert metrics["steppo/episode_reward/mean"] == pytest.approx(0.75)
    assert (metrics["steppo/episode_reward/max"], metrics["steppo/episode_reward/min"]) == (1.5, 0.0)
    assert "steppo/episode_reward/mean" not in step_metrics(steps, zeros, zeros)

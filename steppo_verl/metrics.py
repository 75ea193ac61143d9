"""Step-level training metrics (reported through verl's metrics/tracking under ``steppo/``).

The per-step view of CleanRL's PPO diagnostics: how many steps trajectories take, how they ended
and how often they were cut off, the distribution of step advantages/returns/values, how well the
critic explains the step returns (each step counted once, read at its first token), and the critic's
error at repeated states (:func:`critic_state_metrics`).
"""

from __future__ import annotations

import math

import torch

from steppo_verl.advantage import observed_step_returns
from steppo_verl.endings import Ending
from steppo_verl.protocol import Steps, gather_at_step_starts, step_rewards

__all__ = ["critic_state_metrics", "explained_variance", "observed_returns", "state_mean_returns", "step_metrics"]


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - Var(target - predicted) / Var(target)``; NaN when the target has no variance."""
    target_var = target.var(unbiased=False) if target.numel() > 1 else target.new_tensor(0.0)
    if target_var <= 0:
        return float("nan")
    return float(1.0 - (target - predicted).var(unbiased=False) / target_var)


def _summary(name: str, x: torch.Tensor) -> dict[str, float]:
    if x.numel() == 0:
        return {}
    return {
        f"steppo/{name}/mean": float(x.mean()),
        f"steppo/{name}/max": float(x.max()),
        f"steppo/{name}/min": float(x.min()),
    }


def observed_returns(
    token_level_rewards: torch.Tensor, steps: Steps, gamma: float, bootstrap_values: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, K]`` float64 discounted return observed from step k on: ``G_k + gamma**(K - k) * V_K``.

    ``G_k`` is the reward-to-go of the trajectory's own rewards; ``bootstrap_values`` ``[B]`` (V(s_K),
    0 for terminated episodes) continues the return of episodes the endings policy bootstraps.
    """
    return observed_step_returns(step_rewards(token_level_rewards.double(), steps), steps, gamma, bootstrap_values)


def _states(step_keys: torch.Tensor, step_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` dense state id of each of the batch's N steps (by ``step_keys``) and ``[S]`` float64 visits per state."""
    _, state = torch.unique(step_keys[step_mask], return_inverse=True)
    return state, torch.bincount(state).to(torch.float64)


def _state_sums(x: torch.Tensor, state: torch.Tensor, visits: torch.Tensor) -> torch.Tensor:
    """``[S]`` float64 sum of ``x`` ``[N]`` over the steps of each state."""
    return torch.zeros_like(visits).index_add_(0, state, x.double())


def state_mean_returns(outcomes: torch.Tensor, step_keys: torch.Tensor, step_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's Monte-Carlo value of each step's state: the mean return observed from the same state by
    the *other* steps of the batch (leave-one-out, so a step's own return never enters its baseline).

    With many rollouts per state this is an unbiased estimate of the current policy's value of the state,
    the critic's target: StepPO run on it (``algorithm.steppo.values=state_returns``) shows what step credit
    gains with a calibrated critic, the upper bound the learned critic is measured against.

    Args:
        outcomes: ``[B, K]`` return observed from step k on (:func:`observed_returns`).
        step_keys: ``[B, K]`` int64 state key of each step.
        step_mask: ``[B, K]`` bool, True where sample b has a step k.

    Returns:
        ``[B, K]`` float64 leave-one-out mean return of the step's state, and ``[B, K]`` bool: where it
        exists (the state was visited at least twice in the batch).
    """
    values = torch.zeros(outcomes.shape, dtype=torch.float64, device=outcomes.device)
    known = torch.zeros_like(step_mask)
    if not bool(step_mask.any()):
        return values, known
    state, visits = _states(step_keys, step_mask)
    own = outcomes[step_mask].double()
    others = visits[state] - 1
    values[step_mask] = torch.where(others > 0, (_state_sums(own, state, visits)[state] - own) / others.clamp(min=1), 0.0)
    known[step_mask] = others > 0
    return values, known


def critic_state_metrics(
    step_values: torch.Tensor, outcomes: torch.Tensor, step_keys: torch.Tensor, step_mask: torch.Tensor
) -> dict[str, float]:
    """How well the critic values the states a batch visits more than once.

    Step starts are grouped by the state they were taken from (``step_keys``, the agent loop's key of
    the observation). For each state visited at least twice, the mean V(s_k) over its visits is
    compared with the mean outcome observed from it: an unbiased Monte-Carlo estimate of the current
    policy's value of that state, which a calibrated critic should match.

    Args:
        step_values: ``[B, K]`` V(s_k) at each step start.
        outcomes: ``[B, K]`` the discounted return observed from step k on (bootstrapped where the
            endings policy says so).
        step_keys: ``[B, K]`` int64 state key of each step.
        step_mask: ``[B, K]`` bool, True where sample b has a step k.

    Returns:
        ``steppo/critic/state_abs_error``: visit-weighted mean of |mean V - mean outcome| over the
        repeated states; ``steppo/critic/repeated_states``: how many states were visited at least twice;
        ``steppo/critic/state_slope``: least-squares slope of mean V on mean outcome across those states
        (~0 for a critic that only tracks the batch mean, ~1 for a calibrated one; present with at least
        two states whose outcomes differ); ``steppo/critic/state_abs_error_floor``: the error a critic that
        knew every state's true value would show on average, because each state's mean outcome is itself a
        mean of a few returns: the same visit weighting of ``sqrt(2 / pi) * s / sqrt(n)`` (the expected
        absolute deviation of a mean of ``n`` returns whose sample standard deviation is ``s``, in the normal
        approximation). 0/1 returns from a state visited 4 times at success 0.5 put it near 0.2: an error
        near the floor is all a batch can measure. Empty where no state repeats.
    """
    if not bool(step_mask.any()):
        return {}
    state, visits = _states(step_keys, step_mask)
    mean_value = _state_sums(step_values[step_mask], state, visits) / visits
    mean_outcome = _state_sums(outcomes[step_mask], state, visits) / visits
    mean_square = _state_sums(outcomes[step_mask].double() ** 2, state, visits) / visits
    repeated = visits >= 2
    if not bool(repeated.any()):
        return {}
    visits, mean_value, mean_outcome = visits[repeated], mean_value[repeated], mean_outcome[repeated]
    sample_var = ((mean_square[repeated] - mean_outcome**2) * visits / (visits - 1)).clamp(min=0)
    floor = math.sqrt(2 / math.pi) * torch.sqrt(sample_var / visits)
    metrics = {
        "steppo/critic/state_abs_error": float(((mean_value - mean_outcome).abs() * visits).sum() / visits.sum()),
        "steppo/critic/state_abs_error_floor": float((floor * visits).sum() / visits.sum()),
        "steppo/critic/repeated_states": float(visits.numel()),
    }
    centred_outcome = mean_outcome - mean_outcome.mean()
    spread = (centred_outcome**2).sum()
    if visits.numel() >= 2 and spread > 0:
        covariance = (centred_outcome * (mean_value - mean_value.mean())).sum()
        metrics["steppo/critic/state_slope"] = float(covariance / spread)
    return metrics


def step_metrics(
    steps: Steps,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
    step_keys: torch.Tensor | None = None,
    endings: list[str] | None = None,
    outcomes: torch.Tensor | None = None,
    episode_rewards: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of one training batch.

    Args:
        steps: the batch's step layout.
        advantages, returns: ``[B, L]`` per-token outputs of a step estimator.
        values: ``[B, L]`` critic values (verl's alignment), if there is a critic.
        truncated: ``[B]`` bool, episodes whose return continues with V(s_K) (the endings policy's decision).
        step_keys: ``[B, K]`` state key of each step (the agent loop's), for :func:`critic_state_metrics`.
        endings: ``B`` names of :class:`~steppo_verl.endings.Ending`; reported as fractions of the batch.
        outcomes: ``[B, K]`` observed discounted return from each step on, for :func:`critic_state_metrics`.
        episode_rewards: ``[B]`` what each trajectory earned (its outcome score plus its environment rewards,
            undiscounted): ``steppo/episode_reward/*``, the success rate of tasks that reward a success with 1,
            whether the reward is the outcome's (verl's ``critic/score``) or the environment's (``critic/score``
            is 0 there).
    """
    mask = steps.step_mask
    step_adv = gather_at_step_starts(advantages.float(), steps)[mask]
    step_returns = gather_at_step_starts(returns.float(), steps)[mask]
    metrics = {
        **_summary("num_steps", steps.num_steps.float()),
        **_summary("step_advantage", step_adv),
        **_summary("step_return", step_returns),
    }
    if step_adv.numel() > 1:
        metrics["steppo/step_advantage/std"] = float(step_adv.std())
    if values is not None:
        values_at_starts = gather_at_step_starts(values.float(), steps)
        step_values = values_at_starts[mask]
        metrics.update(_summary("step_value", step_values))
        metrics["steppo/value_explained_var"] = explained_variance(step_values, step_returns)
        if step_keys is not None and outcomes is not None:
            metrics.update(critic_state_metrics(values_at_starts, outcomes, step_keys, mask))
    if episode_rewards is not None:
        metrics.update(_summary("episode_reward", episode_rewards.float()))
    if truncated is not None and truncated.numel():
        metrics["steppo/truncated_frac"] = float(truncated.float().mean())
    if endings:
        metrics.update({f"steppo/ending/{e.value}": sum(n == e.value for n in endings) / len(endings) for e in Ending})
    return metrics

"""Step-level training metrics (reported through verl's metrics/tracking under ``steppo/``).

The per-step view of CleanRL's PPO diagnostics: how many steps trajectories take, how often they
are cut off, the distribution of step advantages/returns/values, and how well the critic explains
the step returns (each step counted once, read at its first token).
"""

from __future__ import annotations

import torch

from steppo_verl.protocol import Steps, gather_at_step_starts

__all__ = ["explained_variance", "step_metrics"]


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


def step_metrics(
    steps: Steps,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor | None = None,
    truncated: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics of one training batch.

    Args:
        steps: the batch's step layout.
        advantages, returns: ``[B, L]`` per-token outputs of a step estimator.
        values: ``[B, L]`` critic values (verl's alignment), if there is a critic.
        truncated: ``[B]`` bool, episodes cut off rather than ended by the model.
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
        step_values = gather_at_step_starts(values.float(), steps)[mask]
        metrics.update(_summary("step_value", step_values))
        metrics["steppo/value_explained_var"] = explained_variance(step_values, step_returns)
    if truncated is not None and truncated.numel():
        metrics["steppo/truncated_frac"] = float(truncated.float().mean())
    return metrics

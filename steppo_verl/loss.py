"""Step-aligned policy loss (``actor.policy_loss.loss_mode=steppo``), registered with verl.

Each agent step is one decision, so it gets one importance ratio: the length-normalised
(geometric-mean) ratio of its action tokens,

    s_k = exp( mean_{t in step k} [log pi(y_t) - log pi_old(y_t)] ),

clipped PPO-style per step: ``max(-A_k * s_k, -A_k * clip(s_k, 1 - eps_low, 1 + eps_high))``.
A 300-token tool call and a 5-token answer then weigh the same in the clipping decision. As in
verl's GSPO, each token carries ``sg[s_k] * pi(y_t) / sg[pi(y_t)]`` so gradients reach every token
of the step; with one step per row this is exactly verl's ``gspo``. Aggregation goes through
verl's ``agg_loss`` with the global batch info verl sets on the config, so the loss is correct
across data-parallel ranks.

verl hands a registered policy loss no extra batch fields, so steps come from ``response_mask``
runs unless the StepPO trainer passes ``step_ids``. The loss is selectable independently from the
estimator (the paper's ablation turns each off).
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss
from verl.utils.torch_functional import masked_mean

from steppo_verl.protocol import locate_steps, scatter_to_tokens, step_means

__all__ = ["LOSSES", "clip_binds", "compute_policy_loss_steppo"]

# exp() of a log-ratio above this overflows float32 gradients long before it means anything.
_MAX_LOG_RATIO = 10.0


def _clip_range(config: Any) -> tuple[float, float]:
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    return low, high


def clip_binds(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """Where the PPO clip removes the gradient: ratio above 1 + high with A > 0, below 1 - low with A < 0."""
    return ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))


@register_policy_loss("steppo")
def compute_policy_loss_steppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clipped step-level policy objective.

    Args:
        old_log_prob: ``[B, L]`` log-probs of the sampled tokens under the behaviour policy.
        log_prob: ``[B, L]`` log-probs under the current policy (carries the gradient).
        advantages: ``[B, L]`` per-token advantages (constant over a step with ``steppo``).
        response_mask: ``[B, L]`` 1 on action tokens.
        loss_agg_mode: verl's aggregation mode (``token-mean``, ``seq-mean-token-mean``, ...).
        config: verl's ``ActorConfig`` (clip ratios, ``global_batch_info`` for DP aggregation).
        rollout_is_weights: ``[B, L]`` optional rollout-correction weights.
        step_ids: ``[B, L]`` explicit step ids; ``None`` recovers steps from ``response_mask``.

    Returns:
        The scalar loss and metrics: token-level ``actor/pg_clipfrac`` and ``actor/ppo_kl`` as
        verl reports them, plus ``actor/step_clipfrac`` (fraction of steps whose ratio was
        clipped, each step counted once) and ``actor/step_ratio_mean``.
    """
    if config is None:
        raise ValueError("the steppo policy loss needs verl's actor config (clip ratios, global batch info)")
    clip_low, clip_high = _clip_range(config)
    steps = locate_steps(response_mask, step_ids)

    log_ratio = log_prob - old_log_prob
    step_log_ratio = step_means(log_ratio.detach(), steps)  # [B, K]
    # sg[log s_k] + log pi - sg[log pi]: value log s_k on every token, gradient of log pi(y_t).
    token_log_ratio = log_prob - log_prob.detach() + scatter_to_tokens(step_log_ratio.to(log_prob.dtype), steps)
    ratio = torch.exp(token_log_ratio.clamp(max=_MAX_LOG_RATIO))

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg_losses = torch.maximum(unclipped, clipped)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss_mask = steps.action.to(pg_losses.dtype)
    pg_loss = agg_loss(
        loss_mat=pg_losses, loss_mask=loss_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )

    with torch.no_grad():
        step_ratio = torch.exp(step_log_ratio.clamp(max=_MAX_LOG_RATIO))
        step_adv = step_means(advantages.detach(), steps)
        step_was_clipped = clip_binds(step_ratio, step_adv, clip_low, clip_high) & steps.step_mask
        num_steps = steps.step_mask.sum().clamp(min=1)
        metrics = {
            "actor/pg_clipfrac": masked_mean(torch.gt(clipped, unclipped).float(), loss_mask).item(),
            "actor/ppo_kl": masked_mean(-log_ratio.detach(), loss_mask).item(),
            "actor/step_clipfrac": (step_was_clipped.sum() / num_steps).item(),
            "actor/step_ratio_mean": (torch.where(steps.step_mask, step_ratio, 0.0).sum() / num_steps).item(),
        }
    return pg_loss, metrics


# What this module registers with verl; the plugin checks each entry after import.
LOSSES = {"steppo": compute_policy_loss_steppo}

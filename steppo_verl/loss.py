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
runs (exact for ``steppo_agent`` and verl's tool agent loop). The loss is selectable independently
from the estimator (the paper's ablation turns each off). Two registered names share one
implementation: ``steppo`` weighs every action token once (verl's ``loss_agg_mode`` applies);
``steppo_step_mean`` weighs every *step* once (each step's tokens average to one term, and the terms
are summed per trajectory and averaged over the global batch's trajectories), so a 300-token call
does not outweigh a 5-token answer in the gradient either. verl's dual clip (``clip_ratio_c``) bounds
the loss of a negative-advantage step whose ratio exploded, as in verl's vanilla loss.

``steppo_action_clip`` reads the clip range as bounds on the step's whole probability ratio (the product of
its token ratios, the action's ratio in the step MDP): the geometric-mean ratio of an n-token step is
clipped at ``(1 - eps_low) ** (1/n)`` and ``(1 + eps_high) ** (1/n)``. Why: in a short step where one
token carries the decision and the rest are fixed format, a bound on the geometric mean lets that one
token's ratio move by ``(1 + eps) ** n`` before the clip binds (about 3x for eps = 0.2 and n = 6),
a looser trust region than the token loss gives the same token. With this mode eps = 0.2 bounds the
decision token as the token loss does, and a 300-token step gets a per-token bound of the GSPO scale.

:func:`step_start_value_loss` is the matching critic loss (``algorithm.steppo.value_loss=step_starts``):
V is trained only where StepPO reads it, at each step's first action token.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.ppo.core_algos import agg_loss, compute_value_loss, register_policy_loss
from verl.utils.torch_functional import masked_mean

from steppo_verl.protocol import (
    Steps,
    locate_steps,
    read_state_values,
    scatter_to_step_starts,
    scatter_to_tokens,
    step_means,
    step_sums,
)

__all__ = [
    "LOSSES",
    "clip_binds",
    "compute_policy_loss_steppo",
    "compute_policy_loss_steppo_action_clip",
    "compute_policy_loss_steppo_step_mean",
    "step_clip_bounds",
    "step_start_mask",
    "step_start_value_loss",
]

# exp() of a log-ratio above this overflows float32 gradients long before it means anything.
_MAX_LOG_RATIO = 10.0


def clip_range(config: Any) -> tuple[float, float]:
    """``(low, high)`` clip bounds of an actor config: ``clip_ratio_low``/``clip_ratio_high``, each falling
    back to ``clip_ratio`` where unset (as verl reads them)."""
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    return low, high


def clip_binds(
    ratio: torch.Tensor, advantages: torch.Tensor, lower: float | torch.Tensor, upper: float | torch.Tensor
) -> torch.Tensor:
    """Where the PPO clip removes the gradient: ratio above ``upper`` with A > 0, below ``lower`` with A < 0."""
    return ((advantages > 0) & (ratio > upper)) | ((advantages < 0) & (ratio < lower))


# Loss modes whose clip range bounds the step's whole probability ratio (see the module docstring).
ACTION_CLIP_MODES = ("steppo_action_clip",)


def step_clip_bounds(
    steps: Steps, clip_low: float, clip_high: float, per_action: bool, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper clip bounds of each step's geometric-mean ratio.

    ``per_action=False``: 0-dim ``1 - clip_low`` and ``1 + clip_high``, the same for every step (they
    broadcast against ``[B, K]`` or ``[B, L]``, so the default losses build no per-token bounds).
    ``per_action=True``: ``[B, K]``; the range bounds the step's whole ratio, so an n-action-token step's
    geometric mean is bounded at ``(1 - clip_low) ** (1/n)`` and ``(1 + clip_high) ** (1/n)``.
    """
    if not 0 <= clip_low < 1 or not clip_high >= 0:
        raise ValueError(f"clip range must satisfy 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got "
                         f"({clip_low}, {clip_high})")
    if not per_action:
        # In the ratio's dtype, so clamp and comparisons round the bound as they would a [B, L] bound tensor.
        device = steps.step_mask.device
        lower = torch.full((), 1 - clip_low, dtype=dtype, device=device)
        return lower, torch.full((), 1 + clip_high, dtype=dtype, device=device)
    inverse_length = 1.0 / step_sums(steps.action.to(dtype), steps).clamp(min=1)
    return (1 - clip_low) ** inverse_length, (1 + clip_high) ** inverse_length


def _bound_on_tokens(bound: torch.Tensor, steps: Steps) -> torch.Tensor:
    """A clip bound of :func:`step_clip_bounds` where the token ratios are: ``[B, K]`` spread to ``[B, L]``,
    a 0-dim bound as it is."""
    return scatter_to_tokens(bound, steps) if bound.dim() else bound


def step_start_mask(steps: Steps) -> torch.Tensor:
    """``[B, L]`` bool, True at the first action token of every step (where V(s_k) is read)."""
    return scatter_to_step_starts(torch.zeros_like(steps.action), torch.ones_like(steps.step_mask), steps)


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
    """Clipped step-level policy objective, every action token weighted once (``loss_mode=steppo``).

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
        verl reports them, ``actor/pg_clipfrac_lower`` (token fraction where verl's dual clip,
        ``clip_ratio_c``, bounds a negative advantage's loss), plus ``actor/step_clipfrac`` (fraction of
        steps whose ratio was clipped, each step counted once) and ``actor/step_ratio_mean``.
    """
    return _step_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, step_ids
    )


@register_policy_loss("steppo_step_mean")
def compute_policy_loss_steppo_step_mean(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The same objective with every step weighted once (``loss_mode=steppo_step_mean``).

    Each token's loss is divided by its step's length, the per-trajectory sums are averaged over the
    global mini-batch's trajectories (verl's ``seq-mean-token-sum`` aggregation); ``loss_agg_mode``
    is not used. Arguments and metrics as :func:`compute_policy_loss_steppo`.
    """
    return _step_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, step_ids,
        equal_steps=True,
    )


@register_policy_loss("steppo_action_clip")
def compute_policy_loss_steppo_action_clip(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The ``steppo`` objective with the clip range on each step's whole ratio (``loss_mode=steppo_action_clip``).

    An n-action-token step's geometric-mean ratio is clipped at ``(1 - low) ** (1/n)`` and
    ``(1 + high) ** (1/n)`` (:func:`step_clip_bounds`), i.e. where the product of its token ratios leaves
    ``[1 - low, 1 + high]``. Arguments and metrics as :func:`compute_policy_loss_steppo`.
    """
    return _step_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, step_ids,
        per_action_clip=True,
    )


def _step_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights, step_ids,
    equal_steps: bool = False, per_action_clip: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    if config is None:
        raise ValueError("the steppo policy loss needs verl's actor config (clip ratios, global batch info)")
    clip_low, clip_high = clip_range(config)
    clip_ratio_c = config.get("clip_ratio_c", 3.0)
    if not clip_ratio_c > 1.0:
        raise ValueError(f"actor.clip_ratio_c (dual clip) must be > 1, got {clip_ratio_c}")
    steps = locate_steps(response_mask, step_ids)

    log_ratio = log_prob - old_log_prob
    step_log_ratio = step_means(log_ratio.detach(), steps)  # [B, K]
    # sg[log s_k] + log pi - sg[log pi]: value log s_k on every token, gradient of log pi(y_t).
    token_log_ratio = log_prob - log_prob.detach() + scatter_to_tokens(step_log_ratio.to(log_prob.dtype), steps)
    ratio = torch.exp(token_log_ratio.clamp(max=_MAX_LOG_RATIO))

    # [B, K] per step with the action clip; 0-dim (one bound for every token) otherwise.
    step_lower, step_upper = step_clip_bounds(steps, clip_low, clip_high, per_action_clip, ratio.dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, _bound_on_tokens(step_lower, steps), _bound_on_tokens(step_upper, steps))
    pg_losses = torch.maximum(unclipped, clipped)
    # Dual clip: a negative-advantage step whose ratio ran far above 1 contributes at most -A * c.
    dual_clipped = (advantages < 0) & (pg_losses > -advantages * clip_ratio_c)
    pg_losses = torch.where(dual_clipped, -advantages * clip_ratio_c, pg_losses)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss_mask = steps.action.to(pg_losses.dtype)
    if equal_steps:
        step_lengths = step_sums(loss_mask, steps).clamp(min=1)  # [B, K]
        token_weights = scatter_to_tokens((1.0 / step_lengths).to(pg_losses.dtype), steps)
        pg_loss = agg_loss(
            loss_mat=pg_losses * token_weights,
            loss_mask=loss_mask,
            loss_agg_mode="seq-mean-token-sum",
            **config.global_batch_info,
        )
    else:
        pg_loss = agg_loss(
            loss_mat=pg_losses, loss_mask=loss_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
        )

    with torch.no_grad():
        step_ratio = torch.exp(step_log_ratio.clamp(max=_MAX_LOG_RATIO))
        step_adv = step_means(advantages.detach(), steps)
        step_was_clipped = clip_binds(step_ratio, step_adv, step_lower, step_upper) & steps.step_mask
        num_steps = steps.step_mask.sum().clamp(min=1)
        metrics = {
            "actor/pg_clipfrac": masked_mean(torch.gt(clipped, unclipped).float(), loss_mask).item(),
            "actor/pg_clipfrac_lower": masked_mean(dual_clipped.float(), loss_mask).item(),
            "actor/ppo_kl": masked_mean(-log_ratio.detach(), loss_mask).item(),
            "actor/step_clipfrac": (step_was_clipped.sum() / num_steps).item(),
            "actor/step_ratio_mean": (torch.where(steps.step_mask, step_ratio, 0.0).sum() / num_steps).item(),
        }
    return pg_loss, metrics


def step_start_value_loss(
    config: Any, model_output: Any, data: Any, dp_group: Any = None, value_offset: int = 0
) -> tuple[torch.Tensor, dict]:
    """verl critic loss trained only at step starts (``algorithm.steppo.value_loss=step_starts``).

    StepPO reads V(s_k) at the first action token of step k and nowhere else; verl's value loss fits
    every action token to the step's return, spending the critic's capacity on positions inside steps
    that no estimator reads (the StepPO authors' code trains the step starts only). verl's clipped value
    loss (``critic.cliprange_value``) is applied at those positions; the squared errors are summed per
    trajectory and averaged over the global mini-batch's trajectories (``seq-mean-token-sum``), so
    every step start weighs the same. Same signature as verl's ``value_loss``
    (``verl/workers/utils/losses.py``), set with ``critic_wg.set_loss_fn`` by the StepPO trainer.

    Args:
        config: verl's ``CriticConfig``.
        model_output: the critic engine's output; ``values`` nested ``[B, j]`` over the whole sequence.
        data: the micro-batch TensorDict: ``values`` (old), ``returns``, ``response_mask`` nested
            ``[B, j]``, and verl's ``dp_size``, ``global_batch_size``.
        value_offset: ``algorithm.steppo.value_offset``; the value trained for step k (new and old) is the
            one at :func:`~steppo_verl.protocol.state_value_positions`, where the estimator reads V(s_k).

    Steps are the runs of ``response_mask`` (as in the policy loss): exact for ``steppo_agent`` and
    verl's tool agent loop, whose steps are always separated by observation tokens, and consistent with
    the mask verl hands the critic after its own edits (padding samples, rejection sampling), which the
    agent loop's ``step_ids`` in the same micro-batch do not follow.
    """
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    vpreds = no_padding_2_padding(model_output["values"], data)  # [B, L]
    padded = {
        name: (data[name].to_padded_tensor(pad) if data[name].is_nested else data[name])
        for name, pad in (("values", 0.0), ("returns", 0.0), ("response_mask", 0))
    }
    steps = locate_steps(padded["response_mask"])
    starts = step_start_mask(steps)
    vpreds = read_state_values(vpreds, steps, value_offset)
    dp_size, global_batch_size = data["dp_size"], data["global_batch_size"]
    vf_loss, vf_clipfrac = compute_value_loss(
        vpreds=vpreds,
        values=read_state_values(padded["values"], steps, value_offset),
        returns=padded["returns"],
        response_mask=starts,
        cliprange_value=config.cliprange_value,
        loss_agg_mode="seq-mean-token-sum",
        dp_size=dp_size,
        global_batch_size=global_batch_size,
    )
    # Normalised over the global batch, each micro-batch holds its share of the mean: the metric adds up.
    aggregation = AggregationType.SUM if dp_size > 1 or global_batch_size is not None else AggregationType.MEAN
    metrics = {
        "critic/vf_loss": Metric(value=vf_loss, aggregation=aggregation),
        "critic/vf_clipfrac": vf_clipfrac.detach().item(),
        "critic/vpred_mean": masked_mean(vpreds, starts).detach().item(),
    }
    return vf_loss, metrics


# What this module registers with verl; the plugin checks each entry after import.
LOSSES = {
    "steppo": compute_policy_loss_steppo,
    "steppo_step_mean": compute_policy_loss_steppo_step_mean,
    "steppo_action_clip": compute_policy_loss_steppo_action_clip,
}

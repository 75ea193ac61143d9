"""Step-level advantage estimators, registered with verl's estimator registry.

``steppo``      step-level GAE with a critic (the StepPO paper's estimator).
``gigpo``       GiGPO: episode groups + anchor-state step groups (Feng et al., 2025).
``step_grpo``   GRPO with a per-step discounted reward-to-go.
``step_rloo``   RLOO with a per-step discounted reward-to-go.
``hgpo``        HGPO: step groups by shared state history, weighted over history depths (He et al., 2026).

All of them read steps through :mod:`steppo_verl.protocol`; ``gamma`` and ``lam`` act per step,
never per token. verl's stock ``gae`` (token-level PPO) and ``grpo`` stay the token/trajectory
baselines. A verl estimator receives only ``token_level_rewards``, ``response_mask``, ``config``
and ``index``; the critic values, ``step_ids``, ``bootstrap_values`` and ``step_keys`` arrive as
extra keyword arguments from the StepPO trainer.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from verl.trainer.ppo.core_algos import register_adv_est
from verl.utils.torch_functional import masked_var, masked_whiten

from steppo_verl.protocol import Steps, gather_at_step_starts, locate_steps, scatter_to_tokens, step_rewards

__all__ = [
    "ESTIMATORS",
    "algorithm_option",
    "compute_steppo_advantage",
    "compute_gigpo_advantage",
    "compute_hgpo_advantage",
    "compute_step_grpo_advantage",
    "compute_step_rloo_advantage",
    "discounted_reverse_cumsum",
    "episode_baseline",
    "observed_step_returns",
    "step_returns",
]

# ----------------------------------------------------------------------------- input checks


def _check_finite(name: str, x: torch.Tensor, where: torch.Tensor | None = None) -> None:
    if where is None and x.dim() == 2 and bool(torch.isfinite(x.sum(dim=1, dtype=torch.float64)).all()):
        return  # fast path: a NaN/inf anywhere in a row makes its float64 sum non-finite
    bad = ~torch.isfinite(x)
    if where is not None:
        bad &= where
    if bool(bad.any()):
        position = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} contains NaN/inf at sample {position[0]}"
            + (f", position {position[1]}" if len(position) > 1 else "")
            + f" (value {x[tuple(position)].item()}); refusing to compute advantages from it"
        )


def _check_finite_rewards(token_level_rewards: torch.Tensor, step_rewards: torch.Tensor, steps: Steps) -> None:
    """Reject NaN/inf token rewards, read from their ``[B, K]`` step sums instead of a pass over ``[B, L]``.

    Every token reward of a sample with steps is added (in float64) into one of its step sums, and a
    NaN or +-inf term leaves that sum NaN or +-inf (+inf and -inf together give NaN). Only the
    samples whose sums say so, and samples without steps (their rewards reach no sum), are
    searched token by token for the message. A sum can also overflow from finite rewards; the
    search then finds nothing and the overflow check on the outputs reports it.
    """
    suspect = (steps.step_mask & ~torch.isfinite(step_rewards)).any(dim=1) | (steps.num_steps == 0)
    if bool(suspect.any()):
        _check_finite("token_level_rewards", token_level_rewards, where=suspect[:, None])


def _check_shape(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def _check_factor(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_advantage_clip(advantage_clip: float | None) -> None:
    if advantage_clip is not None and not float(advantage_clip) > 0.0:  # also refuses NaN
        raise ValueError(f"algorithm.steppo.advantage_clip must be a positive number or null, got {advantage_clip}")


# ----------------------------------------------------------------------------- dtypes and outputs


def _compute_dtype(token_level_rewards: torch.Tensor) -> torch.dtype:
    """At least float32: integer or bool rewards (and bf16/fp16 ones) are computed in float32."""
    return torch.promote_types(token_level_rewards.dtype, torch.float32)


def _output_dtype(token_level_rewards: torch.Tensor) -> torch.dtype:
    """The rewards' own float dtype; float32 for integer or bool rewards (an advantage is never integral)."""
    return token_level_rewards.dtype if token_level_rewards.dtype.is_floating_point else torch.float32


def _finite_to_tokens(name: str, step_values: torch.Tensor, steps: Steps, dtype: torch.dtype) -> torch.Tensor:
    """Cast ``[B, K]`` per-step outputs to ``dtype`` and broadcast them to ``[B, L]`` step tokens.

    The inputs were checked finite, so NaN/inf here means finite inputs overflowed (rewards near
    the float32 maximum, summed or squared). Checked on ``[B, K]``, which costs nothing next to
    the ``[B, L]`` passes.
    """
    cast = step_values.to(dtype)
    bad = steps.step_mask & ~torch.isfinite(cast)
    if bool(bad.any()):
        sample, step = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} overflowed to {cast[sample, step].item()} at sample {sample}, step {step}: the rewards "
            f"(or values) are finite but too large to compute in {str(dtype).removeprefix('torch.')}; rescale them"
        )
    return scatter_to_tokens(cast, steps)


# ----------------------------------------------------------------------------- step maths


# Steps per block of discounted_reverse_cumsum: a [256, 256] weight matrix (256 KiB in float32)
# covers every usual episode in one product and bounds memory for any number of steps.
_DISCOUNT_BLOCK = 256


def _discount_weights(size: int, factor: float, like: torch.Tensor) -> torch.Tensor:
    """``[size, size]`` upper-triangular ``W[k, j] = factor**(j - k)`` for ``j >= k``, else 0."""
    offsets = torch.arange(size, device=like.device, dtype=like.dtype)
    powers = offsets[None, :] - offsets[:, None]  # [size, size], j - k
    base = torch.as_tensor(factor, dtype=like.dtype, device=like.device)
    return torch.where(powers >= 0, base ** powers.clamp(min=0), 0)


def discounted_reverse_cumsum(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``y[:, k] = sum_{j >= k} factor**(j - k) * x[:, j]`` along the step axis of ``x [B, K]``.

    A ``[B, n] @ [n, n]`` product per block of ``n <= 256`` steps instead of a loop over steps;
    blocks run from the last one back, each adding the next block's first sum discounted to its
    steps (``factor**(end - k) * y[:, end]``). Episodes of up to 256 steps take one product; a
    row of 8,000 one-token steps needs no ``[K, K]`` matrix (that would be +838 MB at once).
    """
    num_steps = x.shape[1]
    block = max(1, min(num_steps, _DISCOUNT_BLOCK))
    weights = _discount_weights(block, factor, x)  # [block, block]
    base = torch.as_tensor(factor, dtype=x.dtype, device=x.device)
    y = torch.empty_like(x)
    for start in reversed(range(0, num_steps, block)):
        end = min(start + block, num_steps)
        size = end - start
        y[:, start:end] = x[:, start:end] @ weights[:size, :size].T
        if end < num_steps:  # the sums from the blocks after this one, discounted back to each step
            distance = torch.arange(size, 0, -1, device=x.device, dtype=x.dtype)  # end - k
            y[:, start:end] += y[:, end : end + 1] * base**distance
    return y


def step_returns(token_level_rewards: torch.Tensor, steps: Steps, gamma: float) -> torch.Tensor:
    """``[B, K]`` discounted reward-to-go per step, ``G_k = r_k + gamma * G_{k+1}``, from ``[B, L]`` rewards."""
    return observed_step_returns(step_rewards(token_level_rewards, steps), steps, gamma)


def _whiten_steps(advantages: torch.Tensor, step_mask: torch.Tensor, center: bool = True,
                  flat: bool = False) -> torch.Tensor:
    """Whiten over steps, each step counted once (not once per token); zeros where ``flat`` (the batch's
    returns are all equal: nothing to tell its steps apart, compute_steppo_advantage's ``skip_equal_returns``).

    ``center=False`` only divides by the standard deviation: advantages that already have a baseline
    (``r + gamma V(s') - V(s)``) keep their sign, so a step whose TD error is 0 (e.g. an answer the critic
    valued exactly) is not pushed up or down by the batch's mean over other kinds of steps.
    """
    count = int(step_mask.sum())
    if count == 0:
        return advantages
    if count == 1:
        raise ValueError(
            "step-level whitening needs at least 2 steps in the batch, got 1; "
            "use a larger batch or set algorithm.steppo.whiten=false"
        )
    if flat:
        return torch.zeros_like(advantages)
    if center:
        whitened = masked_whiten(advantages, step_mask)
    else:
        whitened = advantages * torch.rsqrt(masked_var(advantages, step_mask) + 1e-8)
    return torch.where(step_mask, whitened, torch.zeros_like(advantages))


def observed_step_returns(
    rewards: torch.Tensor, steps: Steps, gamma: float, bootstrap_values: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, K]`` the return observed from step k on, ``G_k + gamma**(K - k) * V_K``, from ``[B, K]`` step rewards;
    0 on absent steps. ``bootstrap_values`` ``[B]`` (0 where an episode terminated) continues cut-off episodes."""
    outcomes = discounted_reverse_cumsum(rewards, gamma)
    if bootstrap_values is not None:
        columns = torch.arange(steps.max_steps, device=outcomes.device)
        remaining = (steps.num_steps[:, None] - columns[None, :]).clamp(min=0).to(outcomes.dtype)
        discount = torch.as_tensor(gamma, dtype=outcomes.dtype) ** remaining
        outcomes = outcomes + discount * bootstrap_values.to(outcomes.dtype)[:, None]
    return torch.where(steps.step_mask, outcomes, torch.zeros_like(outcomes))


def _all_equal(x: torch.Tensor, mask: torch.Tensor, tolerance: float = 1e-6) -> bool:
    """Whether the masked entries of ``x`` all lie within ``tolerance`` (relative to their size, at least 1)."""
    if not bool(mask.any()):
        return False
    selected = x[mask]
    spread = selected.max() - selected.min()
    return bool(spread <= tolerance * max(1.0, float(selected.abs().max())))


# ----------------------------------------------------------------------------- StepPO


def compute_steppo_advantage(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    step_ids: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    bootstrap_values: torch.Tensor | None = None,
    whiten: bool = True,
    center: bool = True,
    skip_equal_returns: bool = True,
    batch_values: bool = False,
    advantage_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-level GAE (StepPO): one TD error per agent step, broadcast to the step's tokens.

    With r_k the step reward, V_k = V(s_k) the critic value at the step's first token and
    V_K = ``bootstrap_values`` (0 when the episode terminated, V(s_K) when it was cut off)::

        delta_k = r_k + gamma * V_{k+1} - V_k
        A_k     = delta_k + gamma * lam * A_{k+1}
        R_k     = A_k + V_k

    Args:
        token_level_rewards: ``[B, L]`` rewards; a step's reward is the sum over its tokens plus
            rewards on the non-action tokens after it (see :func:`protocol.step_rewards`).
        values: ``[B, L]`` critic values in verl's alignment (``values[:, t]`` is V before token t).
        response_mask: ``[B, L]`` 1 on action tokens.
        step_ids: ``[B, L]`` int64 step ids (-1 off action tokens); ``None`` recovers steps as the
            runs of 1s in ``response_mask``.
        gamma: discount per step.
        lam: GAE lambda per step.
        bootstrap_values: ``[B]`` value after the final step; ``None`` means every episode
            terminated (zeros).
        whiten: whiten the advantages over all steps in the batch, each step counted once.
        center: whitening subtracts the batch's mean step advantage (verl's ``masked_whiten``); ``False``
            divides by the standard deviation only, keeping each step's sign.
        skip_equal_returns: with ``whiten`` and ``lam = 1``, a batch whose observed returns (reward-to-go, with
            the bootstrap value where an episode is cut off) are equal at every step gets zero advantages, as GRPO
            gives a group whose rewards are equal. Its advantages ``G - V(s_k)`` then depend on the states alone,
            not on the actions taken (zero in expectation: only noise), and whitening scales them to unit size
            whatever their size: on the depth-5 vault, batches without a success had step advantages of -9 to
            +10 from values that differed by ~1e-2 (benchmarks/README.md). With ``lam < 1`` the TD errors read
            V(s_{k+1}), which an action changes, so such batches are whitened as before, unless ``batch_values``.
        batch_values: ``values`` are the batch's own Monte-Carlo returns per state (``algorithm.steppo.values``
            ``state_returns`` or ``branch_returns``; the critic's only where a state has no other visit). With the
            returns all equal such values hold no information about the actions at any ``lam``: their TD errors
            are 0 except at the critic's stand-ins, which whitening would blow up to about +-10 (benchmarks/README.md,
            depth 5). ``skip_equal_returns`` then zeroes the batch at every ``lam``.
        advantage_clip: bound on ``|A_k|`` after whitening; ``None``: unbounded. Whitening scales a batch's
            advantages to unit variance however few steps carry them, so an outcome that is rare in the batch (one
            success in 64 rollouts, or three failures) gets pushes of 6-9 on its steps (benchmarks/README.md); GRPO's
            groups of n bound theirs at (n - 1) / sqrt(n) (2.5 for 8). The critic's targets are not clipped.

    Returns:
        advantages: ``[B, L]`` A_k on the tokens of step k, 0 elsewhere.
        returns: ``[B, L]`` R_k (critic targets) on the tokens of step k, 0 elsewhere.
    """
    shape = response_mask.shape
    _check_shape("token_level_rewards", token_level_rewards, shape)
    _check_shape("values", values, shape)
    _check_factor("gamma", gamma)
    _check_factor("lam", lam)
    check_advantage_clip(advantage_clip)
    steps = locate_steps(response_mask, step_ids)

    with torch.no_grad():
        dtype = _compute_dtype(token_level_rewards)
        rewards = step_rewards(token_level_rewards.to(dtype), steps)  # [B, K]
        _check_finite_rewards(token_level_rewards, rewards, steps)
        step_values = gather_at_step_starts(values, steps).to(dtype)  # [B, K] V(s_k)
        step_mask = steps.step_mask
        _check_finite("values at step starts", step_values, step_mask)

        if bootstrap_values is None:
            bootstrap_values = rewards.new_zeros(shape[0])
        _check_shape("bootstrap_values", bootstrap_values, torch.Size([shape[0]]))
        _check_finite("bootstrap_values", bootstrap_values)

        next_values = torch.where(
            steps.is_last(), bootstrap_values.to(dtype)[:, None], F.pad(step_values[:, 1:], (0, 1))
        )
        deltas = torch.where(step_mask, rewards + gamma * next_values - step_values, torch.zeros_like(rewards))
        advantages = discounted_reverse_cumsum(deltas, gamma * lam)
        returns = advantages + step_values
        if whiten:
            # At lam = 1 a step's advantage is its observed return minus V(s_k): with the returns all equal it says
            # nothing about the actions, only about the critic (lam < 1 reads V(s_{k+1}), which can, unless the
            # values come from these same returns).
            flat = skip_equal_returns and (lam == 1.0 or batch_values) and _all_equal(
                observed_step_returns(rewards, steps, gamma, bootstrap_values), step_mask
            )
            advantages = _whiten_steps(advantages, step_mask, center, flat)
        if advantage_clip is not None:
            advantages = advantages.clamp(-float(advantage_clip), float(advantage_clip))

        out_dtype = _output_dtype(token_level_rewards)
        return (
            _finite_to_tokens("advantages", advantages, steps, out_dtype),
            _finite_to_tokens("returns", returns, steps, out_dtype),
        )


# ----------------------------------------------------------------------------- group baselines


# verl pads a batch that does not divide by the mini-batch size with no-op samples that share one
# fresh uid, "pad" + 32 hex digits (verl/trainer/ppo/padding_utils.py); they are no prompt's group.
_VERL_PADDING_UID = re.compile(r"pad[0-9a-f]{32}")


def _group_ids(index: Any, batch_size: int, device: torch.device, estimator: str) -> torch.Tensor:
    """Map verl's per-sample ``uid`` array (prompt groups) to dense int64 group ids ``[B]``.

    Raises:
        ValueError: ``index`` is missing or misshapen, or every prompt has a single rollout.
    """
    if index is None:
        raise ValueError("group-relative estimators need the per-sample prompt uid (`index`); none was given")
    index = np.asarray(index)
    if index.shape != (batch_size,):
        raise ValueError(f"index (uid) has shape {index.shape}, expected ({batch_size},)")
    uids, inverse, counts = np.unique(
        index.astype(str) if index.dtype == object else index, return_inverse=True, return_counts=True
    )
    _check_prompts_have_several_rollouts(estimator, uids, counts)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64, device=device)


def _check_prompts_have_several_rollouts(estimator: str, uids: np.ndarray, counts: np.ndarray) -> None:
    """Refuse a batch in which no prompt has a second rollout to compare with (``rollout.n = 1``).

    Every baseline would then be 0 and the estimator would silently train on raw returns. A batch
    where only some prompts have one rollout is fine: those keep their raw return (verl's GRPO rule).
    """
    prompts = np.array([_VERL_PADDING_UID.fullmatch(str(uid)) is None for uid in uids], dtype=bool)
    if prompts.any() and bool((counts[prompts] == 1).all()):
        raise ValueError(
            f"adv_estimator={estimator} compares the rollouts of each prompt, but every prompt in this batch has "
            "a single rollout, so every baseline would be 0; set actor_rollout_ref.rollout.n > 1 "
            "(or use a critic-based estimator such as steppo)"
        )


def _group_stats(x: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-element group count, mean and unbiased std (``torch.std`` convention), all ``[N]`` in ``x``'s dtype.

    Accumulated in float64: a float32 mean of equal values can miss them by one ulp, and that ulp divided
    by ``std + eps`` would be an advantage of ~0.1 for rollouts that all did the same.
    """
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    x64 = x.double()
    count = torch.zeros(num_groups, dtype=torch.float64, device=x.device).index_add_(0, groups, torch.ones_like(x64))
    mean = torch.zeros_like(count).index_add_(0, groups, x64) / count
    squares = torch.zeros_like(count).index_add_(0, groups, (x64 - mean[groups]) ** 2)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    return count[groups].to(x.dtype), mean[groups].to(x.dtype), std[groups].to(x.dtype)


def episode_baseline(
    episode_return: torch.Tensor, groups: torch.Tensor, scale_by_std: bool, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative baseline and scale ``[B]`` of the episode return G_0.

    A group of one keeps its raw value (baseline 0, scale 1): verl's GRPO rule. A group whose returns are
    equal (std below ``epsilon``: rounding) is not scaled either: with ``gamma < 1`` a later step's return
    differs from G_0 by the discount, and dividing that by ``std + eps`` would blow it up.
    """
    count, mean, std = _group_stats(episode_return, groups)
    single = count < 2
    baseline = torch.where(single, torch.zeros_like(mean), mean)
    unscaled = single | (std < epsilon)
    scale = torch.where(unscaled, torch.ones_like(std), std + epsilon) if scale_by_std else torch.ones_like(std)
    return baseline, scale


def compute_step_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    step_ids: torch.Tensor | None = None,
    gamma: float = 1.0,
    norm_adv_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO on per-step reward-to-go: ``A_k = (G_k - mean_g G_0) / (std_g G_0 + eps)``.

    The baseline is the prompt group's episode return G_0 (state-independent, so unbiased).
    With ``gamma = 1`` and only an outcome reward, ``G_k = G_0`` and this equals verl's ``grpo``.

    Args:
        token_level_rewards, response_mask, step_ids: as in :func:`compute_steppo_advantage`.
        index: ``[B]`` prompt uid per sample; samples sharing it form a group.

    Returns:
        ``[B, L]`` advantages and the same tensor as returns (verl's convention for critic-free
        estimators).
    """
    steps, returns, groups = _group_inputs("step_grpo", token_level_rewards, response_mask, index, step_ids, gamma)
    step_mask = steps.step_mask
    baseline, scale = episode_baseline(_episode_return(returns), groups, norm_adv_by_std, epsilon)
    advantages = torch.where(step_mask, (returns - baseline[:, None]) / scale[:, None], torch.zeros_like(returns))
    advantages = _finite_to_tokens("advantages", advantages, steps, _output_dtype(token_level_rewards))
    return advantages, advantages


def compute_step_rloo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    step_ids: torch.Tensor | None = None,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO on per-step reward-to-go: ``A_k = G_k - mean of the other group members' G_0``.

    With ``gamma = 1`` and only an outcome reward this equals verl's ``rloo``; a group of one
    keeps its raw return, as there.
    """
    steps, returns, groups = _group_inputs("step_rloo", token_level_rewards, response_mask, index, step_ids, gamma)
    step_mask = steps.step_mask
    episode_return = _episode_return(returns)
    count, mean, _ = _group_stats(episode_return, groups)
    leave_one_out = torch.where(count > 1, (mean * count - episode_return) / (count - 1).clamp(min=1), 0.0)
    advantages = torch.where(step_mask, returns - leave_one_out[:, None], torch.zeros_like(returns))
    advantages = _finite_to_tokens("advantages", advantages, steps, _output_dtype(token_level_rewards))
    return advantages, advantages


def compute_gigpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    step_ids: torch.Tensor | None = None,
    step_keys: torch.Tensor | None = None,
    gamma: float = 1.0,
    step_weight: float = 1.0,
    norm_adv_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GiGPO (Feng et al., 2025): ``A_k = A^E + step_weight * A^S_k``.

    ``A^E`` normalises the episode return G_0 within the prompt group (as GRPO). ``A^S_k``
    normalises the step's discounted reward-to-go G_k within its *anchor-state group*: the steps,
    across the prompt group's trajectories, taken from the same state.

    Args:
        token_level_rewards, response_mask, step_ids: as in :func:`compute_steppo_advantage`.
        index: ``[B]`` prompt uid per sample.
        step_keys: ``[B, K]`` int64 key of the state each step was taken from (the agent loop
            records a hash of the observation). ``None`` falls back to the step index: the k-th
            steps of one prompt's trajectories form a group. That is exact for step 0 (same
            prompt) and an approximation after it; record keys to get true anchor states.
        step_weight: weight of the step-level term (the GiGPO paper's omega, 1.0).
        norm_adv_by_std: divide by the group std ("mean_std") or only centre ("mean_norm").

    Returns:
        ``[B, L]`` advantages, twice (no critic returns).
    """
    steps, returns, groups = _group_inputs("gigpo", token_level_rewards, response_mask, index, step_ids, gamma)
    step_mask = steps.step_mask
    episode_adv = _episode_advantage(returns, groups, norm_adv_by_std, epsilon)  # [B]
    anchor_groups = _history_groups(_state_keys(step_keys, returns), groups, step_mask, history_length=0)[:, 0]
    step_adv = torch.zeros_like(returns)
    step_adv[step_mask] = _relative_in_groups(returns[step_mask], anchor_groups, norm_adv_by_std, epsilon)[0]

    advantages = torch.where(step_mask, episode_adv[:, None] + step_weight * step_adv, torch.zeros_like(returns))
    advantages = _finite_to_tokens("advantages", advantages, steps, _output_dtype(token_level_rewards))
    return advantages, advantages


def _episode_return(returns: torch.Tensor) -> torch.Tensor:
    """``[B]`` G_0, the whole episode's discounted return (0 for a sample without steps)."""
    return returns[:, 0] if returns.shape[1] else returns.new_zeros(returns.shape[0])


def _episode_advantage(returns: torch.Tensor, groups: torch.Tensor, scale_by_std: bool, epsilon: float) -> torch.Tensor:
    """``[B]`` GRPO's advantage of the episode return G_0 within its prompt group."""
    episode_return = _episode_return(returns)
    baseline, scale = episode_baseline(episode_return, groups, scale_by_std, epsilon)
    return (episode_return - baseline) / scale


def _state_keys(step_keys: torch.Tensor | None, returns: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` int64 key of the state each step was taken from; the step index where none were recorded.

    Columns past the batch's largest step count are cut off; too few columns are an error.
    """
    batch_size, max_steps = returns.shape
    if step_keys is None:
        return torch.arange(max_steps, device=returns.device).expand(batch_size, max_steps)
    step_keys = torch.as_tensor(step_keys, device=returns.device)[:, :max_steps]
    _check_shape("step_keys", step_keys, returns.shape)
    return step_keys.long()


def _history_groups(
    step_keys: torch.Tensor, groups: torch.Tensor, step_mask: torch.Tensor, history_length: int
) -> torch.Tensor:
    """``[N, K+1]`` group of each step (N = steps in the batch) by prompt and k-step history, k = 1..K+1.

    Two steps share the level-k group exactly when they share the prompt and the keys of their
    last k steps, a "start" marker standing for each step before step 0. Level 1 is GiGPO's
    anchor-state group; level k+1 splits level k by the key one step further back. Ids are
    distinct across levels.

    Each level is one 1-D ``torch.unique`` of ``previous level's id * (start + 1) + older key's id``,
    with keys numbered densely and ``start`` the marker's id: exact (no hashing, no overflow below
    3e9 steps) and far faster than ``torch.unique(dim=0)`` on rows of keys.

    Args:
        step_keys: ``[B, S]`` int64 state key per step.
        groups: ``[B]`` dense prompt group per sample.
        step_mask: ``[B, S]`` True where the step exists.
        history_length: K.
    """
    batch_size, max_steps = step_keys.shape
    key_ids = torch.unique(step_keys, return_inverse=True)[1].reshape(step_keys.shape)  # [B, S], dense
    start = int(key_ids.max()) + 1 if key_ids.numel() else 0  # the marker: an id no key has
    # Left-pad K markers so that the key `back` steps before step t sits at column t + K - back.
    padded = F.pad(key_ids, (history_length, 0), value=start)
    positions = torch.arange(max_steps, device=step_keys.device)
    group = groups[:, None].expand(batch_size, max_steps)[step_mask]  # [N] level 0: the prompt
    levels = []
    for back in range(history_length + 1):  # level k = back + 1 adds the key `back` steps before t
        older_key = padded[:, positions + history_length - back][step_mask]  # [N]
        group = torch.unique(group * (start + 1) + older_key, return_inverse=True)[1]
        levels.append(group + back * group.numel())
    return torch.stack(levels, dim=1)


def _relative_in_groups(
    x: torch.Tensor, groups: torch.Tensor, scale_by_std: bool, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative value of ``x [N]``: ``(x - mean) / (std + eps)`` (or only centred), per element.

    Returns:
        relative: ``[N]``; 0 in a group of one, which has nothing to compare with (a state visited
            once gets no step term, not its raw return).
        compared: ``[N]`` bool, True where the element's group has more than one member.
    """
    count, mean, std = _group_stats(x, groups)
    compared = count > 1
    centred = torch.where(compared, x - mean, 0.0)
    return (centred / (std + epsilon) if scale_by_std else centred), compared


def _group_inputs(estimator, token_level_rewards, response_mask, index, step_ids, gamma):
    _check_shape("token_level_rewards", token_level_rewards, response_mask.shape)
    _check_factor("gamma", gamma)
    steps = locate_steps(response_mask, step_ids)
    _check_finite("token_level_rewards", token_level_rewards)
    returns = step_returns(token_level_rewards.to(_compute_dtype(token_level_rewards)), steps, gamma)
    groups = _group_ids(index, response_mask.shape[0], response_mask.device, estimator)
    return steps, returns, groups


# ----------------------------------------------------------------------------- verl registration


def algorithm_option(config: Any, path: str, default: Any) -> Any:
    """Read ``algorithm.<path>`` from verl's algorithm config (DictConfig, AlgoConfig or dict)."""
    node = config
    for part in path.split("."):
        if node is None:
            return default
        node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


VALUE_SOURCES = ("critic", "state_returns", "branch_returns", "oracle")


def value_source(algorithm: Any) -> str:
    """``algorithm.steppo.values``: what StepPO reads as V(s_k); ``critic`` (the method) by default.

    ``state_returns`` reads the batch's leave-one-out mean return of each step's state instead
    (:func:`steppo_verl.metrics.state_mean_returns`, which the StepPO trainer writes into ``values``; the critic's
    value where a state is visited once): a measurement arm, the upper bound of what a calibrated critic gives,
    not a training method.
    ``branch_returns`` does the same for the states that branched rollouts share exactly (the prompt, and
    each branch point: :func:`steppo_verl.branching.branch_state_keys`), the critic's value elsewhere: an
    unbiased Monte-Carlo V(s_k) from siblings, which only branching rollouts provide.
    ``oracle`` reads a task's exact values of the current policy (``algorithm.steppo.oracle``, e.g. the vault's from
    the policy's door probabilities, :mod:`steppo_verl.tasks.vault.oracle`), the critic's value where the oracle
    has none: the upper bound of step credit without Monte-Carlo noise.
    """
    source = algorithm_option(algorithm, "steppo.values", "critic")
    if source not in VALUE_SOURCES:
        raise ValueError(f"algorithm.steppo.values must be one of {VALUE_SOURCES}, got {source!r}")
    return source


def value_offset(algorithm: Any) -> int | str:
    """``algorithm.steppo.value_offset``: tokens before each step start (and the bootstrap position) where V(s_k) is
    read (:func:`steppo_verl.protocol.state_value_positions`); 0, the step start itself, by default. ``auto``: the
    chat template's fixed tokens after an observation, which the StepPO trainer counts with the tokenizer at
    start-up and writes back as a number (:func:`steppo_verl.trainer.resolve_value_offset`)."""
    offset = algorithm_option(algorithm, "steppo.value_offset", 0)
    if offset != "auto" and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        raise ValueError(f"algorithm.steppo.value_offset must be an integer >= 0 (tokens) or auto, got {offset!r}")
    return offset


@register_adv_est("steppo")
def steppo_estimator(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Any = None,
    values: torch.Tensor | None = None,
    step_ids: torch.Tensor | None = None,
    bootstrap_values: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl entry for ``algorithm.adv_estimator=steppo``; see :func:`compute_steppo_advantage`."""
    if values is None:
        raise ValueError(
            "adv_estimator=steppo needs critic values at step starts, and verl does not pass `values` "
            "to registered estimators. Set critic.enable=true and train through the StepPO trainer "
            "(python -m steppo_verl.main), which hands values, step_ids and bootstrap values to the estimator."
        )
    return compute_steppo_advantage(
        token_level_rewards,
        values,
        response_mask,
        step_ids=step_ids,
        gamma=algorithm_option(config, "gamma", 1.0),
        lam=algorithm_option(config, "lam", 1.0),
        bootstrap_values=bootstrap_values,
        whiten=algorithm_option(config, "steppo.whiten", True),
        center=algorithm_option(config, "steppo.center", True),
        skip_equal_returns=algorithm_option(config, "steppo.skip_equal_returns", True),
        batch_values=value_source(config) != "critic",
        advantage_clip=algorithm_option(config, "steppo.advantage_clip", None),
    )


@register_adv_est("gigpo")
def gigpo_estimator(token_level_rewards, response_mask, config=None, index=None, step_ids=None, step_keys=None, **kwargs):
    """verl entry for ``algorithm.adv_estimator=gigpo``; see :func:`compute_gigpo_advantage`."""
    return compute_gigpo_advantage(
        token_level_rewards,
        response_mask,
        index,
        step_ids=step_ids,
        step_keys=step_keys,
        gamma=algorithm_option(config, "gamma", 1.0),
        step_weight=algorithm_option(config, "gigpo.step_weight", 1.0),
        norm_adv_by_std=algorithm_option(config, "norm_adv_by_std_in_grpo", True),
    )


@register_adv_est("step_grpo")
def step_grpo_estimator(token_level_rewards, response_mask, config=None, index=None, step_ids=None, **kwargs):
    """verl entry for ``algorithm.adv_estimator=step_grpo``; see :func:`compute_step_grpo_advantage`."""
    return compute_step_grpo_advantage(
        token_level_rewards,
        response_mask,
        index,
        step_ids=step_ids,
        gamma=algorithm_option(config, "gamma", 1.0),
        norm_adv_by_std=algorithm_option(config, "norm_adv_by_std_in_grpo", True),
    )


@register_adv_est("step_rloo")
def step_rloo_estimator(token_level_rewards, response_mask, config=None, index=None, step_ids=None, **kwargs):
    """verl entry for ``algorithm.adv_estimator=step_rloo``; see :func:`compute_step_rloo_advantage`."""
    return compute_step_rloo_advantage(
        token_level_rewards, response_mask, index, step_ids=step_ids, gamma=algorithm_option(config, "gamma", 1.0)
    )


# ----------------------------------------------------------------------------- HGPO


def compute_hgpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    step_ids: torch.Tensor | None = None,
    step_keys: torch.Tensor | None = None,
    gamma: float = 0.95,
    history_length: int = 4,
    alpha: float = 1.0,
    episode_weight: float = 0.0,
    norm_adv_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HGPO, Hierarchy-of-Groups Policy Optimization (He et al., 2026, arXiv 2602.22817).

    GiGPO compares steps taken from the same state even when the trajectories got there by
    different paths; HGPO also groups steps by how much of their recent history they share.
    For step t of a trajectory and k = 1..K+1 (K = ``history_length``), the k-step history is

        h_k(t) = (key of step t-k+1, ..., key of step t)

    with a "start" marker in place of the steps before step 0, so a history shorter than k only
    equals the histories of other trajectories at the same position with the same keys. The
    level-k group of a step holds the steps of the same prompt (uid) with the same h_k; the
    groups are nested (h_{k+1} equal implies h_k equal). With G_t the discounted reward-to-go::

        A_k(t) = (G_t - mean of the level-k group) / (std of the group + eps)
        A(t)   = sum_k w_k A_k(t) / sum_k w_k,   w_k = (k+1)**alpha,
                 both sums over the levels whose group has more than one member

    A step whose groups all have one member has nothing to compare with and gets 0. The
    optional episode term adds ``episode_weight`` x GRPO's advantage of G_0, as in GiGPO
    (the paper uses none).

    Args:
        token_level_rewards, response_mask, step_ids: as in :func:`compute_steppo_advantage`.
        index: ``[B]`` prompt uid per sample.
        step_keys: ``[B, K]`` int64 key of the state each step was taken from (the agent loop's
            observation key). ``None`` falls back to the step index, as in
            :func:`compute_gigpo_advantage`; every level then equals the step-index group.
        gamma: discount per step (the paper's 0.95).
        history_length: K, the most past steps a group shares (the paper uses 2 and 4).
        alpha: exponent of the level weights; larger favours deeper, more consistent groups.
        episode_weight: weight of the episode-level GRPO term (0: none).
        norm_adv_by_std: divide by the group std ("mean_std") or only centre ("mean_norm").

    Returns:
        ``[B, L]`` advantages, twice (no critic returns).
    """
    _check_hgpo_options(history_length, alpha, episode_weight)
    steps, returns, groups = _group_inputs("hgpo", token_level_rewards, response_mask, index, step_ids, gamma)
    step_mask = steps.step_mask
    history_groups = _history_groups(_state_keys(step_keys, returns), groups, step_mask, history_length)
    history_adv = torch.zeros_like(returns)
    history_adv[step_mask] = _hierarchy_advantage(returns[step_mask], history_groups, alpha, norm_adv_by_std, epsilon)
    episode_adv = _episode_advantage(returns, groups, norm_adv_by_std, epsilon)  # [B]
    advantages = torch.where(step_mask, episode_weight * episode_adv[:, None] + history_adv, torch.zeros_like(returns))
    advantages = _finite_to_tokens("advantages", advantages, steps, _output_dtype(token_level_rewards))
    return advantages, advantages


def _check_hgpo_options(history_length: Any, alpha: Any, episode_weight: Any) -> None:
    if isinstance(history_length, bool) or not isinstance(history_length, (int, np.integer)) or history_length < 0:
        raise ValueError(
            f"hgpo history_length (algorithm.hgpo.history_length) must be an integer >= 0, got {history_length!r}"
        )
    for name, value in (("alpha", alpha), ("episode_weight", episode_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise ValueError(f"hgpo {name} (algorithm.hgpo.{name}) must be a finite number, got {value!r}")


def _hierarchy_advantage(
    returns: torch.Tensor, history_groups: torch.Tensor, alpha: float, scale_by_std: bool, epsilon: float
) -> torch.Tensor:
    """``[N]`` the weighted mean over levels of the group-relative returns; 0 with no group of two.

    Args:
        returns: ``[N]`` G_t of each step.
        history_groups: ``[N, levels]`` from :func:`_history_groups`.
    """
    num_steps, num_levels = history_groups.shape
    level_returns = returns[:, None].expand(num_steps, num_levels).reshape(-1)
    relative, compared = _relative_in_groups(level_returns, history_groups.reshape(-1), scale_by_std, epsilon)
    relative, compared = relative.view(num_steps, num_levels), compared.view(num_steps, num_levels)
    # w_k / sum of the compared levels' w_k as a softmax of alpha * log(k + 1): no overflow for any alpha.
    log_weights = alpha * torch.log(torch.arange(2, num_levels + 2, device=returns.device, dtype=returns.dtype))
    weights = torch.softmax(torch.where(compared, log_weights, -torch.inf), dim=1)  # NaN where nothing compared
    return (torch.where(compared, weights, 0.0) * relative).sum(dim=1)


@register_adv_est("hgpo")
def hgpo_estimator(
    token_level_rewards, response_mask, config=None, index=None, step_ids=None, step_keys=None, **kwargs
):
    """verl entry for ``algorithm.adv_estimator=hgpo``; see :func:`compute_hgpo_advantage`."""
    return compute_hgpo_advantage(
        token_level_rewards,
        response_mask,
        index,
        step_ids=step_ids,
        step_keys=step_keys,
        gamma=algorithm_option(config, "gamma", 0.95),
        history_length=algorithm_option(config, "hgpo.history_length", 4),
        alpha=algorithm_option(config, "hgpo.alpha", 1.0),
        episode_weight=algorithm_option(config, "hgpo.episode_weight", 0.0),
        norm_adv_by_std=algorithm_option(config, "norm_adv_by_std_in_grpo", True),
    )


# What this module registers with verl; the plugin checks each entry after import.
ESTIMATORS = {
    "steppo": steppo_estimator,
    "gigpo": gigpo_estimator,
    "step_grpo": step_grpo_estimator,
    "step_rloo": step_rloo_estimator,
    "hgpo": hgpo_estimator,
}

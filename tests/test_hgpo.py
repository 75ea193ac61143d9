"""HGPO (``hgpo``): hierarchy-of-groups step advantages against a plain-loop reference."""

import math
import random

import numpy as np
import pytest
import torch
from layouts import broadcast_rows, random_layout, reference_step_return_rows
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.ray_trainer import compute_advantage

from steppo_verl.advantage import ESTIMATORS, compute_gigpo_advantage, compute_hgpo_advantage, hgpo_estimator
from steppo_verl.trainer import _CURRENT_BATCH, _StepBatch, compute_step_advantages

START = "start"  # the reference's marker for steps before step 0: a string never equals an int key


def _uids(batch_size, group_size):
    return np.array([f"prompt-{i // group_size}" for i in range(batch_size)], dtype=object)


def _mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _history(keys_row, t, k):
    return tuple(keys_row[j] if j >= 0 else START for j in range(t - k + 1, t + 1))


def reference_hgpo(layout, uids, keys, gamma, history_length, alpha, episode_weight=0.0, scale_by_std=True, eps=1e-6):
    """HGPO written from its definition: loops over samples, steps, levels and group members."""
    returns = reference_step_return_rows(layout, gamma)
    batch = range(len(returns))
    per_step = []
    for b, g in enumerate(returns):
        episode = 0.0
        if g:
            group = [returns[c][0] if returns[c] else 0.0 for c in batch if uids[c] == uids[b]]
            if len(group) > 1:
                mean, std = _mean_std(group)
                episode = (g[0] - mean) / (std + eps) if scale_by_std else g[0] - mean
            else:
                episode = g[0]  # a prompt group of one keeps its raw return (GRPO's rule)
        row = []
        for t in range(len(g)):
            weighted, total = 0.0, 0.0
            for k in range(1, history_length + 2):
                members = [
                    returns[c][s]
                    for c in batch
                    if uids[c] == uids[b]
                    for s in range(len(returns[c]))
                    if _history(keys[c], s, k) == _history(keys[b], t, k)
                ]
                if len(members) > 1:
                    mean, std = _mean_std(members)
                    weight = (k + 1) ** alpha
                    weighted += weight * ((g[t] - mean) / (std + eps) if scale_by_std else g[t] - mean)
                    total += weight
            row.append(episode_weight * episode + (weighted / total if total else 0.0))
        per_step.append(row)
    return broadcast_rows(layout, per_step)


def _random_keys(seed, layout, alphabet):
    """``[B, K]`` state keys from a small alphabet (with 0), so deep shared histories and lone ones both occur."""
    rng = random.Random(seed)
    max_steps = max(1, int(layout.step_ids.max()) + 1)
    return torch.tensor(
        [[rng.randrange(alphabet) for _ in range(max_steps)] for _ in range(layout.step_ids.shape[0])]
    )


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(
    "history_length,alpha,gamma,episode_weight,scale_by_std",
    [(4, 1.0, 0.95, 0.0, True), (2, 1.0, 1.0, 0.0, True), (0, 1.0, 0.9, 0.0, True), (3, 2.5, 0.9, 0.5, False)],
)
def test_random_histories_with_groups_of_one_match_plain_loop_reference(
    seed, history_length, alpha, gamma, episode_weight, scale_by_std
):
    # Three prompts of four rollouts and one prompt with a single rollout, whose steps are all
    # groups of one; keys from {0, 1, 2} give both shared and lone histories at every depth.
    layout = random_layout(seed, batch_size=13, max_steps=6, reward_mode="mixed")
    uids = np.array([*_uids(12, 4), "lone"], dtype=object)
    keys = _random_keys(seed, layout, alphabet=3)
    adv, ret = compute_hgpo_advantage(
        layout.rewards, layout.response_mask, uids, layout.step_ids, step_keys=keys, gamma=gamma,
        history_length=history_length, alpha=alpha, episode_weight=episode_weight, norm_adv_by_std=scale_by_std,
    )
    expected = reference_hgpo(
        layout, uids, keys.tolist(), gamma, history_length, alpha, episode_weight, scale_by_std
    )
    torch.testing.assert_close(adv.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(adv, ret)


def _three_step_rows(outcomes):
    """Rows ``a o b o c o`` (three one-token steps, observations between) with an outcome on the last token."""
    step_ids = torch.tensor([[0, -1, 1, -1, 2, -1]] * len(outcomes))
    rewards = torch.zeros(step_ids.shape)
    rewards[:, -1] = torch.tensor(outcomes)
    return step_ids, (step_ids >= 0).long(), rewards


def test_hand_computed_two_level_hierarchy():
    # One prompt, three trajectories; gamma = 1 and an outcome reward, so G_t = outcome = 1, 0, 0.5.
    # K = 1: levels k = 1 (current state) and k = 2 (previous + current), weights 2 and 3.
    step_ids, mask, rewards = _three_step_rows([1.0, 0.0, 0.5])
    keys = torch.tensor([[7, 1, 5], [7, 2, 5], [7, 1, 5]])
    adv, _ = compute_hgpo_advantage(
        rewards, mask, np.array(["p"] * 3, dtype=object), step_ids, step_keys=keys, gamma=1.0, history_length=1
    )
    eps = 1e-6
    # Step 0: one group of three at both levels: mean 0.5, std 0.5.
    step0 = [(g - 0.5) / (0.5 + eps) for g in (1.0, 0.0, 0.5)]
    # Step 1: trajectories 0 and 2 share state 1 (and history (7, 1)): mean 0.75, std sqrt(0.125);
    # trajectory 1 is alone in state 2 at both levels, so it gets 0.
    pair = (1.0 - 0.75) / (math.sqrt(0.125) + eps)
    step1 = [pair, 0.0, -pair]
    # Step 2: all share state 5 (level 1 as step 0); only 0 and 2 share the history (1, 5).
    step2 = [(2 * step0[0] + 3 * pair) / 5, step0[1], (2 * step0[2] - 3 * pair) / 5]
    expected = torch.tensor([[a, 0.0, b, 0.0, c, 0.0] for a, b, c in zip(step0, step1, step2)])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv[:, 4], torch.tensor([0.82426, -1.0, -0.42426]), atol=1e-4, rtol=1e-4)


def test_real_key_zero_is_not_the_start_marker():
    # Trajectories 0 and 2 reach state 5 at their second step from state 0; trajectory 1 starts in
    # state 5. The histories (0, 5) and (start, 5) must differ even though a key may be 0.
    step_ids = torch.tensor([[0, -1, 1, -1], [0, -1, -1, -1], [0, -1, 1, -1]])
    mask = (step_ids >= 0).long()
    rewards = torch.zeros(step_ids.shape)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 0.5])
    keys = torch.tensor([[0, 5], [5, 0], [0, 5]])  # trajectory 1's second key is padding
    adv, _ = compute_hgpo_advantage(
        rewards, mask, np.array(["p"] * 3, dtype=object), step_ids, step_keys=keys, gamma=1.0, history_length=1
    )
    level1 = [(g - 0.5) / (0.5 + 1e-6) for g in (1.0, 0.0, 0.5)]  # state 5: all three
    level2 = (1.0 - 0.75) / (math.sqrt(0.125) + 1e-6)  # history (0, 5): trajectories 0 and 2
    torch.testing.assert_close(adv[1, 0], torch.tensor(level1[1]))  # (start, 5) is alone at level 2
    torch.testing.assert_close(adv[0, 2], torch.tensor((2 * level1[0] + 3 * level2) / 5))


def test_zero_history_length_is_gigpos_step_term_and_missing_keys_fall_back_to_step_index():
    layout = random_layout(3, batch_size=8, allow_adjacent_steps=False)
    uids = _uids(8, 4)
    keys = _random_keys(3, layout, alphabet=2)
    args = (layout.rewards, layout.response_mask, uids, layout.step_ids)

    def gigpo_step_term(step_keys):
        full, _ = compute_gigpo_advantage(*args, step_keys=step_keys, gamma=0.9)
        episode, _ = compute_gigpo_advantage(*args, step_keys=step_keys, gamma=0.9, step_weight=0.0)
        return full - episode

    hgpo, _ = compute_hgpo_advantage(*args, step_keys=keys, gamma=0.9, history_length=0)
    torch.testing.assert_close(hgpo, gigpo_step_term(keys))
    # Without keys every history level is the step-index group, whatever the depth.
    without_keys, _ = compute_hgpo_advantage(*args, gamma=0.9, history_length=4)
    torch.testing.assert_close(without_keys, gigpo_step_term(None))


# ------------------------------------------------------------------------------- bad input


def test_one_rollout_per_prompt_is_refused_for_hgpo():
    layout = random_layout(0, batch_size=4)
    with pytest.raises(ValueError, match=r"adv_estimator=hgpo .*single rollout.*rollout.n > 1"):
        compute_hgpo_advantage(layout.rewards, layout.response_mask, _uids(4, 1), layout.step_ids)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_reward_is_refused_for_hgpo(bad):
    layout = random_layout(0, batch_size=4)
    layout.rewards[1, 0] = bad
    with pytest.raises(ValueError, match="token_level_rewards contains NaN/inf at sample 1"):
        compute_hgpo_advantage(layout.rewards, layout.response_mask, _uids(4, 2), layout.step_ids)


def test_huge_finite_rewards_that_overflow_float32_raise_for_hgpo():
    layout = random_layout(5, batch_size=4, allow_adjacent_steps=False)
    layout.rewards[layout.response_mask == 1] = 3e38
    with pytest.raises(ValueError, match=r"advantages overflowed to (nan|inf) at sample \d+, step \d+"):
        compute_hgpo_advantage(layout.rewards, layout.response_mask, _uids(4, 2), layout.step_ids)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"history_length": -1}, r"history_length \(algorithm.hgpo.history_length\) must be an integer >= 0, got -1"),
        ({"history_length": 2.5}, r"history_length .* got 2.5"),
        ({"history_length": True}, r"history_length .* got True"),
        ({"alpha": float("nan")}, r"alpha \(algorithm.hgpo.alpha\) must be a finite number, got nan"),
        ({"episode_weight": "0.5"}, r"episode_weight \(algorithm.hgpo.episode_weight\) must be a finite number"),
    ],
)
def test_bad_hgpo_options_are_refused(options, message):
    layout = random_layout(0, batch_size=4)
    with pytest.raises(ValueError, match=message):
        compute_hgpo_advantage(layout.rewards, layout.response_mask, _uids(4, 2), layout.step_ids, **options)


def test_step_keys_of_the_wrong_shape_are_refused_for_hgpo():
    layout = random_layout(1, batch_size=4)
    with pytest.raises(ValueError, match="step_keys has shape"):
        compute_hgpo_advantage(
            layout.rewards, layout.response_mask, _uids(4, 2), layout.step_ids, step_keys=torch.zeros(3, 9)
        )


# ------------------------------------------------------------------------------- verl integration


def test_hgpo_is_registered_with_verl_and_reads_its_options():
    assert get_adv_estimator_fn("hgpo") is hgpo_estimator
    assert ESTIMATORS["hgpo"] is hgpo_estimator
    layout = random_layout(6, batch_size=8, max_steps=6)
    uids = _uids(8, 4)
    keys = _random_keys(6, layout, alphabet=2)
    config = OmegaConf.create(
        {
            "gamma": 0.9,
            "norm_adv_by_std_in_grpo": True,
            "hgpo": {"history_length": 2, "alpha": 2.0, "episode_weight": 0.5},
        }
    )
    adv, _ = get_adv_estimator_fn("hgpo")(
        token_level_rewards=layout.rewards, response_mask=layout.response_mask, config=config, index=uids,
        step_ids=layout.step_ids, step_keys=keys,
    )
    expected = reference_hgpo(layout, uids, keys.tolist(), 0.9, history_length=2, alpha=2.0, episode_weight=0.5)
    torch.testing.assert_close(adv.double(), expected, atol=1e-4, rtol=1e-4)


def test_hgpo_runs_through_verls_compute_advantage_on_multi_turn_rows():
    layout = random_layout(7, batch_size=8, allow_adjacent_steps=False)
    batch = DataProto.from_dict(
        tensors={"token_level_rewards": layout.rewards, "response_mask": layout.response_mask},
        non_tensors={"uid": _uids(8, 4)},
    )
    config = OmegaConf.create({"gamma": 0.95, "lam": 1.0, "norm_adv_by_std_in_grpo": True, "use_pf_ppo": False})
    adv = compute_advantage(batch, adv_estimator="hgpo", config=config).batch["advantages"]
    action = layout.response_mask == 1
    assert torch.isfinite(adv[action]).all() and adv[action].abs().sum() > 0
    assert torch.all(adv[~action] == 0), "observation tokens must get no advantage"


def test_trainer_hands_hgpo_the_agent_loops_state_keys_at_step_starts():
    # The agent loop writes each step's key on that step's tokens ([B, L]); the trainer must pass
    # the key at each step's first token ([B, K]), as for GiGPO.
    layout = random_layout(2, batch_size=8, max_steps=5)
    uids = _uids(8, 4)
    keys = _random_keys(2, layout, alphabet=2)
    token_keys = torch.where(layout.step_ids >= 0, keys.gather(1, layout.step_ids.clamp(min=0)), 0)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": layout.rewards, "response_mask": layout.response_mask},
        non_tensors={"uid": uids},
    )
    fields = {"step_ids": layout.step_ids, "step_keys": token_keys}
    config = OmegaConf.create({"gamma": 0.9, "hgpo": {"history_length": 3}})
    token = _CURRENT_BATCH.set(_StepBatch(fields))
    try:
        adv = compute_step_advantages(data, "hgpo", config).batch["advantages"]
    finally:
        _CURRENT_BATCH.reset(token)
    expected = reference_hgpo(layout, uids, keys.tolist(), 0.9, history_length=3, alpha=1.0)
    torch.testing.assert_close(adv.double(), expected, atol=1e-4, rtol=1e-4)

"""GiGPO and the step-level GRPO/RLOO variants, and verl's stock estimators on multi-turn rows."""

import numpy as np
import pytest
import torch
from layouts import broadcast_rows, random_layout, reference_step_return_rows
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.trainer.ppo.ray_trainer import compute_advantage

from steppo_verl.advantage import (
    compute_gigpo_advantage,
    compute_hgpo_advantage,
    compute_step_grpo_advantage,
    compute_step_rloo_advantage,
)


def _uids(batch_size, group_size):
    return np.array([f"prompt-{i // group_size}" for i in range(batch_size)], dtype=object)


def _group_stats(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return mean, std


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_step_grpo_matches_reference(seed, gamma):
    layout = random_layout(seed, batch_size=8, reward_mode="mixed")
    uids = _uids(8, 4)
    adv, ret = compute_step_grpo_advantage(layout.rewards, layout.response_mask, uids, layout.step_ids, gamma=gamma)
    returns = reference_step_return_rows(layout, gamma)
    expected = []
    for b, g in enumerate(returns):
        group = [returns[j][0] if returns[j] else 0.0 for j in range(8) if uids[j] == uids[b]]
        mean, std = _group_stats(group)
        expected.append([(x - mean) / (std + 1e-6) for x in g])
    torch.testing.assert_close(adv.double(), broadcast_rows(layout, expected), atol=1e-4, rtol=1e-4)
    assert torch.equal(adv, ret)


@pytest.mark.parametrize("seed", range(6))
def test_step_rloo_matches_reference(seed):
    layout = random_layout(seed, batch_size=9, reward_mode="mixed")
    uids = _uids(9, 3)
    adv, _ = compute_step_rloo_advantage(layout.rewards, layout.response_mask, uids, layout.step_ids, gamma=0.95)
    returns = reference_step_return_rows(layout, 0.95)
    expected = []
    for b, g in enumerate(returns):
        others = [returns[j][0] if returns[j] else 0.0 for j in range(9) if uids[j] == uids[b] and j != b]
        expected.append([x - sum(others) / len(others) for x in g])
    torch.testing.assert_close(adv.double(), broadcast_rows(layout, expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name,step_name", [("grpo", "step_grpo"), ("rloo", "step_rloo")])
def test_step_variants_equal_verl_stock_with_outcome_reward_and_gamma_one(seed, name, step_name):
    layout = random_layout(seed, batch_size=8, reward_mode="outcome", allow_adjacent_steps=False)
    uids = _uids(8, 4)
    config = OmegaConf.create({"gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True})
    stock, _ = get_adv_estimator_fn(name)(
        token_level_rewards=layout.rewards.clone(), response_mask=layout.response_mask, index=uids, config=config
    )
    ours, _ = get_adv_estimator_fn(step_name)(
        token_level_rewards=layout.rewards.clone(), response_mask=layout.response_mask, index=uids, config=config
    )
    torch.testing.assert_close(ours, stock.to(ours.dtype), atol=1e-5, rtol=1e-5)


def test_gigpo_hand_computed_anchor_groups():
    # One prompt, three trajectories, two steps each (tokens: a a o b o). Step 0 is taken from
    # the prompt in all three (key 7). Trajectories 0 and 1 reach the same state before step 1
    # (key 11), trajectory 2 another one (key 12), which is visited once.
    step_ids = torch.tensor([[0, 0, -1, 1, -1]] * 3)
    mask = (step_ids >= 0).long()
    rewards = torch.zeros(3, 5)
    rewards[:, 4] = torch.tensor([1.0, 0.0, 1.0])  # outcome on the last (observation) token
    rewards[0, 1] = 0.5  # a tool reward on step 0 of trajectory 0
    keys = torch.tensor([[7, 11], [7, 11], [7, 12]])
    gamma = 0.5
    adv, _ = compute_gigpo_advantage(
        rewards, mask, np.array(["p"] * 3, dtype=object), step_ids, step_keys=keys, gamma=gamma, step_weight=1.0
    )
    g1 = [1.0, 0.0, 1.0]  # reward-to-go at step 1
    g0 = [0.5 + gamma * 1.0, gamma * 0.0, gamma * 1.0]  # at step 0
    mean, std = _group_stats(g0)
    episode = [(g - mean) / (std + 1e-6) for g in g0]
    step0 = episode  # all three share the anchor state of step 0, so same statistics
    m11, s11 = _group_stats(g1[:2])
    step1 = [(g1[0] - m11) / (s11 + 1e-6), (g1[1] - m11) / (s11 + 1e-6), 0.0]
    expected = [[episode[i] + step0[i]] * 2 + [0.0, episode[i] + step1[i], 0.0] for i in range(3)]
    torch.testing.assert_close(adv.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def test_gigpo_without_keys_groups_by_step_index_and_prompt():
    layout = random_layout(2, batch_size=8, allow_adjacent_steps=False)
    uids = _uids(8, 4)
    steps = layout.step_ids.max(dim=1).values + 1
    by_index = torch.arange(int(steps.max())).expand(8, -1)
    implicit, _ = compute_gigpo_advantage(layout.rewards, layout.response_mask, uids, layout.step_ids, gamma=0.9)
    explicit, _ = compute_gigpo_advantage(
        layout.rewards, layout.response_mask, uids, layout.step_ids, step_keys=by_index, gamma=0.9
    )
    torch.testing.assert_close(implicit, explicit)
    # Keys are per prompt group: the same key in two prompt groups must not be pooled.
    other = _uids(8, 8)
    pooled, _ = compute_gigpo_advantage(layout.rewards, layout.response_mask, other, layout.step_ids, gamma=0.9)
    assert not torch.allclose(pooled, implicit)


def test_gigpo_zero_step_weight_is_episode_grpo_with_gamma_one():
    layout = random_layout(4, batch_size=8, reward_mode="outcome")
    uids = _uids(8, 4)
    gigpo, _ = compute_gigpo_advantage(layout.rewards, layout.response_mask, uids, layout.step_ids, step_weight=0.0)
    grpo, _ = compute_step_grpo_advantage(layout.rewards, layout.response_mask, uids, layout.step_ids)
    torch.testing.assert_close(gigpo, grpo)


def test_group_estimators_reject_bad_input():
    layout = random_layout(0, batch_size=4)
    uids = _uids(4, 2)
    with pytest.raises(ValueError, match="prompt uid"):
        compute_step_grpo_advantage(layout.rewards, layout.response_mask, None, layout.step_ids)
    with pytest.raises(ValueError, match=r"index \(uid\) has shape"):
        compute_step_rloo_advantage(layout.rewards, layout.response_mask, uids[:3], layout.step_ids)
    layout.rewards[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf at sample 1"):
        compute_gigpo_advantage(layout.rewards, layout.response_mask, uids, layout.step_ids)


def test_gigpo_rejects_step_keys_of_the_wrong_shape():
    layout = random_layout(1, batch_size=4)
    with pytest.raises(ValueError, match="step_keys has shape"):
        compute_gigpo_advantage(
            layout.rewards, layout.response_mask, _uids(4, 2), layout.step_ids, step_keys=torch.zeros(3, 9)
        )


@pytest.mark.parametrize("estimator", ["gae", "grpo", "steppo", "gigpo", "hgpo", "step_grpo", "step_rloo"])
def test_estimators_run_through_verls_compute_advantage_on_multi_turn_rows(estimator):
    """verl's own dispatcher on rows with observation tokens between actions."""
    layout = random_layout(7, batch_size=8, allow_adjacent_steps=False)
    batch = DataProto.from_dict(
        tensors={
            "token_level_rewards": layout.rewards,
            "response_mask": layout.response_mask,
            "values": layout.values,
        },
        non_tensors={"uid": _uids(8, 4)},
    )
    config = OmegaConf.create({"gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": True, "use_pf_ppo": False})
    if estimator == "steppo":
        with pytest.raises(ValueError, match="critic values"):
            compute_advantage(batch, adv_estimator=estimator, config=config)
        return
    out = compute_advantage(batch, adv_estimator=estimator, config=config)
    adv = out.batch["advantages"]
    action = layout.response_mask == 1
    assert torch.isfinite(adv[action]).all() and adv[action].abs().sum() > 0
    if estimator not in ("gae",):  # verl's gae whitens every position; its loss masks them later
        assert torch.all(adv[~action] == 0), "observation tokens must get no advantage"


# ------------------------------------------------------------------------------- bad input: numbers, n = 1

GROUP_ESTIMATORS = {
    "gigpo": compute_gigpo_advantage,
    "hgpo": compute_hgpo_advantage,
    "step_grpo": compute_step_grpo_advantage,
    "step_rloo": compute_step_rloo_advantage,
}


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_one_rollout_per_prompt_is_refused(name):
    layout = random_layout(0, batch_size=4)
    with pytest.raises(ValueError, match=rf"adv_estimator={name} .*single rollout.*rollout.n > 1"):
        GROUP_ESTIMATORS[name](layout.rewards, layout.response_mask, _uids(4, 1), layout.step_ids)


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_one_rollout_per_prompt_plus_verls_padding_samples_is_refused(name):
    # verl pads a batch that does not divide by the mini-batch size with samples that share one
    # "pad<uuid hex>" uid: that group of copies is no second rollout of any prompt.
    layout = random_layout(1, batch_size=6)
    uids = np.array(["a", "b", "c", "d", "pad" + "0f" * 16, "pad" + "0f" * 16], dtype=object)
    with pytest.raises(ValueError, match="single rollout"):
        GROUP_ESTIMATORS[name](layout.rewards, layout.response_mask, uids, layout.step_ids)


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_some_prompts_with_one_rollout_keep_their_raw_return(name):
    layout = random_layout(3, batch_size=5, reward_mode="outcome")
    layout.rewards[4] = 0.0
    layout.rewards[4, -1] = 0.7
    uids = np.array(["a", "a", "a", "a", "lone"], dtype=object)
    adv, _ = GROUP_ESTIMATORS[name](layout.rewards, layout.response_mask, uids, layout.step_ids)
    lone = layout.response_mask[4] == 1
    assert lone.any()
    # gamma = 1 and an outcome reward: every step of the lone sample gets its raw episode return; HGPO,
    # without its (off by default) episode term, has no group of more than one step there: 0.
    expected = 0.0 if name == "hgpo" else 0.7
    torch.testing.assert_close(adv[4, lone], torch.full((int(lone.sum()),), expected))


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_rewards_give_float_group_advantages(name, dtype):
    layout = random_layout(4, batch_size=8, reward_mode="outcome")
    rewards = (layout.rewards > 0.5).to(dtype)
    uids = _uids(8, 4)
    adv, _ = GROUP_ESTIMATORS[name](rewards, layout.response_mask, uids, layout.step_ids)
    expected, _ = GROUP_ESTIMATORS[name](rewards.float(), layout.response_mask, uids, layout.step_ids)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, expected)
    assert adv.abs().sum() > 0 and not torch.equal(adv, adv.round())


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_huge_finite_rewards_that_overflow_float32_raise_in_group_estimators(name):
    layout = random_layout(5, batch_size=4, allow_adjacent_steps=False)
    layout.rewards[layout.response_mask == 1] = 3e38  # finite, but sums over steps overflow
    with pytest.raises(ValueError, match=r"advantages overflowed to (nan|inf) at sample \d+, step \d+"):
        GROUP_ESTIMATORS[name](layout.rewards, layout.response_mask, _uids(4, 2), layout.step_ids)


# ------------------------------------------------------------------------------- groups that all did the same


def _identical_rollouts(dtype=torch.float32):
    """8 rollouts of one prompt, 4 one-token steps each, reward 1 on the last step."""
    response_mask = torch.tensor([[1, 0, 1, 0, 1, 0, 1]] * 8)
    step_ids = torch.tensor([[0, -1, 1, -1, 2, -1, 3]] * 8)
    rewards = torch.zeros(8, 7, dtype=dtype)
    rewards[:, 6] = 1.0
    return rewards, response_mask, np.array(["p"] * 8, dtype=object), step_ids


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rollouts_that_all_got_the_same_return_get_no_huge_advantage(name, dtype):
    rewards, mask, uids, step_ids = _identical_rollouts(dtype)
    adv, _ = GROUP_ESTIMATORS[name](rewards, mask, uids, step_ids, gamma=0.95)
    # Nothing tells these rollouts apart: no advantage beyond the discount gap G_k - G_0 (< 0.15 here);
    # dividing that gap, or a float32 rounding of the mean, by a zero std plus eps gave 1e5 and 0.1.
    assert adv.abs().max() < 0.15
    if name in ("gigpo", "hgpo"):  # every state's group holds equal returns: no advantage at all
        assert adv.abs().max() < (1e-8 if dtype == torch.float64 else 1e-30)

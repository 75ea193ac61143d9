"""compute_steppo_advantage against a plain-loop reference, plus its error handling."""

import math

import pytest
import torch
from layouts import Layout, random_layout, reference_steppo
from torch.profiler import ProfilerActivity, profile

from steppo_verl.advantage import compute_steppo_advantage, discounted_reverse_cumsum, steppo_estimator
from steppo_verl.protocol import StepLayoutError

GAMMA_LAM = [(1.0, 1.0), (0.99, 1.0), (0.9, 0.95), (0.5, 0.0), (0.0, 0.7)]


def _run(layout: Layout, gamma, lam, whiten, explicit_ids=True, bootstrap=True):
    return compute_steppo_advantage(
        layout.rewards,
        layout.values,
        layout.response_mask,
        step_ids=layout.step_ids if explicit_ids else None,
        gamma=gamma,
        lam=lam,
        bootstrap_values=layout.bootstrap if bootstrap else None,
        whiten=whiten,
    )


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("whiten", [False, True])
def test_matches_reference_with_explicit_step_ids(seed, gamma, lam, whiten):
    layout = random_layout(seed, allow_adjacent_steps=True)
    adv, ret = _run(layout, gamma, lam, whiten)
    ref_adv, ref_ret = reference_steppo(layout, gamma, lam, whiten)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_uncentred_whitening_matches_reference(seed):
    layout = random_layout(seed, allow_adjacent_steps=True)
    adv, ret = compute_steppo_advantage(
        layout.rewards, layout.values, layout.response_mask, step_ids=layout.step_ids, gamma=0.9, lam=0.0,
        bootstrap_values=layout.bootstrap, whiten=True, center=False,
    )
    ref_adv, ref_ret = reference_steppo(layout, 0.9, 0.0, whiten=True, center=False)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


def test_uncentred_whitening_leaves_a_zero_td_step_at_zero():
    # Two trajectories of a door step then an answer the critic valued exactly (TD error 0). Centring
    # moves the answers off 0 by the mean of the door steps; centre=False keeps them at 0 and keeps the
    # doors' signs.
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.0, 0.0, 1.0, 0.0], [0.2, 0.0, 0.0, 0.0, 0.0]])  # V(room)=0.2, V(open)=1, V(dead)=0
    centred, _ = compute_steppo_advantage(rewards, values, mask, gamma=1.0, lam=0.0)
    uncentred, _ = compute_steppo_advantage(rewards, values, mask, gamma=1.0, lam=0.0, center=False)
    answers = mask.bool() & (torch.arange(5) >= 3)
    assert uncentred[answers].abs().max() == 0
    assert centred[answers].abs().min() > 0.1
    assert uncentred[0, 0] > 0 > uncentred[1, 0]


@pytest.mark.parametrize("seed", range(8))
def test_steps_recovered_from_mask_runs_match_reference(seed):
    layout = random_layout(seed, allow_adjacent_steps=False)
    adv, ret = _run(layout, 0.95, 0.9, whiten=True, explicit_ids=False)
    ref_adv, ref_ret = reference_steppo(layout, 0.95, 0.9, whiten=True)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


def test_terminated_vs_truncated_bootstrap():
    # One step, reward 1, V(s0) = 0.25. Terminated: A = 1 - 0.25. Truncated with V(s1) = 0.5:
    # A = 1 + 0.9 * 0.5 - 0.25.
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.25, 9.0, 9.0], [0.25, 9.0, 9.0]])
    adv, ret = compute_steppo_advantage(
        rewards, values, mask, gamma=0.9, bootstrap_values=torch.tensor([0.0, 0.5]), whiten=False
    )
    assert adv[0].tolist() == pytest.approx([0.75, 0.75, 0.0])
    assert adv[1].tolist() == pytest.approx([1.2, 1.2, 0.0])
    assert ret[1].tolist() == pytest.approx([1.45, 1.45, 0.0])


def test_values_are_read_only_at_step_starts():
    # Values inside a step or on observation tokens (even NaN) must not change anything.
    layout = random_layout(3, allow_adjacent_steps=False)
    noisy = layout.values.clone()
    first = torch.ones_like(layout.step_ids, dtype=torch.bool)
    first[:, 1:] = layout.step_ids[:, 1:] != layout.step_ids[:, :-1]
    off_start = ~(first & (layout.step_ids >= 0))
    noisy[off_start] = float("nan")
    a1, r1 = _run(layout, 0.9, 0.8, whiten=True)
    a2, r2 = _run(Layout(layout.step_ids, layout.response_mask, layout.rewards, noisy, layout.bootstrap), 0.9, 0.8, True)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(r1, r2)


def test_whitening_counts_each_step_once():
    # Step 0 has 100 tokens, step 1 has 1: token-weighted whitening would give a different mean.
    mask = torch.zeros(1, 102, dtype=torch.long)
    mask[0, :100] = 1
    mask[0, 101] = 1
    rewards = torch.zeros(1, 102)
    rewards[0, 101] = 1.0
    adv, _ = compute_steppo_advantage(rewards, torch.zeros(1, 102), mask, gamma=0.5, whiten=True)
    step_adv = torch.tensor([adv[0, 0], adv[0, 101]])
    assert float(step_adv.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(step_adv.std()) == pytest.approx(1.0, abs=1e-3)


def test_empty_responses_get_zero_and_batch_of_only_empty_rows_is_fine():
    mask = torch.zeros(3, 4, dtype=torch.long)
    adv, ret = compute_steppo_advantage(torch.zeros(3, 4), torch.zeros(3, 4), mask, whiten=True)
    assert adv.abs().sum() == 0 and ret.abs().sum() == 0


def test_zero_length_responses():
    adv, ret = compute_steppo_advantage(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), whiten=False)
    assert adv.shape == (2, 0) and ret.shape == (2, 0)


def test_output_dtype_follows_rewards():
    layout = random_layout(1)
    adv, ret = compute_steppo_advantage(
        layout.rewards.to(torch.bfloat16), layout.values, layout.response_mask, layout.step_ids, whiten=False
    )
    assert adv.dtype == torch.bfloat16 and ret.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_is_rejected(bad):
    layout = random_layout(0)
    layout.rewards[2, 0] = bad
    with pytest.raises(ValueError, match=r"token_level_rewards contains NaN/inf at sample 2"):
        _run(layout, 1.0, 1.0, whiten=False)


def test_non_finite_value_at_a_step_start_is_rejected():
    layout = random_layout(0)
    b = int((layout.step_ids >= 0).any(dim=1).nonzero()[0])
    layout.values[b, 0] = float("nan")
    layout.step_ids[b, 0] = 0  # make sure token 0 starts step 0
    layout.response_mask[b, 0] = 1
    with pytest.raises(ValueError, match=rf"values at step starts contains NaN/inf at sample {b}"):
        _run(layout, 1.0, 1.0, whiten=False)


def test_non_finite_bootstrap_is_rejected():
    layout = random_layout(0)
    layout.bootstrap[1] = float("nan")
    with pytest.raises(ValueError, match="bootstrap_values contains NaN/inf at sample 1"):
        _run(layout, 1.0, 1.0, whiten=False)


@pytest.mark.parametrize(
    "field,shape",
    [("rewards", (6, 3)), ("values", (5, 1)), ("bootstrap", (7,))],
)
def test_shape_mismatch_is_rejected(field, shape):
    layout = random_layout(0)
    setattr(layout, field, torch.zeros(shape))
    with pytest.raises(ValueError, match="has shape"):
        _run(layout, 1.0, 1.0, whiten=False)


def test_invalid_step_ids_are_rejected_with_the_sample():
    layout = random_layout(0, allow_adjacent_steps=False)
    b = int((layout.step_ids.max(dim=1).values >= 1).nonzero()[0])
    ids = layout.step_ids.clone()
    ids[b][ids[b] == 1] = 2  # skip step 1
    with pytest.raises(StepLayoutError, match=rf"sample {b}"):
        compute_steppo_advantage(layout.rewards, layout.values, layout.response_mask, step_ids=ids)


@pytest.mark.parametrize("gamma,lam", [(1.5, 1.0), (1.0, -0.1), (math.nan, 1.0)])
def test_out_of_range_gamma_lam_is_rejected(gamma, lam):
    layout = random_layout(0)
    with pytest.raises(ValueError, match="must lie in"):
        _run(layout, gamma, lam, whiten=False)


def test_whitening_a_single_step_is_an_error_not_a_silent_zero():
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="at least 2 steps"):
        compute_steppo_advantage(torch.ones(1, 3), torch.zeros(1, 3), mask, whiten=True)


def _failed_doors(success_row: int | None = None, bootstrap=None):
    """Four two-step episodes (a door, then an answer); all failed unless ``success_row`` earned 1. The critic's
    values differ by ~1e-2, as a nearly flat critic's do."""
    mask = torch.tensor([[1, 1, 0, 1, 1]] * 4)
    rewards = torch.zeros(4, 5)
    if success_row is not None:
        rewards[success_row, 4] = 1.0
    values = torch.tensor([[0.07, 0.0, 0.0, 0.08, 0.0], [0.071, 0.0, 0.0, 0.079, 0.0],
                           [0.069, 0.0, 0.0, 0.081, 0.0], [0.07, 0.0, 0.0, 0.078, 0.0]])
    return compute_steppo_advantage(rewards, values, mask, bootstrap_values=bootstrap, skip_equal_returns=True), (
        compute_steppo_advantage(rewards, values, mask, bootstrap_values=bootstrap, skip_equal_returns=False))


def test_a_batch_whose_returns_are_all_equal_gets_zero_advantages_not_whitened_critic_noise():
    (adv, ret), (noise, noise_ret) = _failed_doors()
    assert torch.count_nonzero(adv) == 0
    torch.testing.assert_close(ret, noise_ret), "the critic's targets are the observed returns either way"
    assert float(ret[:, [0, 3]].abs().max()) == pytest.approx(0.0, abs=1e-7), "every return is 0"
    step_noise = noise[:, [0, 3]]
    assert float(step_noise.std()) == pytest.approx(1.0, abs=0.1), "whitened, 1e-2 of critic noise is unit-sized"
    assert float(step_noise.abs().max()) > 1.0


def test_with_lam_below_one_equal_returns_are_whitened_as_before_the_td_errors_read_the_next_state():
    mask = torch.tensor([[1, 1, 0, 1, 1]] * 2)
    values = torch.tensor([[0.1, 0.0, 0.0, 0.3, 0.0], [0.1, 0.0, 0.0, 0.0, 0.0]])  # right door vs dead end
    on = compute_steppo_advantage(torch.zeros(2, 5), values, mask, lam=0.0, skip_equal_returns=True)[0]
    off = compute_steppo_advantage(torch.zeros(2, 5), values, mask, lam=0.0, skip_equal_returns=False)[0]
    torch.testing.assert_close(on, off)
    assert float(on[0, 0]) > 0 > float(on[1, 0]), "the door into a room the critic values beats the dead end"


def test_with_the_batchs_own_values_equal_returns_are_zero_at_any_lam():
    """values=state_returns in an all-fail batch: every visited-twice state is valued 0, a state visited once keeps
    the critic's value; its lone TD error is all whitening would see (+-10 on the depth-5 vault)."""
    mask = torch.tensor([[1, 1, 0, 1, 1]] * 4)
    values = torch.zeros(4, 5)
    values[3, 3] = 0.05  # the critic's stand-in for a state no other step visited
    for lam in (0.0, 0.5, 1.0):
        skipped = compute_steppo_advantage(torch.zeros(4, 5), values, mask, lam=lam, batch_values=True)[0]
        assert torch.count_nonzero(skipped) == 0, lam
    whitened = compute_steppo_advantage(torch.zeros(4, 5), values, mask, lam=0.0, batch_values=False)[0]
    assert float(whitened.abs().max()) > 1.0, "without the rule, a 0.05 stand-in is whitened to a unit-sized push"
    success = torch.zeros(4, 5)
    success[1, 4] = 1.0
    kept = compute_steppo_advantage(success, values, mask, lam=0.0, batch_values=True)[0]
    torch.testing.assert_close(kept, compute_steppo_advantage(success, values, mask, lam=0.0)[0])


def test_registered_entry_treats_monte_carlo_value_sources_as_the_batchs_values():
    from omegaconf import OmegaConf

    mask = torch.tensor([[1, 1, 0, 1, 1]] * 3)
    values = torch.rand(3, 5) * 0.1
    config = {"lam": 0.0, "steppo": {"values": "critic"}}
    assert torch.count_nonzero(steppo_estimator(torch.zeros(3, 5), mask, config=OmegaConf.create(config),
                                                values=values)[0]) > 0, "a critic's TD errors at lam 0 are kept"
    for source in ("state_returns", "branch_returns"):
        config["steppo"]["values"] = source
        advantages = steppo_estimator(torch.zeros(3, 5), mask, config=OmegaConf.create(config), values=values)[0]
        assert torch.count_nonzero(advantages) == 0, source


def test_advantage_clip_bounds_a_rare_outcomes_whitened_push_and_leaves_the_critic_targets():
    """Three failures among 64 episodes: whitening gives their door steps about -4.5; the clip bounds them."""
    mask = torch.tensor([[1, 1, 0, 1, 1]] * 64)
    rewards = torch.zeros(64, 5)
    rewards[3:, 4] = 1.0
    values = torch.full((64, 5), 0.9)
    free, free_returns = compute_steppo_advantage(rewards, values, mask)
    assert float(free.min()) < -4.0, "the rare failures' steps are whitened far out"
    clipped, returns = compute_steppo_advantage(rewards, values, mask, advantage_clip=2.5)
    torch.testing.assert_close(clipped, free.clamp(-2.5, 2.5))
    torch.testing.assert_close(returns, free_returns)
    assert float(clipped.min()) == pytest.approx(-2.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="advantage_clip"):
            compute_steppo_advantage(rewards, values, mask, advantage_clip=bad)


def test_registered_entry_reads_advantage_clip_from_config():
    from omegaconf import OmegaConf

    layout = random_layout(0)
    values = torch.randn(layout.response_mask.shape)
    config = OmegaConf.create({"steppo": {"advantage_clip": 0.5}})
    advantages = steppo_estimator(layout.rewards, layout.response_mask, config=config, values=values,
                                  step_ids=layout.step_ids)[0]
    assert float(advantages.abs().max()) == pytest.approx(0.5)


def test_a_batch_with_one_success_is_whitened_as_before():
    (adv, _), (whitened, _) = _failed_doors(success_row=2)
    torch.testing.assert_close(adv, whitened)
    success_steps, other_steps = adv[2, [0, 3]], adv[[0, 1, 3]][:, [0, 3]]
    assert float(success_steps.min()) > 1.0 > 0 > float(other_steps.max()), "the success's steps stand out"


def test_cut_off_episodes_with_different_bootstrap_values_are_not_equal_returns():
    (adv, _), (whitened, _) = _failed_doors(bootstrap=torch.tensor([0.0, 0.0, 0.3, 0.0]))
    torch.testing.assert_close(adv, whitened)
    assert torch.count_nonzero(adv) > 0


def test_registered_entry_reads_skip_equal_returns_from_config():
    from omegaconf import OmegaConf

    mask = torch.tensor([[1, 1, 0, 1, 1]] * 3)
    values = torch.rand(3, 5) * 0.1
    on = steppo_estimator(torch.zeros(3, 5), mask, config=OmegaConf.create({}), values=values)[0]
    off = steppo_estimator(torch.zeros(3, 5), mask, values=values,
                           config=OmegaConf.create({"steppo": {"skip_equal_returns": False}}))[0]
    assert torch.count_nonzero(on) == 0, "on by default"
    assert torch.count_nonzero(off) > 0


def test_registered_entry_refuses_to_run_without_critic_values():
    layout = random_layout(0)
    with pytest.raises(ValueError, match="critic.enable=true"):
        steppo_estimator(layout.rewards, layout.response_mask, config=None, index=None)


def test_registered_entry_reads_gamma_lam_and_whiten_from_config():
    from omegaconf import OmegaConf

    layout = random_layout(5)
    config = OmegaConf.create({"gamma": 0.9, "lam": 0.8, "steppo": {"whiten": False}})
    adv, ret = steppo_estimator(
        layout.rewards,
        layout.response_mask,
        config=config,
        values=layout.values,
        step_ids=layout.step_ids,
        bootstrap_values=layout.bootstrap,
    )
    ref_adv, ref_ret = reference_steppo(layout, 0.9, 0.8, whiten=False)
    torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- numbers


def _plain_loop_discounted_sums(x: torch.Tensor, factor: float) -> torch.Tensor:
    y = torch.zeros_like(x)
    running = x.new_zeros(x.shape[0])
    for k in reversed(range(x.shape[1])):
        running = x[:, k] + factor * running
        y[:, k] = running
    return y


@pytest.mark.parametrize("num_steps", [0, 1, 7, 255, 256, 257, 600, 1000])
@pytest.mark.parametrize("factor", [0.0, 0.5, 0.95, 1.0])
def test_discounted_reverse_cumsum_over_many_steps_matches_the_plain_loop(num_steps, factor):
    x = torch.randn(3, num_steps, generator=torch.Generator().manual_seed(num_steps), dtype=torch.float64)
    torch.testing.assert_close(discounted_reverse_cumsum(x, factor), _plain_loop_discounted_sums(x, factor))


def test_one_row_of_eight_thousand_one_token_steps_gets_the_exact_advantages():
    # Tokens alternate action / observation; only the last step is rewarded and V = 0, so
    # A_k = (gamma * lam)**(K - 1 - k).
    num_steps, gamma, lam = 8000, 0.999, 0.99
    mask = torch.zeros(1, 2 * num_steps, dtype=torch.long)
    mask[0, ::2] = 1
    rewards = torch.zeros(1, 2 * num_steps, dtype=torch.float64)
    rewards[0, -1] = 1.0
    adv, _ = compute_steppo_advantage(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=lam, whiten=False)
    expected = (gamma * lam) ** torch.arange(num_steps - 1, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(adv[0, ::2], expected)


def _peak_allocated_bytes(run) -> int:
    """Peak of the bytes torch's CPU allocator held during ``run()`` above what it held before.

    Counted from the allocator's own events (the profiler's memory records), not from resident memory: how glibc and
    the kernel back those bytes with pages (heap history, transparent huge pages) differs between machines, and the
    resident peak of the same call read 14.1 bytes per token on one machine and 17.1 on another.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = sorted(
        (event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"),
        key=lambda event: event.start_ns(),
    )
    held = peak = 0
    for record in records:
        held += record.nbytes()  # negative for a free
        peak = max(peak, held)
    return peak


def test_one_row_of_eight_thousand_one_token_steps_needs_no_step_by_step_matrix():
    mask = torch.zeros(1, 16000, dtype=torch.long)
    mask[0, ::2] = 1  # 8,000 one-token steps
    rewards, values = torch.zeros(1, 16000), torch.zeros(1, 16000)
    rewards[0, -1] = 1.0
    # The K x K discount matrix took +838 MB here; the inputs themselves are 256 KB.
    peak = _peak_allocated_bytes(
        lambda: compute_steppo_advantage(rewards, values, mask, gamma=0.99, lam=0.95, whiten=True)
    )
    growth = peak / 2**20
    assert growth < 64, f"advantages of one 8,000-step row raised peak memory by {growth:.0f} MiB"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_bool_rewards_give_float_advantages(dtype):
    layout = random_layout(2)
    rewards = (layout.rewards != 0).to(dtype)  # 0/1 rewards at the same places
    adv, ret = compute_steppo_advantage(
        rewards, layout.values, layout.response_mask, layout.step_ids, gamma=0.9, lam=0.95, whiten=True
    )
    expected = compute_steppo_advantage(
        rewards.float(), layout.values, layout.response_mask, layout.step_ids, gamma=0.9, lam=0.95, whiten=True
    )
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close((adv, ret), expected)
    assert not torch.equal(adv, adv.round()), "advantages were rounded to integers"


@pytest.mark.parametrize("whiten", [False, True])
def test_huge_finite_rewards_that_overflow_float32_raise_naming_the_sample(whiten):
    layout = random_layout(0, allow_adjacent_steps=False)
    b = int(((layout.step_ids.max(dim=1).values >= 1)).nonzero()[0])  # a sample with two steps or more
    layout.rewards[b] = 0.0
    layout.rewards[b, layout.step_ids[b] >= 0] = 3e38  # finite, but their discounted sum is not
    with pytest.raises(ValueError, match=r"advantages overflowed to (nan|inf) at sample \d+, step \d+.*rescale"):
        _run(layout, 1.0, 1.0, whiten=whiten)
    if not whiten:  # unwhitened, the overflow stays in its own sample
        with pytest.raises(ValueError, match=rf"at sample {b},"):
            _run(layout, 1.0, 1.0, whiten=False)


def test_huge_finite_values_that_overflow_returns_raise():
    layout = random_layout(1, allow_adjacent_steps=False)
    layout.rewards.fill_(3e38)
    layout.values.fill_(3e38)
    layout.bootstrap.zero_()
    with pytest.raises(ValueError, match="overflowed to"):
        _run(layout, 1.0, 1.0, whiten=False)


def test_nan_reward_in_a_sample_without_steps_is_rejected():
    # Its rewards reach no step sum, so the check of the step sums alone would miss it.
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, float("nan"), 0.0]])
    with pytest.raises(ValueError, match=r"token_level_rewards contains NaN/inf at sample 1, position 1"):
        compute_steppo_advantage(rewards, torch.zeros(2, 3), mask, whiten=False)


def test_plus_and_minus_inf_rewards_in_one_step_are_rejected():
    # inf + (-inf) sums to NaN, not to a finite number: still caught, and named at its first token.
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rewards = torch.tensor([[0.0, float("inf"), -float("inf"), 0.0], [1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"token_level_rewards contains NaN/inf at sample 0, position 1 \(value inf\)"):
        compute_steppo_advantage(rewards, torch.zeros(2, 4), mask, whiten=False)


def test_large_batch_needs_under_15_bytes_per_token_beyond_its_inputs():
    # 1,024 rows x 4,096 tokens, 8 steps each. The two float32 outputs take 8 bytes per token and the int32 step slots
    # and bool masks 5: 13.1 measured. Any further [B, L] float32 temporary alive at the peak adds 4; the code before
    # the step slots (float64 step sums and broadcasts) peaked at 18.1.
    batch_size, length, num_steps = 1024, 4096, 8
    position = torch.arange(length)
    step = position // (length // num_steps)
    step_ids = torch.where((position % (length // num_steps)) < 100, step, -1).expand(batch_size, -1).contiguous()
    mask = (step_ids >= 0).long()
    rewards, values = torch.zeros(batch_size, length), torch.randn(batch_size, length)
    rewards[:, -1] = 1.0
    peak = _peak_allocated_bytes(lambda: compute_steppo_advantage(rewards, values, mask, step_ids))
    bytes_per_token = peak / (batch_size * length)
    assert bytes_per_token < 15, f"steppo advantages peaked at {bytes_per_token:.1f} bytes per token"

"""Step-aligned policy loss: hand computation, per-step clipping, GSPO equivalence, verl's ppo_loss path."""

import itertools
import math

import pytest
import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.trainer.ppo.core_algos import compute_policy_loss_gspo, get_policy_loss_fn
from verl.workers.config.actor import FSDPActorConfig, PolicyLossConfig
from verl.workers.utils.losses import ppo_loss

from steppo_verl.loss import (
    compute_policy_loss_steppo,
    compute_policy_loss_steppo_action_clip,
    compute_policy_loss_steppo_step_mean,
    step_clip_bounds,
    step_start_value_loss,
)
from steppo_verl.protocol import gather_at_step_starts, locate_steps, scatter_to_tokens


def actor_config(clip=0.2, loss_mode="steppo", loss_agg_mode="token-mean", clip_ratio_c=3.0):
    return FSDPActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=clip,
        clip_ratio_c=clip_ratio_c,
        loss_agg_mode=loss_agg_mode,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )


def two_rows():
    # Row 0: step 0 = tokens 0-2, observation 3-4, step 1 = token 5. Row 1: one step, tokens 0-1.
    mask = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0, 0.0, -1.0], [-0.3, -0.7, 0.0, 0.0, 0.0, 0.0]])
    delta = torch.tensor([[0.30, -0.10, 0.10, 5.0, 5.0, 0.05], [-0.4, -0.2, 5.0, 5.0, 5.0, 5.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, -2.0], [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0]])
    return mask, old, old + delta, adv


def test_matches_hand_computation_one_ratio_per_step():
    mask, old, new, adv = two_rows()
    loss, metrics = compute_policy_loss_steppo(old, new, adv, mask, "token-mean", actor_config(clip=0.2))
    # Step ratios: exp(mean log-ratio over the step's tokens).
    s00 = math.exp((0.30 - 0.10 + 0.10) / 3)  # 1.105, A = +1: inside [0.8, 1.2]
    s01 = math.exp(0.05)  # A = -2: inside
    s10 = math.exp((-0.4 - 0.2) / 2)  # 0.741, A = -1: below 0.8 -> clipped at 0.8
    token_losses = [-1.0 * s00] * 3 + [2.0 * s01] + [1.0 * 0.8] * 2  # max(-A s, -A clip(s))
    expected = sum(token_losses) / 6  # token-mean over the 6 action tokens
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["actor/step_clipfrac"] == pytest.approx(1 / 3)
    assert metrics["actor/step_ratio_mean"] == pytest.approx((s00 + s01 + s10) / 3, rel=1e-6)


def test_clipping_is_per_step_and_stops_that_steps_gradient():
    mask, old, new, adv = two_rows()
    new = new.clone().requires_grad_(True)
    loss, _ = compute_policy_loss_steppo(old, new, adv, mask, "token-mean", actor_config(clip=0.2))
    loss.backward()
    grad = new.grad
    assert torch.all(grad[1, :2] == 0), "the clipped step gets no gradient on any of its tokens"
    assert torch.all(grad[0, [0, 1, 2, 5]] != 0), "unclipped steps get gradient on every token"
    assert torch.all(grad[~mask] == 0), "observation tokens get no gradient"
    # Inside one unclipped step every token gets the same gradient: d/dlogp_t of -A * s_k * pi/sg(pi).
    s00 = math.exp(0.30 / 3)
    assert grad[0, :3].tolist() == pytest.approx([-1.0 * s00 / 6] * 3, rel=1e-5)


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_equals_verl_gspo_when_every_row_is_one_step(loss_agg_mode):
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for b, length in enumerate([7, 3, 5, 1]):
        mask[b, :length] = True
    old = -torch.rand(4, 7, generator=gen)
    delta = 0.3 * torch.randn(4, 7, generator=gen)
    adv = torch.randn(4, 1, generator=gen).expand(4, 7) * mask
    outputs = []
    for fn in (compute_policy_loss_steppo, compute_policy_loss_gspo):
        new = (old + delta).requires_grad_(True)
        loss, _ = fn(old, new, adv, mask, loss_agg_mode, actor_config(clip=0.1, loss_agg_mode=loss_agg_mode))
        loss.backward()
        outputs.append((loss.detach(), new.grad))
    torch.testing.assert_close(outputs[0][0], outputs[1][0])
    torch.testing.assert_close(outputs[0][1], outputs[1][1])


def test_explicit_step_ids_split_adjacent_actions():
    # Two actions with no token between them: mask runs see one step, explicit ids see two.
    mask = torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    adv = torch.ones(1, 4)
    config = actor_config(clip=0.2)
    merged, m1 = compute_policy_loss_steppo(old, new, adv, mask, "token-mean", config)
    split, m2 = compute_policy_loss_steppo(old, new, adv, mask, "token-mean", config, step_ids=torch.tensor([[0, 0, 1, 1]]))
    assert merged.item() == pytest.approx(-1.0)  # one step, ratio exp(0) = 1
    assert split.item() == pytest.approx(-(min(math.exp(0.5), 1.2) + math.exp(-0.5)) / 2)
    assert m1["actor/step_clipfrac"] == 0.0 and m2["actor/step_clipfrac"] == pytest.approx(0.5)


def test_registered_under_steppo_and_needs_a_config():
    assert get_policy_loss_fn("steppo") is compute_policy_loss_steppo
    mask, old, new, adv = two_rows()
    with pytest.raises(ValueError, match="actor config"):
        compute_policy_loss_steppo(old, new, adv, mask)


def test_through_verls_ppo_loss_as_the_training_engine_calls_it():
    """verl's engine calls ppo_loss(config, model_output, data) with unpadded log-probs."""
    mask, old, new, adv = two_rows()
    batch, length = mask.shape
    prompt_len = 3
    response_lens = torch.tensor([6, 2])  # row 1's response is 2 tokens, then right padding
    attention = torch.zeros(batch, prompt_len + length, dtype=torch.long)
    attention[:, :prompt_len] = 1
    for b in range(batch):
        attention[b, prompt_len : prompt_len + response_lens[b]] = 1
    # Flat model output over each sequence (prompt + response): the log-prob of response token t
    # sits at position prompt_len - 1 + t of its sequence (next-token alignment).
    chunks = []
    for b in range(batch):
        chunk = torch.zeros(prompt_len + int(response_lens[b]))
        chunk[prompt_len - 1 : prompt_len - 1 + int(response_lens[b])] = new[b, : response_lens[b]]
        chunks.append(chunk)
    flat = torch.cat(chunks).requires_grad_(True)
    data = TensorDict(
        {
            "prompts": torch.ones(batch, prompt_len, dtype=torch.long),
            "responses": torch.ones(batch, length, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": mask.long(),
            "old_log_probs": old,
            "advantages": adv,
        },
        batch_size=[batch],
    )
    # What the engine sets for one rank holding the whole mini-batch: 6 action tokens, 2 rows.
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=batch)
    loss, metrics = ppo_loss(actor_config(), {"log_probs": flat}, data)
    direct, _ = compute_policy_loss_steppo(old, new, adv, mask, "token-mean", actor_config())
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    loss.backward()
    assert flat.grad.abs().sum() > 0
    assert "actor/step_clipfrac" in {str(k) for k in metrics}


# ----------------------------------------------------------------------------- dual clip, equal steps


def test_dual_clip_bounds_a_negative_step_whose_ratio_exploded():
    mask = torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)
    old = torch.zeros(1, 4)
    new = torch.tensor([[2.0, 2.0, 0.0, 0.0]]).requires_grad_(True)  # step 0 ratio e^2 = 7.4 > c = 3
    adv = torch.tensor([[-1.0, -1.0, 0.0, 1.0]])
    config = actor_config(clip=0.2)
    loss, metrics = compute_policy_loss_steppo(old, new, adv, mask, "token-mean", config)
    # step 0: min(max(-A s, -A clip(s)), -A c) = min(7.39, 1.2) vs 3 -> capped at 3; step 1: ratio 1, -A = -1.
    assert loss.item() == pytest.approx((3.0 + 3.0 - 1.0) / 3, rel=1e-6)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(2 / 3)
    loss.backward()
    assert torch.all(new.grad[0, :2] == 0), "the dual-clipped step's loss is a constant"


def test_dual_clip_below_one_is_refused():
    config = actor_config(clip_ratio_c=0.5)  # verl's config accepts it; its vanilla loss asserts later
    mask, old, new, adv = two_rows()
    with pytest.raises(ValueError, match="clip_ratio_c"):
        compute_policy_loss_steppo(old, new, adv, mask, "token-mean", config)


def test_step_mean_weighs_every_step_once():
    mask, old, new, adv = two_rows()
    new = new.clone().requires_grad_(True)
    loss, _ = compute_policy_loss_steppo_step_mean(old, new, adv, mask, "token-mean", actor_config(clip=0.2))
    s00, s01 = math.exp(0.30 / 3), math.exp(0.05)  # row 1's ratio 0.74 is clipped at 0.8 (A < 0)
    # Each step's tokens average to one term; per-trajectory sums, then the mean over the 2 trajectories.
    expected = ((-1.0 * s00) + (2.0 * s01) + (1.0 * 0.8)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # The 3-token step and the 1-token step of row 0 get gradients summing to their step's whole weight.
    token_grad = new.grad[0]
    assert token_grad[:3].sum().item() == pytest.approx(-1.0 * s00 / 2, rel=1e-5)
    assert token_grad[5].item() == pytest.approx(2.0 * s01 / 2, rel=1e-5)


def test_step_mean_is_registered_with_verl():
    assert get_policy_loss_fn("steppo_step_mean") is compute_policy_loss_steppo_step_mean


def test_action_clip_bounds_the_whole_step_ratio():
    mask, old, new, adv = two_rows()
    new = new.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss_steppo_action_clip(old, new, adv, mask, "token-mean", actor_config(clip=0.2))
    # Step 0 of row 0: product ratio exp(0.30) = 1.35 > 1.2 with A = +1 -> clipped at 1.2 ** (1/3) per token.
    # Step 1 of row 0: one token, ratio exp(0.05) inside [0.8, 1.2], A = -2. Row 1: product exp(-0.6) = 0.55 < 0.8
    # with A = -1 -> clipped at 0.8 ** (1/2).
    token_losses = [-1.0 * 1.2 ** (1 / 3)] * 3 + [2.0 * math.exp(0.05)] + [1.0 * 0.8 ** (1 / 2)] * 2
    assert loss.item() == pytest.approx(sum(token_losses) / 6, rel=1e-6)
    assert metrics["actor/step_clipfrac"] == pytest.approx(2 / 3)
    loss.backward()
    assert torch.all(new.grad[0, :3] == 0) and torch.all(new.grad[1, :2] == 0), "clipped steps get no gradient"
    assert new.grad[0, 5] != 0
    # The geometric-mean loss leaves step 0 unclipped: its mean ratio 1.105 is inside [0.8, 1.2].
    _, geometric = compute_policy_loss_steppo(old, new.detach(), adv, mask, "token-mean", actor_config(clip=0.2))
    assert geometric["actor/step_clipfrac"] == pytest.approx(1 / 3)


def test_action_clip_bounds_one_moved_token_as_the_token_loss_does():
    # A 6-token call whose one decision token moved by 1.5x (the others are fixed format): the token loss
    # clips that token, the geometric-mean bound does not (1.5 ** (1/6) = 1.07), the whole-step bound does.
    mask = torch.ones(1, 6, dtype=torch.bool)
    old = torch.full((1, 6), -0.01)
    new = old.clone()
    new[0, 2] += math.log(1.5)
    adv = torch.ones(1, 6)
    _, token = get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", actor_config(clip=0.2))
    _, geometric = compute_policy_loss_steppo(old, new, adv, mask, "token-mean", actor_config(clip=0.2))
    _, whole = compute_policy_loss_steppo_action_clip(old, new, adv, mask, "token-mean", actor_config(clip=0.2))
    assert token["actor/pg_clipfrac"] > 0
    assert geometric["actor/step_clipfrac"] == 0
    assert whole["actor/step_clipfrac"] == 1


def test_action_clip_bounds_per_step_length():
    steps = locate_steps(torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool))
    lower, upper = step_clip_bounds(steps, 0.2, 0.28, per_action=True)
    torch.testing.assert_close(upper[steps.step_mask], torch.tensor([1.28 ** (1 / 3), 1.28, 1.28 ** (1 / 5)]))
    torch.testing.assert_close(lower[steps.step_mask], torch.tensor([0.8 ** (1 / 3), 0.8, 0.8 ** (1 / 5)]))
    lower, upper = step_clip_bounds(steps, 0.2, 0.28, per_action=False)
    assert torch.all(upper == 1.28) and torch.all(lower == 0.8)


def test_default_clip_bounds_are_one_scalar_not_a_tensor_per_step():
    steps = locate_steps(torch.ones(64, 512, dtype=torch.bool))
    lower, upper = step_clip_bounds(steps, 0.2, 0.28, per_action=False)
    assert lower.shape == upper.shape == torch.Size([]), "the same bound for every step needs no [B, K] tensor"
    assert lower.item() == pytest.approx(0.8) and upper.item() == pytest.approx(1.28)


def scalar_bound_reference(old, new, adv, mask, low, high, clip_ratio_c, equal_steps):
    """Plain loop over each row's mask runs, clipped at the floats 1 - low and 1 + high:
    (loss, token clip fraction, step clip fraction)."""
    losses, weights, token_clipped, step_clipped = [], [], [], []
    for b in range(mask.shape[0]):
        t = 0
        for is_action, run in itertools.groupby(mask[b].tolist()):
            n = len(list(run))
            if is_action:
                s = math.exp(sum(new[b, t : t + n].tolist()) / n - sum(old[b, t : t + n].tolist()) / n)
                a = float(adv[b, t])
                unclipped, clipped = -a * s, -a * min(max(s, 1 - low), 1 + high)
                loss = max(unclipped, clipped)
                losses += [min(loss, -a * clip_ratio_c) if a < 0 else loss] * n
                weights += [1 / n if equal_steps else 1.0] * n
                token_clipped += [clipped > unclipped] * n
                step_clipped.append((a > 0 and s > 1 + high) or (a < 0 and s < 1 - low))
            t += n
    weighted = sum(w * x for w, x in zip(weights, losses))
    loss = weighted / mask.shape[0] if equal_steps else weighted / len(losses)
    return loss, sum(token_clipped) / len(losses), sum(step_clipped) / len(step_clipped)


@pytest.mark.parametrize("loss_fn, equal_steps", [(compute_policy_loss_steppo, False),
                                                  (compute_policy_loss_steppo_step_mean, True)])
def test_default_modes_loss_and_clip_fractions_equal_a_scalar_bound_reference(loss_fn, equal_steps):
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(6, 12, generator=gen) < 0.7
    old = -torch.rand(6, 12, generator=gen)
    new = old + 0.3 * torch.randn(6, 12, generator=gen)
    adv = torch.randn(6, 12, generator=gen).sign()
    steps = locate_steps(mask)
    adv = scatter_to_tokens(gather_at_step_starts(adv, steps), steps)  # one advantage per step
    config = FSDPActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                             clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    loss, metrics = loss_fn(old, new, adv, mask, "token-mean", config)
    expected_loss, token_clipfrac, step_clipfrac = scalar_bound_reference(old, new, adv, mask, 0.2, 0.28, 3.0,
                                                                          equal_steps)
    assert 0 < step_clipfrac < 1, "the batch must clip some steps and leave others"
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(token_clipfrac, rel=1e-6)
    assert metrics["actor/step_clipfrac"] == pytest.approx(step_clipfrac, rel=1e-6)


@pytest.mark.parametrize("low, high", [(1.0, 0.2), (-0.1, 0.2), (0.2, -0.1)])
def test_a_clip_range_that_cannot_bound_a_ratio_is_refused(low, high):
    steps = locate_steps(two_rows()[0])
    with pytest.raises(ValueError, match="clip range must satisfy"):
        step_clip_bounds(steps, low, high, per_action=True)


def test_action_clip_is_registered_with_verl():
    assert get_policy_loss_fn("steppo_action_clip") is compute_policy_loss_steppo_action_clip


# ----------------------------------------------------------------------------- step-start value loss


def critic_config(cliprange_value=100.0):
    """The one field of verl's CriticConfig that the loss reads."""
    return type("CriticConfigLike", (), {"cliprange_value": cliprange_value})()


def critic_micro_batch(prompt_lens, response_masks, step_ids=None):
    """A verl-style critic micro-batch (nested fields) and the model's values over whole sequences."""
    rows = range(len(prompt_lens))
    responses = [torch.ones(len(m), dtype=torch.int64) for m in response_masks]
    fields = {
        "prompts": torch.nested.as_nested_tensor([torch.ones(p, dtype=torch.int64) for p in prompt_lens],
                                                 layout=torch.jagged),
        "responses": torch.nested.as_nested_tensor(responses, layout=torch.jagged),
        "response_mask": torch.nested.as_nested_tensor([torch.tensor(m) for m in response_masks], layout=torch.jagged),
        "values": torch.nested.as_nested_tensor([torch.zeros(len(m)) for m in response_masks], layout=torch.jagged),
        "returns": torch.nested.as_nested_tensor(
            [torch.full((len(m),), float(b + 1)) for b, m in zip(rows, response_masks)], layout=torch.jagged
        ),
    }
    if step_ids is not None:
        fields["step_ids"] = torch.nested.as_nested_tensor([torch.tensor(s) for s in step_ids], layout=torch.jagged)
    data = TensorDict(fields, batch_size=len(prompt_lens))
    tu.assign_non_tensor(data, dp_size=1, global_batch_size=len(prompt_lens))
    total = sum(p + len(m) for p, m in zip(prompt_lens, response_masks))
    predictions = torch.linspace(-1.0, 1.0, total).requires_grad_(True)
    return data, predictions


def test_step_start_value_loss_trains_only_the_positions_it_names():
    masks = [[1, 1, 0, 0, 1, 1], [0, 1, 1, 1]]  # row 0: steps at 0 and 4; row 1: one step at 1
    # The agent loop's ids as verl's padding leaves them (copied from another sample): not used.
    step_ids = [[0, 0, 0, 0, 0, 0, 0], [0, 0]]
    prompt_lens = [3, 2]
    data, predictions = critic_micro_batch(prompt_lens, masks, step_ids)
    loss, metrics = step_start_value_loss(critic_config(), {"values": predictions}, data)
    # verl's alignment: the value of response token t is the model's output at sequence position p + t - 1.
    starts = {(0, 0), (0, 4), (1, 1)}
    positions = {3 + 0 - 1: (0, 0), 3 + 4 - 1: (0, 4), 3 + 6 + 2 + 1 - 1: (1, 1)}
    expected = 0.5 * sum((predictions[i].item() - (row + 1)) ** 2 for i, (row, _) in positions.items()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    trained = set(torch.nonzero(predictions.grad).flatten().tolist())
    assert trained == set(positions), f"gradient at {sorted(trained)}, step starts at {sorted(positions)}"
    assert {positions[i] for i in trained} == starts
    assert math.isfinite(metrics["critic/vpred_mean"])


def test_step_start_value_loss_reads_steps_from_the_mask_without_step_ids():
    masks = [[1, 1, 0, 1], [1, 0, 1, 1]]
    data, predictions = critic_micro_batch([2, 2], masks)
    loss, _ = step_start_value_loss(critic_config(), {"values": predictions}, data)
    loss.backward()
    # starts: row 0 tokens 0 and 3 -> positions 1, 4; row 1 tokens 0 and 2 -> 6 + 1 = 7, 6 + 3 = 9
    assert set(torch.nonzero(predictions.grad).flatten().tolist()) == {1, 4, 7, 9}


def test_step_start_value_loss_with_an_offset_trains_the_values_the_estimator_reads():
    masks = [[1, 1, 0, 0, 0, 1, 1], [0, 1, 1, 0, 1]]  # row 0: steps at 0 and 5; row 1: steps at 1 and 4
    data, predictions = critic_micro_batch([3, 2], masks)
    loss, _ = step_start_value_loss(critic_config(), {"values": predictions}, data, value_offset=2)
    loss.backward()
    # value_offset=2: row 0 reads step 1 at token 3 (5 - 2), step 0 stays at 0; row 1 reads step 0 at 0 (1 - 2,
    # clamped) and step 1 at 3 (4 - 2 = 2 is step 0's last token, so the token after it). Sequence positions
    # p + t - 1: row 0 (prompt 3) -> 2, 5; row 1 (prompt 2, after row 0's 10 tokens) -> 11, 14.
    assert set(torch.nonzero(predictions.grad).flatten().tolist()) == {2, 5, 11, 14}
    expected = 0.5 * ((predictions[2] - 1) ** 2 + (predictions[5] - 1) ** 2
                      + (predictions[11] - 2) ** 2 + (predictions[14] - 2) ** 2).item() / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_on_policy_the_step_loss_has_verls_token_loss_gradient():
    # At ratio 1 (the first mini-batch of a step) one ratio per step and one per token give the same
    # gradient: an arm that swaps the two losses differs only in later mini-batches (or by chance).
    mask, old, _, adv = two_rows()
    grads = []
    for loss_mode in ("steppo", "vanilla"):
        log_prob = old.clone().requires_grad_(True)
        loss, _ = get_policy_loss_fn(loss_mode)(old, log_prob, adv, mask, "token-mean", actor_config(loss_mode=loss_mode))
        loss.backward()
        grads.append(log_prob.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0

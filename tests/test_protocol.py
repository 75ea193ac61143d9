"""Step-segment protocol: property tests (hypothesis) and named error cases."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layouts import reference_step_rewards, steps_of_row

from steppo_verl.protocol import (
    StepLayoutError,
    after_steps,
    gather_at_step_starts,
    locate_steps,
    read_state_values,
    scatter_to_step_starts,
    scatter_to_tokens,
    state_value_positions,
    step_ids_from_mask,
    step_means,
    step_rewards,
    step_sums,
    validate_step_ids,
)


def num_steps(step_ids):
    return locate_steps(step_ids >= 0, step_ids).num_steps

masks = st.integers(1, 6).flatmap(
    lambda b: st.integers(0, 24).flatmap(
        lambda length: st.lists(st.lists(st.integers(0, 1), min_size=length, max_size=length), min_size=b, max_size=b)
    )
)


@st.composite
def valid_layouts(draw):
    """Explicit step ids, including adjacent steps with no observation token between them."""
    batch_size = draw(st.integers(1, 5))
    rows = []
    for _ in range(batch_size):
        ids = [-1] * draw(st.integers(0, 2))
        for k in range(draw(st.integers(0, 5))):
            ids += [k] * draw(st.integers(1, 4)) + [-1] * draw(st.integers(0, 3))
        rows.append(ids)
    length = max(len(r) for r in rows) + draw(st.integers(0, 2))
    step_ids = torch.full((batch_size, length), -1, dtype=torch.int64)
    for b, ids in enumerate(rows):
        step_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return step_ids


def _tensor(rows):
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)


@settings(max_examples=200, deadline=None)
@given(masks)
def test_recover_then_validate_round_trip(rows):
    mask = _tensor(rows)
    step_ids = step_ids_from_mask(mask)
    validate_step_ids(step_ids, mask)
    assert torch.equal(step_ids >= 0, mask.bool())
    for b, row in enumerate(rows):  # one step per maximal run of 1s
        runs = sum(1 for t, m in enumerate(row) if m and (t == 0 or not row[t - 1]))
        assert int(num_steps(step_ids)[b]) == runs


@settings(max_examples=200, deadline=None)
@given(valid_layouts(), st.integers(0, 2**31 - 1))
def test_scatter_then_gather_is_identity(step_ids, seed):
    steps = locate_steps((step_ids >= 0).long(), step_ids)
    per_step = torch.randn(steps.step_mask.shape, generator=torch.Generator().manual_seed(seed)) * steps.step_mask
    tokens = scatter_to_tokens(per_step, steps)
    assert torch.equal(gather_at_step_starts(tokens, steps), per_step)  # exact, not approximately
    torch.testing.assert_close(step_means(tokens, steps), per_step)
    assert torch.all(tokens[step_ids < 0] == 0)
    assert torch.equal(steps.step_ids(), step_ids)


@settings(max_examples=150, deadline=None)
@given(valid_layouts())
def test_starts_sums_and_rewards_match_plain_iteration(step_ids):
    steps = locate_steps(step_ids >= 0, step_ids)
    starts, step_mask = steps.starts, steps.step_mask
    rewards = torch.arange(step_ids.numel(), dtype=torch.float64).reshape(step_ids.shape) % 7 - 3
    sums = step_sums(rewards, steps)
    per_step_rewards = step_rewards(rewards, steps)
    for b in range(step_ids.shape[0]):
        row = step_ids[b].tolist()
        steps = steps_of_row(row)
        assert [int(s) for s in starts[b][step_mask[b]]] == [s[0] for s in steps]
        assert sums[b][: len(steps)].tolist() == [sum(float(rewards[b, t]) for t in s) for s in steps]
        assert per_step_rewards[b][: len(steps)].tolist() == pytest.approx(
            reference_step_rewards(rewards[b].tolist(), row)
        )


@st.composite
def broken_layouts(draw):
    """A valid layout with one rule broken in one sample; returns (step_ids, mask, sample)."""
    step_ids = draw(valid_layouts().filter(lambda s: bool((num_steps(s) >= 2).any())))
    mask = (step_ids >= 0).long()
    candidates = (num_steps(step_ids) >= 2).nonzero().flatten().tolist()
    b = draw(st.sampled_from(candidates))
    ids = step_ids.clone()
    kind = draw(st.sampled_from(["id_on_masked", "missing_id", "skip", "reorder", "split", "below_minus_one"]))
    row_steps = steps_of_row(ids[b].tolist())
    if kind == "id_on_masked":
        mask[b, row_steps[0][0]] = 0
    elif kind == "missing_id":
        ids[b, row_steps[0][0]] = -1
    elif kind == "skip":
        for k, tokens in enumerate(row_steps[1:], start=1):
            ids[b, tokens] = k + 1
    elif kind == "split" and len(row_steps[1]) >= 2:  # step 0 appears again inside step 1
        ids[b, row_steps[1][-1]] = 0
    elif kind in ("reorder", "split"):
        ids[b, row_steps[0]] = 1
        ids[b, row_steps[1]] = 0
    else:
        ids[b, row_steps[0][0]] = -2
        mask[b, row_steps[0][0]] = 0
    return ids, mask, b


@settings(max_examples=200, deadline=None)
@given(broken_layouts())
def test_invalid_layouts_are_rejected_naming_the_sample(case):
    ids, mask, b = case
    with pytest.raises(StepLayoutError, match=rf"sample {b} at response token \d+"):
        validate_step_ids(ids, mask)


@pytest.mark.parametrize(
    "ids,mask,message",
    [
        ([[0, 0, -1, 1]], [[1, 1, 0, 0]], "response_mask == 0 carries a step id"),
        ([[0, -1, -1, 1]], [[1, 1, 0, 1]], "action token .* has no step id"),
        ([[0, -1, 2, -1]], [[1, 0, 1, 0]], "step 2 follows step 0"),
        ([[1, -1, 0, -1]], [[1, 0, 1, 0]], "step 1 follows step -1"),
        ([[0, -1, 1, -1, 0]], [[1, 0, 1, 0, 1]], "step 0 appears again after step 1"),
    ],
)
def test_each_rule_has_a_readable_message(ids, mask, message):
    with pytest.raises(StepLayoutError, match=message):
        validate_step_ids(torch.tensor(ids), torch.tensor(mask))


def test_type_and_shape_errors():
    with pytest.raises(StepLayoutError, match="integer tensor"):
        validate_step_ids(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(StepLayoutError, match=r"shape \(2, 3\) but response_mask has shape \(2, 4\)"):
        validate_step_ids(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))


def test_adjacent_steps_need_explicit_ids():
    # Two actions with no observation between them: mask runs see one step, explicit ids two.
    mask = torch.tensor([[1, 1, 1, 0]])
    explicit = torch.tensor([[0, 1, 1, -1]])
    assert int(locate_steps(mask).num_steps[0]) == 1
    assert int(locate_steps(mask, explicit).num_steps[0]) == 2


def test_rewards_before_the_first_step_and_after_the_last():
    ids = torch.tensor([[-1, 0, 0, -1, 1, -1], [-1, -1, -1, -1, -1, -1]])
    rewards = torch.tensor([[0.5, 0.0, 1.0, 2.0, 0.0, 4.0], [1.0, 0, 0, 0, 0, 0]])
    steps = locate_steps(ids >= 0, ids)
    assert step_rewards(rewards, steps).tolist() == [[3.5, 4.0], [0.0, 0.0]]
    assert steps.next_starts().tolist() == [[4, 6], [6, 6]]
    assert steps.is_last().tolist() == [[False, True], [False, False]]


def test_step_ids_from_mask_example():
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0]])
    assert step_ids_from_mask(mask).tolist() == [[0, 0, -1, 1, -1, -1, 2], [-1] * 7]


def test_zero_length_rows():
    steps = locate_steps(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long))
    assert steps.starts.shape == (3, 0) and steps.num_steps.tolist() == [0, 0, 0]
    assert scatter_to_tokens(torch.zeros(3, 0), steps).shape == (3, 0)


def test_bool_or_integer_rewards_sum_per_step_instead_of_saturating():
    # Two rewarded tokens in step 0: a sum of bools counts them (torch.sum's rule), it is not True.
    step_ids = torch.tensor([[0, 0, -1, 1, -1]])
    steps = locate_steps(step_ids >= 0, step_ids)
    flags = torch.tensor([[True, True, False, False, True]])
    for rewards in (flags, flags.to(torch.int32), flags.to(torch.uint8)):
        sums = step_rewards(rewards, steps)
        assert sums.dtype == torch.int64 and sums.tolist() == [[2, 1]]
    assert step_sums(flags, steps).tolist() == [[2, 0]]
    assert step_means(flags, steps).tolist() == [[1.0, 0.0]]
    empty = locate_steps(torch.zeros(1, 3, dtype=torch.bool))
    assert step_sums(torch.ones(1, 3, dtype=torch.bool), empty).dtype == torch.int64


def test_int64_step_values_beyond_float64_precision_reach_tokens_exactly():
    # Step keys are 64-bit hashes: broadcasting them through float64 would round off the low bits.
    step_ids = torch.tensor([[0, 0, -1, 1], [-1, 0, -1, -1]])
    steps = locate_steps(step_ids >= 0, step_ids)
    keys = torch.tensor([[2**62 + 1, -(2**61) - 3], [2**53 + 1, 0]])
    assert scatter_to_tokens(keys, steps, fill=-1).tolist() == [
        [2**62 + 1, 2**62 + 1, -1, -(2**61) - 3],
        [-1, 2**53 + 1, -1, -1],
    ]


@pytest.mark.parametrize(
    "ids,token,message",
    [
        ([0, -5, -5, -1], 1, "step ids must be >= -1 (R1)"),  # a negative id other than -1 on action tokens
        ([0, 2**40, 2**40, -1], 1, f"step {2**40} follows step 0"),  # an id far beyond the run count
        ([0, 2**32, -1, -1], 1, f"step {2**32} follows step 0"),  # would read as 0 if narrowed to int32
    ],
)
def test_action_token_ids_outside_the_run_numbers_are_rejected(ids, token, message):
    mask = torch.tensor([[1, 1, 1, 0]]) if ids[2] != -1 else torch.tensor([[1, 1, 0, 0]])
    with pytest.raises(StepLayoutError, match=rf"sample 0 at response token {token}: " + re.escape(message)):
        locate_steps(mask, torch.tensor([ids]))


def test_per_step_values_of_the_wrong_shape_are_rejected():
    steps = locate_steps(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match=r"per-step values have shape \(1, 3\), expected .* \(1, 2\)"):
        scatter_to_tokens(torch.zeros(1, 3), steps)


@settings(max_examples=150, deadline=None)
@given(valid_layouts(), st.integers(0, 2**31 - 1))
def test_scatter_to_step_starts_matches_a_plain_loop(step_ids, seed):
    steps = locate_steps(step_ids >= 0, step_ids)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(step_ids.shape, generator=generator)
    per_step = torch.randn(steps.starts.shape, generator=generator, dtype=torch.float64)
    where = torch.rand(steps.starts.shape, generator=generator) < 0.5

    original = tokens.clone()
    written = scatter_to_step_starts(tokens, per_step, steps, where=where)

    expected = tokens.clone()
    for b in range(step_ids.shape[0]):
        for k, span in enumerate(steps_of_row(step_ids[b].tolist())):
            if where[b, k]:
                expected[b, span[0]] = float(per_step[b, k])
    assert written.dtype == tokens.dtype and torch.equal(written, expected)
    assert torch.equal(scatter_to_step_starts(tokens, per_step, steps), scatter_to_step_starts(
        tokens, per_step, steps, where=torch.ones_like(where)))
    assert torch.equal(tokens, original), "a copy is written, not x itself"


def test_scatter_to_step_starts_leaves_padded_steps_unwritten():
    # Row 1 has one step of the batch's two: its absent step 1 (start 0 by convention) must not overwrite token 0.
    step_ids = torch.tensor([[0, -1, 1, 1], [-1, 0, 0, -1]])
    steps = locate_steps(step_ids >= 0, step_ids)
    written = scatter_to_step_starts(torch.zeros(2, 4), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), steps)
    assert written.tolist() == [[1.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]]


def test_step_values_of_the_wrong_shape_are_not_scattered_to_step_starts():
    steps = locate_steps(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match=r"per-step values have shape \(1, 3\), expected .* \(1, 2\)"):
        scatter_to_step_starts(torch.zeros(1, 3), torch.zeros(1, 3), steps)


# ----------------------------------------------------------------------------- where V(s_k) is read


def test_state_values_are_read_offset_tokens_before_each_step_start_but_never_inside_the_step_before():
    # Row 0: step 0 at 0-1, an observation of 6 tokens, step 1 at 8-9, an observation of 2 tokens, step 2 at 12.
    # Row 1: 2 non-action tokens before step 0 at 2-3, one before step 1 at 5.
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]])
    steps = locate_steps(mask)
    assert state_value_positions(steps, 0) is steps.starts
    # Step 0 of row 0 cannot move before token 0; step 1 moves 3 back (to 5); step 2 only to 10, the token after
    # step 1's last (its value reads step 1 and nothing of it is left out). Row 1: step 0 to 0, step 1 to 4.
    assert state_value_positions(steps, 3).tolist() == [[0, 5, 10], [0, 4, 0]]
    assert after_steps(steps).tolist() == [[2, 10, 13], [4, 6, 0]]

    values = torch.arange(26, dtype=torch.float32).reshape(2, 13)
    moved = read_state_values(values, steps, 3)
    expected = values.clone()
    expected[0, [0, 8, 12]] = torch.tensor([0.0, 5.0, 10.0])
    expected[1, [2, 5]] = torch.tensor([13.0, 17.0])
    assert torch.equal(moved, expected)
    assert torch.equal(gather_at_step_starts(moved, steps), torch.tensor([[0.0, 5.0, 10.0], [13.0, 17.0, 0.0]]))
    assert read_state_values(values, steps, 0) is values


def test_the_bootstrap_value_is_read_offset_tokens_earlier_but_never_inside_the_final_step():
    # Row 0: step 0 at 0-1, step 1 at 4-5, an observation, V(s_K)'s position at 9. Row 1: one step at 1-2, no V(s_K).
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]])
    steps = locate_steps(mask)
    values = torch.arange(20, dtype=torch.float32).reshape(2, 10)
    index = torch.tensor([9, -1])
    moved = read_state_values(values, steps, 2, index)
    assert moved[0, 9] == 7.0 and moved[0, 4] == 2.0, "V(s_K) and V(s_1) read 2 tokens earlier"
    assert moved[1, 0] == 10.0 and moved[1, 1] == 10.0, "no V(s_K): nothing written; step 0 read at token 0"
    far = read_state_values(values, steps, 5, index)
    assert far[0, 9] == 6.0, "not before the token after the final step (6)"
    assert torch.equal(read_state_values(values, steps, 2), torch.where(
        torch.arange(10) == 9, values, moved)), "without bootstrap_index only the step starts move"

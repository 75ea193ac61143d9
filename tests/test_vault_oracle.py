"""The vault's value oracle (``algorithm.steppo.values=oracle``): state values of the current policy from the door
probabilities the batch's log-probs hold, checked against products computed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steppo_verl.dev.tiny_model import build_tiny_tokenizer, demonstration_text
from steppo_verl.protocol import gather_at_step_starts, locate_steps
from steppo_verl.state_keys import state_key
from steppo_verl.tasks.vault import prepare as vault
from steppo_verl.tasks.vault.oracle import door_values
from steppo_verl.tasks.vault.representable import call_text


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("vault_oracle")
    description = vault.write_task(out, num_chains=1, depth=3, seed=0, num_demos=40, val_codes=2)
    tokenizer = build_tiny_tokenizer(extra_text=demonstration_text(out / "demos.jsonl", limit=40),
                                     extra_tokens=json.loads((out / "added_tokens.json").read_text()))
    rooms = description["chains"][0]
    return out / "train.parquet", tokenizer, rooms, [description["right_door"][room] for room in rooms]


def other(door):
    return "blue" if door == "red" else "red"


def room_key(room):
    return state_key({"tool_states": [f"room {room}"]})  # the tool loop's key after a door into ``room``


DEAD_END_KEY, VAULT_KEY = state_key({"tool_states": ["dead end"]}), state_key({"tool_states": ["vault open"]})


def batch(tokenizer, trajectories):
    """Padded ``responses``, ``log_probs`` ``[B, L]``, the steps and their keys ``[B, K]`` of trajectories given as
    lists of ``(state key, step text, p(opening), p(door))``: the call's first token is scored p(opening), the door
    token p(door), every other token 1; a short observation follows each step."""
    observation = tokenizer.encode("You are in a room.", add_special_tokens=False)
    door_at = 2  # the tiny tokenizer: <tool_call>, the call's boilerplate, the door, ...
    rows = []
    for steps in trajectories:
        tokens, step_ids, scores, keys = [], [], [], []
        for k, (key, text, opening, door) in enumerate(steps):
            ids = tokenizer.encode(text, add_special_tokens=False)
            tokens += ids + observation
            step_ids += [k] * len(ids) + [-1] * len(observation)
            scores += [math.log(opening) if i == 0 else math.log(door) if i == door_at else 0.0 for i in range(len(ids))]
            scores += [0.0] * len(observation)
            keys += [key] * (len(ids) + len(observation))
        rows.append((tokens, step_ids, scores, keys))
    width = max(len(row[0]) for row in rows)

    def pad(i, value):
        return [row[i] + [value] * (width - len(row[i])) for row in rows]

    responses, step_ids = torch.tensor(pad(0, 0)), torch.tensor(pad(1, -1))
    steps = locate_steps((step_ids >= 0).long(), step_ids)
    keys = gather_at_step_starts(torch.tensor(pad(3, 0)), steps)
    return responses, torch.tensor(pad(2, 0.0)), steps, keys


def values_of(world, trajectories, outcomes=None):
    train_files, tokenizer, _, _ = world
    responses, log_probs, steps, keys = batch(tokenizer, trajectories)
    outcomes = torch.zeros(steps.starts.shape, dtype=torch.float64) if outcomes is None else outcomes
    return door_values(steps=steps, step_keys=keys, responses=responses, log_probs=log_probs, outcomes=outcomes,
                       tokenizer=tokenizer, world=str(train_files))


def test_the_door_token_is_where_the_calls_differ(world):
    _, tokenizer, _, _ = world
    red, blue = (tokenizer.encode(call_text(door), add_special_tokens=False) for door in ("red", "blue"))
    assert [i for i, (a, b) in enumerate(zip(red, blue)) if a != b] == [2]


def test_a_history_free_policy_values_each_room_by_the_product_of_its_right_door_chances(world):
    _, _, rooms, right = world
    opening, door = [0.9, 0.8, 1.0], [0.7, 0.4, 0.6]  # p(right) in room j = opening[j] * door[j]
    p = [o * d for o, d in zip(opening, door)]

    def step(j, correct):  # a step in room j that opens the right door or the other
        key = 123 if j == 0 else room_key(rooms[j])
        return (key, call_text(right[j] if correct else other(right[j])), opening[j], door[j] if correct else 1 - door[j])

    trajectories = [
        [step(0, True), step(1, True), step(2, True), (VAULT_KEY, "<answer>open</answer>", 1.0, 1.0)],
        [step(0, True), step(1, False), (DEAD_END_KEY, "<answer>none</answer>", 1.0, 1.0)],
        [step(0, False), (DEAD_END_KEY, "<answer>none</answer>", 1.0, 1.0)],
        [step(0, True), step(1, True), step(2, False), (DEAD_END_KEY, "<answer>none</answer>", 1.0, 1.0)],
    ]
    outcomes = torch.zeros(4, 4, dtype=torch.float64)
    outcomes[0] = 1.0  # the only rollout that opened the vault answered ``open``: a = 1
    values, known = values_of(world, trajectories, outcomes)

    room_value = [p[0] * p[1] * p[2], p[1] * p[2], p[2]]
    expected = torch.tensor([
        [room_value[0], room_value[1], room_value[2], 1.0],
        [room_value[0], room_value[1], 0.0, 0.0],
        [room_value[0], 0.0, 0.0, 0.0],
        [room_value[0], room_value[1], room_value[2], 0.0],
    ], dtype=torch.float64)
    valued = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(values, expected)
    assert torch.equal(known, valued)


def test_a_step_is_valued_by_its_own_door_chance_and_the_rooms_after_it_by_their_batch_means(world):
    _, _, rooms, right = world
    trajectories = [  # room 0 with two histories' door chances; room 1 reached once with each door
        [(11, call_text(right[0]), 1.0, 0.8), (room_key(rooms[1]), call_text(right[1]), 0.5, 0.6),
         (room_key(rooms[2]), call_text(right[2]), 1.0, 0.9), (VAULT_KEY, "<answer>open</answer>", 1.0, 1.0)],
        [(22, call_text(right[0]), 1.0, 0.4), (room_key(rooms[1]), call_text(other(right[1])), 1.0, 0.3),
         (DEAD_END_KEY, "<answer>none</answer>", 1.0, 1.0)],
        [(33, "not a call at all", 0.5, 1.0)],  # left the call before its door: valued by room 0's mean
    ]
    outcomes = torch.zeros(3, 4, dtype=torch.float64)
    outcomes[0, 3] = 0.5  # a = the mean outcome from the open vault
    values, known = values_of(world, trajectories, outcomes)

    room1 = (0.5 * 0.6 + 1.0 * (1 - 0.3)) / 2
    after0, after1, a = room1 * 0.9 * 0.5, 0.9 * 0.5, 0.5
    assert values[0, 0] == pytest.approx(0.8 * after0) and values[1, 0] == pytest.approx(0.4 * after0)
    assert values[0, 1] == pytest.approx(0.3 * after1) and values[1, 1] == pytest.approx(0.7 * after1)
    assert values[0, 2] == pytest.approx(0.9 * a) and values[0, 3] == pytest.approx(a)
    assert values[2, 0] == pytest.approx((0.8 + 0.4) / 2 * after0), "the unscored step reads room 0's mean"
    assert bool(known[:, 0].all()) and bool(known[1, 2])


def test_rooms_the_batch_never_scored_leave_the_rooms_before_them_to_the_critic(world):
    _, _, rooms, right = world
    values, known = values_of(world, [
        [(11, call_text(right[0]), 1.0, 0.8), (room_key(rooms[1]), call_text(other(right[1])), 1.0, 0.5),
         (DEAD_END_KEY, "<answer>none</answer>", 1.0, 1.0)],
        [(11, call_text(right[0]), 1.0, 0.8), (4242, "<answer>what</answer>", 1.0, 1.0)],  # a state off the path
    ])
    assert known.tolist() == [[False, False, True], [False, False, False]]
    assert values[0, 2] == 0.0


def test_a_batch_without_steps_is_valued_nowhere(world):
    train_files, tokenizer, _, _ = world
    steps = locate_steps(torch.zeros(2, 4, dtype=torch.long), torch.full((2, 4), -1))
    values, known = door_values(steps=steps, step_keys=torch.zeros(2, 0, dtype=torch.long),
                                responses=torch.zeros(2, 4, dtype=torch.long), log_probs=torch.zeros(2, 4),
                                outcomes=torch.zeros(2, 0, dtype=torch.float64), tokenizer=tokenizer,
                                world=str(train_files))
    assert values.shape == known.shape == (2, 0)


def test_the_oracle_needs_one_chain_of_two_doors(tmp_path, world):
    _, tokenizer, _, _ = world
    vault.write_task(tmp_path, num_chains=2, depth=2, seed=0, num_demos=4, val_codes=1)
    responses, log_probs, steps, keys = batch(tokenizer, [[(1, call_text("red"), 1.0, 0.5)]])
    arguments = dict(steps=steps, step_keys=keys, responses=responses, log_probs=log_probs,
                     outcomes=torch.zeros(1, 1, dtype=torch.float64), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="one chain of rooms with two doors"):
        door_values(**arguments, world=str(tmp_path / "train.parquet"))
    with pytest.raises(ValueError, match="no world description"):
        door_values(**arguments, world=str(tmp_path / "elsewhere" / "train.parquet"))

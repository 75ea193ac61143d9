"""The vault task: its world and tool, its reward, its data and demonstrations, the tiny policy's warm start,
and one episode through the real step agent loop with the real tool and reward."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from test_agent_loop import ScriptedServer, make_loop
from verl.tools.schemas import OpenAIFunctionToolSchema
from verl.tools.tool_registry import initialize_tools_from_config

from steppo_verl.agent_loop import Ending
from steppo_verl.cpu.tiny_model import build_tiny_model, build_tiny_tokenizer, demonstration_text
from steppo_verl.cpu.warm_start import render, warm_start
from steppo_verl.data import vault
from steppo_verl.rewards.vault import compute_score
from steppo_verl.tools.vault import DEAD_END, VaultPath, schema_doors, vault_observation

ROOMS, DOORS = ["amber", "birch", "cedar"], ["red", "blue", "red"]


def path(code="navy"):
    return VaultPath(rooms=list(ROOMS), doors=list(DOORS), code=code)


# ---------------------------------------------------------------- world and tool


def test_right_doors_lead_room_by_room_to_the_vault():
    walk = path()
    assert walk.open("red") == "You are in room birch."
    assert walk.open("blue") == "You are in room cedar."
    assert walk.open("red") == vault_observation("navy")
    assert walk.open("blue") == vault_observation("navy"), "an open vault stays open"


@pytest.mark.parametrize("wrong_at", [0, 1, 2])
def test_a_wrong_door_is_a_dead_end_that_no_door_leaves(wrong_at):
    walk = path()
    for room in range(wrong_at):
        walk.open(DOORS[room])
    assert walk.open("blue" if DOORS[wrong_at] == "red" else "red") == "Dead end."
    assert walk.position == DEAD_END
    assert [walk.open(door) for door in ("red", "blue")] == ["Dead end.", "Dead end."]


def test_a_path_needs_one_door_per_room():
    with pytest.raises(ValueError, match="one right door per room"):
        VaultPath(rooms=["a", "b"], doors=["red"], code="x")
    with pytest.raises(ValueError, match="lacks 'code'"):
        VaultPath.from_kwargs({"rooms": ["a"], "doors": ["red"]})


@pytest.fixture(scope="module")
def tool():
    (door_tool,) = initialize_tools_from_config(str(vault.tool_config_path()))
    return door_tool


class Trajectory:
    """Stands in for verl's AgentData: the tool only needs an object per trajectory (weakly referenced)."""


def open_door(tool, trajectory, parameters, create_kwargs):
    """One call the way verl's tool agent loop makes it: create, execute with the trajectory, release."""

    async def call():
        instance_id, _ = await tool.create(create_kwargs=create_kwargs)
        try:
            return await tool.execute(instance_id, parameters, agent_data=trajectory)
        finally:
            await tool.release(instance_id)

    return asyncio.run(call())


def test_the_tool_keeps_each_trajectorys_position_across_calls(tool):
    kwargs = {"rooms": np.array(ROOMS), "doors": np.array(DOORS), "code": "navy"}  # as parquet hands them back
    first, second = Trajectory(), Trajectory()
    assert open_door(tool, first, {"door": "red"}, kwargs)[0].text == "You are in room birch."
    assert open_door(tool, second, {"door": "blue"}, kwargs)[0].text == "Dead end."
    assert open_door(tool, first, {"door": "blue"}, kwargs)[0].text == "You are in room cedar."
    response, reward, metrics = open_door(tool, first, {"door": "red"}, kwargs)
    assert (response.text, reward, metrics["position"]) == (vault_observation("navy"), 0.0, 3)
    assert tool._create_kwargs == {}, "released instances leave nothing behind"


@pytest.mark.parametrize("parameters", [{}, {"door": "green"}, {"door": ["red"]}, "red", None])
def test_unusable_arguments_are_explained_and_do_not_move_the_trajectory(tool, parameters):
    kwargs = {"rooms": ROOMS, "doors": DOORS, "code": "navy"}
    trajectory = Trajectory()
    response, reward, metrics = open_door(tool, trajectory, parameters, kwargs)
    assert "Invalid arguments" in response.text and "red, blue" in response.text
    assert metrics["invalid"] and reward == 0.0
    assert open_door(tool, trajectory, {"door": "red"}, kwargs)[0].text == "You are in room birch."


def test_a_row_without_its_path_gets_a_clear_observation(tool):
    response, _, metrics = open_door(tool, Trajectory(), {"door": "red"}, {})
    assert "create_kwargs lacks" in response.text and metrics["invalid"]


def test_the_doors_come_from_the_schema_enum(tool):
    assert tool.doors == ("red", "blue")
    schema = tool.tool_schema.model_dump()
    del schema["function"]["parameters"]["properties"]["door"]["enum"]
    with pytest.raises(ValueError, match="enum of doors"):
        schema_doors(OpenAIFunctionToolSchema.model_validate(schema))


# ---------------------------------------------------------------- reward


@pytest.mark.parametrize(
    "transcript, expected",
    [
        (f"{vault_observation('navy')}\n<answer>open</answer>", 1.0),
        (f"{vault_observation('navy')}\n<answer> Open </answer>", 1.0),
        ("You are in room birch.\n<answer>open</answer>", 0.0),  # claims the vault without opening it
        (f"{vault_observation('lime')}\n<answer>open</answer>", 0.0),  # another question's vault
        (f"{vault_observation('navy')}\n<answer>none</answer>", 0.0),  # opened it but reports it shut
        (f"{vault_observation('navy')}", 0.0),  # no answer
    ],
)
def test_the_reward_needs_the_opened_vault_and_the_answer_open(transcript, expected):
    for ground_truth in ("navy", ["navy"], np.array(["navy"], dtype=object)):
        assert compute_score("vault", transcript, ground_truth) == expected


# ---------------------------------------------------------------- data and demonstrations


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("vault_task")
    world = vault.write_task(out, num_chains=4, depth=3, seed=0, num_demos=400, val_codes=4)
    return out, world


def test_rows_carry_the_worlds_paths_and_fresh_codes_for_validation(task):
    out, world = task
    train, val = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "val.parquet")
    assert (len(train), len(val)) == (4 * 12, 4 * 4)
    train_codes = {row["reward_model"]["ground_truth"][0] for _, row in train.iterrows()}
    val_codes = {row["reward_model"]["ground_truth"][0] for _, row in val.iterrows()}
    assert not train_codes & val_codes
    for _, row in pd.concat([train, val]).iterrows():
        kwargs = row["extra_info"]["tools_kwargs"][vault.TOOL_NAME]["create_kwargs"]
        assert list(kwargs["rooms"]) == world["chains"][row["extra_info"]["chain"]]
        assert list(kwargs["doors"]) == [world["right_door"][room] for room in kwargs["rooms"]]
        assert kwargs["code"] == row["reward_model"]["ground_truth"][0]
        assert row["prompt"][-1]["content"] == f"You are in room {kwargs['rooms'][0]}."
        assert row["agent_name"] == "steppo_agent"
    assert world["random_door_success"] == 0.125


def test_demonstrations_pick_doors_at_random_and_half_of_them_open_the_vault(task):
    out, world = task
    demos = [json.loads(line) for line in (out / "demos.jsonl").read_text().splitlines()]
    picks = right = opened = 0
    for demo in demos:
        messages = demo["messages"]
        room = messages[1]["content"].removeprefix("You are in room ").rstrip(".")
        for message, reply in zip(messages[2::2], messages[3::2]):
            if message.get("tool_calls"):
                door = message["tool_calls"][0]["function"]["arguments"]["door"]
                picks, right = picks + 1, right + (door == world["right_door"][room])
                room = reply["content"].removeprefix("You are in room ").rstrip(".")
        reached = messages[-2]["content"].startswith("Vault open.")
        opened += reached
        assert messages[-1]["content"] == f"<answer>{'open' if reached else 'none'}</answer>"
    # 400 demonstrations: both rates have a standard error of about 2.5 points or less.
    assert abs(right / picks - 0.5) < 0.06, "door choice must carry no information about the world"
    assert abs(opened / len(demos) - 0.5) < 0.08


def test_the_world_needs_enough_rooms_and_a_choice():
    with pytest.raises(ValueError, match="rooms"):
        vault.VaultWorld.generate(num_chains=9, depth=2, doors=("red", "blue"), seed=0)
    with pytest.raises(ValueError, match="two doors"):
        vault.VaultWorld.generate(num_chains=2, depth=2, doors=("red",), seed=0)


# ---------------------------------------------------------------- tiny policy and warm start


@pytest.fixture(scope="module")
def policy_dir(task, tmp_path_factory):
    out, _ = task
    model_dir = tmp_path_factory.mktemp("vault_policy")
    extra_tokens = json.loads((out / "added_tokens.json").read_text())
    build_tiny_model(model_dir, extra_text=demonstration_text(out / "demos.jsonl", limit=50), extra_tokens=extra_tokens)
    return model_dir


def test_a_call_is_six_tokens_with_the_added_boilerplate_tokens(task):
    out, _ = task
    tokenizer = build_tiny_tokenizer(extra_text=demonstration_text(out / "demos.jsonl", limit=50),
                                     extra_tokens=json.loads((out / "added_tokens.json").read_text()))
    call = '<tool_call>{"name": "open_door", "arguments": {"door": "blue"}}</tool_call><|im_end|>'
    ids = tokenizer.encode(call, add_special_tokens=False)
    assert len(ids) == 6 and tokenizer.decode(ids) == call


def test_the_warm_start_trains_exactly_the_policys_own_tokens(task, policy_dir):
    from transformers import AutoTokenizer

    out, _ = task
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    demo = json.loads((out / "demos.jsonl").read_text().splitlines()[0])
    ids, mask = render(tokenizer, demo)
    written = tokenizer.decode([token for token, m in zip(ids, mask) if m])
    expected = "".join(
        tokenizer.apply_chat_template([m], tokenize=False).split("<|im_start|>assistant\n", 1)[1].rstrip("\n")
        for m in demo["messages"] if m["role"] == "assistant"
    )
    assert written == expected
    assert written.count("<|im_end|>") == sum(m["role"] == "assistant" for m in demo["messages"])


def test_the_warm_start_learns_the_format_and_saves_the_model(task, policy_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = task
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(policy_dir).state_dict().items()}
    losses = warm_start(policy_dir, out / "demos.jsonl", steps=30, batch_size=8, seed=0)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    after = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no demonstrations"):
        warm_start(policy_dir, empty, steps=1)


# ---------------------------------------------------------------- one episode through the real agent loop


def test_an_episode_through_the_step_agent_loop_earns_the_reward(task, tool):
    out, world = task
    row = pd.read_parquet(out / "val.parquet").iloc[0]
    kwargs = row["extra_info"]["tools_kwargs"][vault.TOOL_NAME]["create_kwargs"]
    tokenizer = build_tiny_tokenizer(extra_tokens=json.loads((out / "added_tokens.json").read_text()))
    calls = [f'<tool_call>{{"name": "open_door", "arguments": {{"door": "{door}"}}}}</tool_call>'
             for door in kwargs["doors"]]
    server = ScriptedServer(tokenizer, [*calls, "<answer>open</answer>"])

    async def episode():
        loop = make_loop(tokenizer, server, [tool], max_assistant_turns=4)
        tools_kwargs = {vault.TOOL_NAME: {"create_kwargs": kwargs}}
        return await loop.run({"temperature": 1.0}, raw_prompt=list(row["prompt"]), tools_kwargs=tools_kwargs)

    output = asyncio.run(episode())
    assert output.extra_fields["ending"] == Ending.ANSWER.value
    assert output.extra_fields["num_steps"] == 4
    transcript = tokenizer.decode(output.response_ids, skip_special_tokens=True)
    assert compute_score("vault", transcript, row["reward_model"]["ground_truth"]) == 1.0
    wrong = random.Random(0).choice([d for d in ("red", "blue") if d != kwargs["doors"][0]])
    server = ScriptedServer(tokenizer, [calls[0].replace(kwargs["doors"][0], wrong), "<answer>open</answer>"])
    output = asyncio.run(episode())
    transcript = tokenizer.decode(output.response_ids, skip_special_tokens=True)
    assert "Dead end." in transcript
    assert compute_score("vault", transcript, row["reward_model"]["ground_truth"]) == 0.0

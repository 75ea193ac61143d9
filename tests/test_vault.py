"""The vault task: its world and tool, its reward, its data and demonstrations, the tiny policy's warm start,
and one episode through the real step agent loop with the real tool and reward."""

from __future__ import annotations

import asyncio
import json
import os
import random

import numpy as np
import pandas as pd
import pytest
import torch
from test_agent_loop import ScriptedServer, make_loop
from verl.tools.schemas import OpenAIFunctionToolSchema
from verl.tools.tool_registry import initialize_tools_from_config

from steppo_verl.endings import Ending
from steppo_verl.dev.tiny_model import build_tiny_model, build_tiny_tokenizer, demonstration_text
from steppo_verl.dev.warm_start import _batch, render, warm_start, written_token_loss
from steppo_verl.tasks.vault import prepare as vault
from steppo_verl.tasks.vault.reward import compute_score
from steppo_verl.tasks.vault.env import DEAD_END, VaultPath, vault_observation
from steppo_verl.tasks.vault.tool import schema_doors
from steppo_verl.transcript import ACTION_TEXTS, OBSERVATION_TEXTS

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
    # The state the agent loop keys steps by is the same in every prompt: the code is not part of it.
    assert metrics["state"] == "vault open"
    assert open_door(tool, second, {"door": "red"}, kwargs)[2]["state"] == "dead end"
    assert open_door(tool, Trajectory(), {"door": "red"}, kwargs)[2]["state"] == "room birch"
    assert tool._create_kwargs == {}, "released instances leave nothing behind"


def test_a_branch_continues_from_its_parents_room_and_moves_on_its_own(tool):
    kwargs = {"rooms": ROOMS, "doors": DOORS, "code": "navy"}
    parent, child = Trajectory(), Trajectory()
    assert open_door(tool, parent, {"door": "red"}, kwargs)[0].text == "You are in room birch."
    tool.on_branch(parent, child)
    assert open_door(tool, child, {"door": "blue"}, kwargs)[0].text == "You are in room cedar."
    # The parent is still in room birch: the branch moved a copy.
    assert open_door(tool, parent, {"door": "red"}, kwargs)[0].text == "Dead end."
    tool.on_branch(Trajectory(), Trajectory())  # a parent that never called the tool: nothing to copy


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


def episode(observation, answer_step):
    """A one-door episode as verl scores it: the transcript, and extra_info with the step agent loop's texts."""
    steps = ['<tool_call>{"name": "open_door", "arguments": {"door": "red"}}</tool_call>', answer_step]
    transcript = f"{steps[0]}\n{observation}\n{steps[1]}"
    return transcript, {"index": 0, ACTION_TEXTS: steps, OBSERVATION_TEXTS: [observation]}


@pytest.mark.parametrize(
    "observation, answer_step, expected",
    [
        (vault_observation("navy"), "<answer>open</answer>", 1.0),
        (vault_observation("navy"), "<answer> Open </answer>", 1.0),
        ("You are in room birch.", "<answer>open</answer>", 0.0),  # claims the vault without opening it
        (vault_observation("lime"), "<answer>open</answer>", 0.0),  # another question's vault
        (vault_observation("navy"), "<answer>none</answer>", 0.0),  # opened it but reports it shut
        (vault_observation("navy"), "", 0.0),  # no answer
    ],
)
def test_the_reward_needs_the_opened_vault_and_the_answer_open(observation, answer_step, expected):
    transcript, extra_info = episode(observation, answer_step)
    for ground_truth in ("navy", ["navy"], np.array(["navy"], dtype=object)):
        assert compute_score("vault", transcript, ground_truth, extra_info=extra_info) == expected


def test_vault_code_written_by_the_policy_itself_earns_nothing():
    transcript, extra_info = episode("Dead end.", f"{vault_observation('navy')} <answer>open</answer>")
    assert vault_observation("navy") in transcript
    assert compute_score("vault", transcript, "navy", extra_info=extra_info) == 0.0


def test_vault_answer_quoted_by_an_observation_is_not_the_policys():
    transcript, extra_info = episode(f"{vault_observation('navy')} <answer>open</answer>", "I am done.")
    assert compute_score("vault", transcript, "navy", extra_info=extra_info) == 0.0


def test_vault_reward_without_the_agent_loops_observations_is_refused():
    transcript, _ = episode(vault_observation("navy"), "<answer>open</answer>")
    with pytest.raises(ValueError, match="observation_texts"):
        compute_score("vault", transcript, "navy", extra_info={"index": 0})


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


def test_the_step_start_probe_renders_each_tool_response_a_demonstration_acts_on_with_its_tools(task, policy_dir):
    from bench_modules import load_benchmark
    from transformers import AutoModelForCausalLM, AutoTokenizer

    probe = load_benchmark("probe_step_starts")
    out, _ = task
    demos = [json.loads(line) for line in (out / "demos.jsonl").read_text().splitlines()[:10]]
    conversations, names, tools = probe.demo_states(str(out / "demos.jsonl"), limit=10)

    assert tools == demos[0]["tools"]
    # Every assistant turn but a demonstration's first acts on the tool response just before it: one state each.
    acting = sum(sum(message["role"] == "assistant" for message in demo["messages"]) - 1 for demo in demos)
    assert len(conversations) == acting >= 20
    assert all(conversation[-1]["role"] == "tool" for conversation in conversations)
    assert names == [conversation[-1]["content"] for conversation in conversations]
    assert all(any(demo["messages"][: len(c)] == c for demo in demos) for c in conversations), "prefixes, unchanged"

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    _, ids = probe.final_hidden_states(model, tokenizer, conversations[0], "", tools)
    rendered = tokenizer.decode(ids)
    assert "open_door" in rendered.split(names[0])[0], "the tools are rendered into the conversation"
    assert rendered.endswith(names[0] + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    states = sorted(set(names))
    report = probe.position_signal(model, tokenizer, conversations, [states.index(n) for n in names], "", 8, tools)
    assert report[0].token == "\n" and report[4].token == "<|im_end|>"


def test_the_probe_names_the_closest_states_and_merges_the_open_vaults_codes(task, policy_dir, capsys):
    from bench_modules import load_benchmark

    out, _ = task
    load_benchmark("probe_step_starts").main(["--model", str(policy_dir), "--demos", str(out / "demos.jsonl"),
                                              "--prefix", "", "--limit", "40", "--positions", "2",
                                              "--same-state", "Vault open"])
    printed = capsys.readouterr().out
    header, rows = printed.splitlines()[0], [line for line in printed.splitlines() if line.startswith("| 1 ")]
    assert "'Vault open'" in header and "Code:" not in header, "every open vault is one state"
    assert "'Dead end.'" in header and "'You are in room" in header
    assert len(rows) == 1 and " / " in rows[0].split("|")[7], "the closest pair is named"


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


def test_the_warm_start_loss_is_the_libraries_causal_lm_loss_on_the_written_tokens(task, policy_dir):
    """Same value and same gradient as ``model(..., labels=...).loss``, with the head applied only where a label is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = task
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, attn_implementation="sdpa")
    demos = [render(tokenizer, json.loads(line)) for line in (out / "demos.jsonl").read_text().splitlines()[:5]]
    input_ids, labels, attention = _batch(demos, tokenizer.pad_token_id)
    assert (attention == 0).any()  # the rows have different lengths: padding is in the batch
    losses, grads = [], []
    for loss_of in (lambda: model(input_ids=input_ids, attention_mask=attention, labels=labels).loss,
                    lambda: written_token_loss(model, input_ids, labels, attention)):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


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


def test_the_warm_start_is_a_function_of_its_demonstrations_steps_and_seed(task, tmp_path):
    """Two builds of one world's policy are the same model, so two learning runs from the recipe start from the
    same weights: differences between runs come from the runs (benchmarks/README.md, depth 5)."""
    from safetensors.torch import load_file

    from steppo_verl.dev import tiny_model

    out, _ = task
    weights = []
    for name in ("a", "b"):
        tiny_model.main(["--out", str(tmp_path / name), "--warm-start", str(out / "demos.jsonl"),
                         "--added-tokens", str(out / "added_tokens.json"), "--warm-start-steps", "3"])
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_an_interrupted_warm_start_leaves_no_model_for_the_recipe_to_take(task, tmp_path, monkeypatch):
    from steppo_verl.dev import tiny_model, warm_start as warm_start_module

    out, _ = task
    model = tmp_path / "model"
    argv = ["--out", str(model), "--warm-start", str(out / "demos.jsonl"), "--warm-start-steps", "2"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(warm_start_module, "warm_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_model.main(argv)
    assert not model.exists(), "run_cpu_vault.sh would take its config.json for a finished model"
    monkeypatch.undo()
    tiny_model.main(argv)  # again, to the end: the leftover partial model is replaced
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert not (tmp_path / "model.partial").exists()


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
    assert output.extra_fields["num_steps"] == len(output.extra_fields[ACTION_TEXTS]) == 4
    transcript = tokenizer.decode(output.response_ids, skip_special_tokens=True)
    assert compute_score("vault", transcript, row["reward_model"]["ground_truth"], output.extra_fields) == 1.0
    wrong = random.Random(0).choice([d for d in ("red", "blue") if d != kwargs["doors"][0]])
    server = ScriptedServer(tokenizer, [calls[0].replace(kwargs["doors"][0], wrong), "<answer>open</answer>"])
    output = asyncio.run(episode())
    transcript = tokenizer.decode(output.response_ids, skip_special_tokens=True)
    assert "Dead end." in transcript
    assert compute_score("vault", transcript, row["reward_model"]["ground_truth"], output.extra_fields) == 0.0


# ---------------------------------------------------------------- a policy that can read the room (issue 16)


@pytest.fixture(scope="module")
def practice_task(tmp_path_factory):
    """The same seed twice: the default world (red, blue, blue: first-vs-later) and its redraw."""
    tasks = {}
    for reject in (False, True):
        out = tmp_path_factory.mktemp(f"vault_practice_{reject}")
        tasks[reject] = out, vault.write_task(out, num_chains=1, depth=3, seed=0, num_demos=200, val_codes=4,
                                              practice_rooms=6, room_tokens=True, reject_first_vs_later=reject)
    return tasks


def test_room_names_split_into_pieces_become_single_tokens_with_room_tokens(practice_task):
    out, world = practice_task[True]
    tokenizer = build_tiny_tokenizer(extra_text=demonstration_text(out / "demos.jsonl", limit=50),
                                     extra_tokens=json.loads((out / "added_tokens.json").read_text()))
    rooms = [*world["chains"][0], *world["practice_door"]]
    assert len(rooms) == 9
    for room in rooms:
        tokens = tokenizer.tokenize(f"You are in room {room}.")
        assert tokens[-2:] == [vault.room_token(room), "."], room
        assert tokenizer.decode(tokenizer.encode(f"You are in room {room}.")) == f"You are in room {room}."


def test_default_task_keeps_its_tokens_and_first_vs_later_world(task, tmp_path):
    world = vault.write_task(tmp_path, num_chains=1, depth=3, seed=0, num_demos=4, val_codes=4)
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == vault.call_boilerplate()
    assert [world["right_door"][room] for room in world["chains"][0]] == ["red", "blue", "blue"]
    assert world["practice_door"] == {}


def test_demonstrations_are_identical_whatever_the_worlds_right_doors(practice_task):
    (default_out, default_world), (redrawn_out, redrawn_world) = practice_task[False], practice_task[True]
    assert default_world["chains"] == redrawn_world["chains"]
    assert default_world["right_door"] != redrawn_world["right_door"]
    # The demonstrations are a function of the rooms and the seed only: nothing of the right doors leaks.
    assert (default_out / "demos.jsonl").read_bytes() == (redrawn_out / "demos.jsonl").read_bytes()


def walked_rooms(messages):
    """``(room, door opened there, position)`` for each call of a demonstration."""
    room = messages[1]["content"].removeprefix("You are in room ").rstrip(".")
    for position, (message, reply) in enumerate(zip(messages[2::2], messages[3::2])):
        if message.get("tool_calls"):
            yield room, message["tool_calls"][0]["function"]["arguments"]["door"], position
            room = reply["content"].removeprefix("You are in room ").rstrip(".")


def test_practice_rooms_in_any_position_open_their_own_door_and_never_mix_with_world_rooms(practice_task):
    out, world = practice_task[True]
    taught, world_rooms = world["practice_door"], set(world["chains"][0])
    assert set(taught) & world_rooms == set() and set(taught.values()) == {"red", "blue"}
    positions = {room: set() for room in taught}
    practice_demos = 0
    for line in (out / "demos.jsonl").read_text().splitlines():
        walk = list(walked_rooms(json.loads(line)["messages"]))
        if walk[0][0] in taught:
            practice_demos += 1
            for room, door, position in walk:
                assert room in taught and door == taught[room]
                positions[room].add(position)
        else:
            assert {room for room, _, _ in walk} <= world_rooms
    assert 60 < practice_demos < 140, "about half of the 200 demonstrations practise"
    assert all(len(seen) > 1 for seen in positions.values()), "a practice door must not follow the position"


def test_too_few_practice_rooms_for_the_depth_are_refused(tmp_path):
    with pytest.raises(ValueError, match="practice rooms: need between 5"):
        vault.write_task(tmp_path, num_chains=1, depth=5, seed=0, num_demos=4, val_codes=4, practice_rooms=4)


@pytest.mark.parametrize("seed", range(12))
def test_first_vs_later_world_of_a_seed_is_redrawn_when_asked(seed):
    world = vault.VaultWorld.generate(1, 3, ("red", "blue"), seed, reject_first_vs_later=True)
    assert not world.first_vs_later()
    assert world.chains == vault.VaultWorld.generate(1, 3, ("red", "blue"), seed).chains


def test_first_vs_later_rejection_of_a_world_with_no_alternative_is_refused():
    with pytest.raises(ValueError, match="two chains or three rooms"):
        vault.VaultWorld.generate(1, 2, ("red", "blue"), 0, reject_first_vs_later=True)
    assert vault.VaultWorld.generate(2, 2, ("red", "blue"), 0, reject_first_vs_later=True).first_vs_later() is False


def test_worlds_of_different_seeds_have_different_right_door_patterns():
    patterns = {tuple(world.right_door[room] for room in world.chains[0])
                for world in (vault.VaultWorld.generate(1, 3, ("red", "blue"), seed, True) for seed in range(8))}
    assert len(patterns) >= 3


@pytest.mark.skipif(not os.environ.get("STEPPO_SLOW_TESTS"),
                    reason="trains a tiny model for minutes on 2 shared cores; set STEPPO_SLOW_TESTS=1")
def test_right_door_fine_tuning_of_the_tiny_policy_solves_a_non_first_vs_later_world(practice_task, tmp_path):
    """The representability check, small: a random tiny model fine-tuned on the right doors of a world that
    counting calls cannot solve plays it through the real environment and reward, greedy and sampled."""
    from steppo_verl.tasks.vault import representable

    out, description = practice_task[True]
    model_dir = build_tiny_model(tmp_path / "random", extra_text=demonstration_text(out / "demos.jsonl", limit=50),
                                 extra_tokens=json.loads((out / "added_tokens.json").read_text()))
    world, tools = vault.VaultWorld.from_description(description), representable.tool_schemas()
    representable.fine_tune_on_right_doors(model_dir, world, tools, tmp_path / "tuned", steps=200, batch_size=16)
    model, tokenizer = representable.load_policy(tmp_path / "tuned")
    doors = tuple(description["doors"])
    assert representable.play(model, tokenizer, world, tools, doors, episodes=16, sample=False) >= 0.95
    assert representable.play(model, tokenizer, world, tools, doors, episodes=32, sample=True) >= 0.95
    walk = representable.room_contexts(world, {})
    for room in world.chains[0]:
        probabilities = representable.door_probabilities(model, tokenizer, walk[room], tools, list(doors))
        assert probabilities[world.right_door[room]] > 0.9, (room, probabilities)

"""The environment interface, its registry, the action parser and the toy corridor (pure Python, no verl)."""

from __future__ import annotations

import re

import pytest

from steppo_verl.envs import (
    ENVIRONMENTS,
    CorridorEnv,
    InvalidAction,
    StepResult,
    action_text,
    check_action_tag,
    make_env,
    parse_action,
    register_env,
)
from steppo_verl.state_keys import KEY_BITS, state_key

CORRIDOR = {"length": 4, "key_at": 2, "start": 1}  # pit 0, start 1, key 2, door 3


def play(actions, task=CORRIDOR, **kwargs):
    env = CorridorEnv(**kwargs)
    return env, [env.reset(task)] + [env.step(action) for action in actions]


def test_corridor_walk_with_the_key_to_the_door_wins():
    _, results = play(["right", "take key", "right", "open door"])
    final = results[-1]
    assert final.terminated and not final.truncated and final.reward == 1.0
    assert final.info["won"] and not final.info["lost"]
    assert [r.reward for r in results[:-1]] == [0.0] * 4 and not any(r.terminated for r in results[:-1])
    assert "You take the key" in results[2].observation


def test_corridor_step_into_the_pit_loses():
    _, results = play(["left"])
    assert results[-1].terminated and results[-1].reward == 0.0 and results[-1].info["lost"]


def test_corridor_locked_door_without_the_key_goes_on():
    _, results = play(["right", "right", "open door"])
    assert "The door is locked" in results[-1].observation and not results[-1].terminated


def test_corridor_state_keys_are_exact_states():
    _, detour = play(["right", "left", "right"])  # cell 2 without the key, reached twice
    assert detour[1].state_key == detour[3].state_key != detour[2].state_key
    _, with_key = play(["right", "take key"])
    assert with_key[2].state_key != detour[1].state_key, "holding the key is part of the state"
    assert with_key[2].state_key == state_key(["corridor", 4, 2, 2, True])
    _, other_corridor = play(["right"], task={**CORRIDOR, "length": 5})
    assert other_corridor[1].state_key != detour[1].state_key, "the layout is part of the state"
    assert all(0 <= r.state_key < 2**KEY_BITS for r in detour)


def test_corridor_unknown_command_is_an_invalid_action_observation_and_keeps_the_state():
    _, results = play(["fly north"])
    answer = results[-1]
    assert answer.observation.startswith("invalid action: 'fly north'; valid actions: left, right")
    assert answer.state_key == results[0].state_key and not answer.terminated and answer.reward == 0.0


def test_corridor_commands_ignore_case_and_spacing():
    _, results = play(["  Right ", "TAKE   key"])
    assert "You take the key" in results[-1].observation


def test_corridor_max_steps_truncates_without_terminating():
    env, results = play(["right", "left"], max_steps=2)
    assert not results[1].truncated
    assert results[2].truncated and not results[2].terminated
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("right")


def test_corridor_win_on_the_last_allowed_step_is_terminal_not_truncated():
    _, results = play(["right", "take key", "right", "open door"], max_steps=4)
    assert results[-1].terminated and not results[-1].truncated


@pytest.mark.parametrize(
    "task, message",
    [
        ({"lenght": 5}, r"unknown fields \['lenght'\]"),
        ({"length": 2}, "length must be at least 3"),
        ({"key_at": 0}, r"key_at must be in 1 \.\. 4"),
        ({"start": 5}, r"start must be in 1 \.\. 4"),
        ({"start": "1"}, "start must be an int"),
    ],
)
def test_corridor_bad_task_is_rejected_naming_the_field(task, message):
    with pytest.raises(ValueError, match=message):
        CorridorEnv().reset(task)


def test_corridor_bad_max_steps_is_rejected():
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        CorridorEnv(max_steps=0)


def test_step_result_without_a_key_takes_the_key_of_its_observation():
    assert StepResult("a room").state_key == state_key("a room")


@pytest.mark.parametrize("key", [-1, 2**KEY_BITS, 1.5])
def test_step_result_key_outside_48_bits_is_rejected(key):
    with pytest.raises(ValueError, match="state_key must be an int in"):
        StepResult("a room", state_key=key)


@pytest.mark.parametrize("reward", [float("nan"), float("inf"), "1"])
def test_step_result_reward_that_is_not_a_finite_number_is_rejected(reward):
    with pytest.raises(ValueError, match="reward must be a finite number"):
        StepResult("a room", reward=reward)


def test_step_result_observation_that_is_not_text_is_rejected():
    with pytest.raises(TypeError, match="observation must be a str"):
        StepResult(["a room"])


def test_action_inside_the_last_action_tag():
    assert parse_action("I think <action>left</action> is bad. <action> right </action>") == "right"


def test_an_action_written_as_a_turn_is_parsed_back():
    assert action_text("go north") == "<action>go north</action>"
    assert parse_action(action_text("take coin")) == "take coin"
    assert parse_action(action_text("open", action_tag="do"), action_tag="do") == "open"


def test_action_as_the_whole_turn_without_a_tag():
    assert parse_action("  take key\n", action_tag=None) == "take key"


@pytest.mark.parametrize(
    "text, action_tag, reason",
    [
        ("go right", "action", r"write your action inside <action>\.\.\.</action>"),
        ("<action>right", "action", "write your action inside"),
        ("<action>  </action>", "action", "the action is empty"),
        ("   ", None, "the action is empty"),
    ],
)
def test_turn_without_a_usable_action_is_invalid(text, action_tag, reason):
    with pytest.raises(InvalidAction, match=reason):
        parse_action(text, action_tag)


@pytest.mark.parametrize(
    "action, code, position",
    [
        ("take\x00coin", "U+0000", 4),  # a NUL crashes TextWorld's interpreter, and the worker process with it
        ("go west\ngo east", "U+000A", 7),  # the interpreter would run "go east" as the next command
        ("take \x1b[2J coin", "U+001B", 5),
        ("take\x7fcoin", "U+007F", 4),
        ("take\x85coin", "U+0085", 4),
        ("take \ud800 coin", "U+D800", 5),  # not encodable as UTF-8
    ],
)
@pytest.mark.parametrize("action_tag", ["action", None])
def test_an_action_that_is_not_one_line_of_text_is_invalid(action, code, position, action_tag):
    text = action_text(action) if action_tag else action
    expected = f"one line of text without control characters; it has {code} at character {position}"
    with pytest.raises(InvalidAction, match=re.escape(expected) + "$"):
        parse_action(text, action_tag)


def test_tabs_and_any_printable_text_are_sendable():
    for action in ["take\tcoin", "take cöin ☃ 日本", "go " + "north " * 400 + "now", "<tool_call>x</tool_call>"]:
        assert parse_action(action_text(action)) == action


@pytest.mark.parametrize("action_tag", ["", "<action>", "an action", 3])
def test_action_tag_that_cannot_name_a_tag_is_rejected(action_tag):
    with pytest.raises(ValueError, match="action_tag must be a tag name"):
        check_action_tag(action_tag)


def test_make_env_by_registered_name_and_by_class_path():
    assert ENVIRONMENTS["corridor"] is CorridorEnv
    assert make_env({"name": "corridor", "max_steps": 3}).max_steps == 3
    assert isinstance(make_env({"class": "steppo_verl.envs.CorridorEnv"}), CorridorEnv)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ({"name": "maze"}, ValueError, r"unknown environment 'maze'; registered: \[.*'corridor'"),
        ({"max_steps": 3}, ValueError, "needs exactly one of 'name' or 'class'"),
        ({"name": "corridor", "class": "x.Y"}, ValueError, "needs exactly one of 'name' or 'class'"),
        ({"class": "CorridorEnv"}, ValueError, "must be 'package.module.Class'"),
        ({"class": "steppo_verl.envs."}, ValueError, "must be 'package.module.Class'"),
        ({"class": "steppo_verl.envs.NoSuchEnv"}, AttributeError, "has no attribute 'NoSuchEnv'"),
        ({"class": "no_such_package.Env"}, ModuleNotFoundError, "No module named 'no_such_package'"),
        ({"class": "collections.OrderedDict"}, TypeError, "not a subclass of steppo_verl.envs.Environment"),
    ],
)
def test_make_env_with_a_bad_spec_says_what_is_wrong(spec, error, message):
    with pytest.raises(error, match=message):
        make_env(spec)


def test_registering_a_taken_environment_name_is_rejected():
    with pytest.raises(ValueError, match="'corridor' is already registered to CorridorEnv"):

        @register_env("corridor")
        class Impostor(CorridorEnv):
            pass

    assert ENVIRONMENTS["corridor"] is CorridorEnv

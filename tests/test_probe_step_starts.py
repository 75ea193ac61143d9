"""The step-start probe (benchmarks/probe_step_starts.py): hidden-state distances per position, by state."""

from __future__ import annotations

import pytest
from bench_modules import load_benchmark

from steppo_verl.dev.tiny_model import build_tiny_model

probe = load_benchmark("probe_step_starts")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("probe") / "model")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def chat(observation: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Play the game."}, {"role": "user", "content": observation}]


def test_the_positions_end_with_the_prefix_and_separate_states_that_differ(tiny):
    model, tokenizer = tiny
    conversations = [chat("You are in the kitchen."), chat("You are in the kitchen. A door."),
                     chat("You see a coin here."), chat("You see a coin here, shining.")]
    report = probe.position_signal(model, tokenizer, conversations, [0, 0, 1, 1], prefix="<action>", positions=6)

    prefix = [tokenizer.decode(token) for token in tokenizer.encode("<action>", add_special_tokens=False)]
    assert [row.offset for row in report] == list(range(1, 7))
    assert [row.token for row in report[: len(prefix)]] == prefix[::-1]
    assert all(row.between > 0 and row.within > 0 and row.norm > 0 for row in report)


def test_identical_conversations_in_two_states_are_zero_apart(tiny):
    model, tokenizer = tiny
    same = chat("You are in the kitchen.")
    report = probe.position_signal(model, tokenizer, [same, same, same, same], [0, 1, 0, 1], positions=4)
    assert [row.between for row in report] == [0.0] * 4
    assert [row.within for row in report] == [0.0] * 4


def test_one_state_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="two distinct states"):
        probe.position_signal(model, tokenizer, [chat("a"), chat("b")], [0, 0])


def test_the_closest_pair_names_the_two_states_a_large_mean_distance_hides(tiny):
    model, tokenizer = tiny
    kitchen, coin = chat("You are in the kitchen."), chat("You see a coin here, shining and round.")
    # States 0 and 2 are the same conversation: their means coincide, whatever the distance to state 1.
    report = probe.position_signal(model, tokenizer, [kitchen, coin, kitchen, kitchen, coin, kitchen],
                                   [0, 1, 2, 0, 1, 2], positions=3)
    for row in report:
        assert row.closest_pair == (0, 2) and row.closest == 0.0
        assert row.between > 0, "the mean over pairs is not zero: the other two pairs are apart"

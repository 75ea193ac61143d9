"""QA reward: answer extraction, HotpotQA-style EM/F1, and the call verl makes to a custom reward function."""

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from steppo_verl.tasks.qa.reward import compute_score, exact_match, f1_score, normalize_answer
from steppo_verl.transcript import ACTION_TEXTS, OBSERVATION_TEXTS, extract_answer

if TYPE_CHECKING:
    from verl import DataProto


def score(solution_str, ground_truth, **kwargs):
    return compute_score(data_source="hotpotqa", solution_str=solution_str, ground_truth=ground_truth, **kwargs)


# --- extraction ---------------------------------------------------------------------------------


def test_last_of_several_answer_tags_wins():
    text = "<answer>Paris</answer> wait, let me check. <answer>Lyon</answer> final."
    assert extract_answer(text) == "Lyon"
    assert score(text, "Lyon")["em"] == 1.0
    assert score(text, "Paris")["em"] == 0.0


def test_no_answer_tag_scores_zero():
    assert extract_answer("The answer is Paris.") is None
    assert score("The answer is Paris.", "Paris") == {"score": 0.0, "em": 0.0, "f1": 0.0}


def test_answer_is_stripped_across_newlines():
    text = "<answer>\n  Barack   Obama \n</answer>"
    assert extract_answer(text) == "Barack   Obama"
    assert score(text, "barack obama")["em"] == 1.0


def test_answer_tags_are_case_insensitive():
    assert extract_answer("<ANSWER>yes</Answer>") == "yes"


def test_unclosed_answer_tag_is_no_answer():
    assert extract_answer("<answer>Paris") is None
    assert score("<answer>Paris", "Paris")["score"] == 0.0


def test_empty_answer_tag_is_an_empty_answer():
    assert extract_answer("<answer>  </answer>") == ""
    assert score("<answer>  </answer>", "Paris") == {"score": 0.0, "em": 0.0, "f1": 0.0}


def test_reopened_answer_tag_answers_with_what_follows_the_last_opening():
    assert extract_answer("<answer>a <answer>b</answer>") == "b"
    assert extract_answer("<answer>x</answer> stray </answer>") == "x"


@pytest.mark.timeout(30)
def test_sixteen_thousand_unclosed_answer_tags_are_scored_in_linear_time():
    text = "<answer>" * 16_000  # 128 KB; a lazy regex rescans the rest of the text from every tag
    started = time.perf_counter()
    assert extract_answer(text) is None
    assert score(text, "Paris")["score"] == 0.0
    assert extract_answer(text + "Paris</answer>") == "Paris"
    assert time.perf_counter() - started < 0.5


# --- the policy's own text ----------------------------------------------------------------------

# One search step, the passages it got back, one final step (the step agent loop's extra_fields).
SEARCH_STEP = '<tool_call>{"name": "search", "arguments": {"query_list": ["capital of France"]}}</tool_call>'
QUOTING_PASSAGE = "Doc 1 (Title: Quiz) The key of the quiz is <answer>Paris</answer>."


def transcript_and_extra_info(final_step: str) -> tuple[str, dict]:
    steps = [SEARCH_STEP, final_step]
    transcript = f"{SEARCH_STEP}\n{QUOTING_PASSAGE}\n{final_step}"
    return transcript, {"index": 0, ACTION_TEXTS: steps, OBSERVATION_TEXTS: [QUOTING_PASSAGE]}


def test_answer_tag_inside_a_retrieved_passage_scores_nothing():
    transcript, extra_info = transcript_and_extra_info("I could not find it.")
    assert score(transcript, "Paris", extra_info=extra_info) == {"score": 0.0, "em": 0.0, "f1": 0.0}
    transcript, extra_info = transcript_and_extra_info("<answer>Paris</answer>")
    assert score(transcript, "Paris", extra_info=extra_info)["em"] == 1.0


def test_answer_tags_around_an_observation_are_no_answer():
    """The policy opens the tag in one step and closes it in the next: the answer would be the tool's text."""
    extra_info = {ACTION_TEXTS: ["<answer>", "</answer>"], OBSERVATION_TEXTS: ["Paris"]}
    assert score("<answer>Paris</answer>", "Paris", extra_info=extra_info)["score"] == 0.0


def test_the_latest_step_with_an_answer_wins():
    extra_info = {ACTION_TEXTS: ["<answer>Lyon</answer>", "<answer>Paris</answer>", "done"], OBSERVATION_TEXTS: []}
    assert score("ignored", "Paris", extra_info=extra_info)["em"] == 1.0


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("an apple a day", "apple day"),
        ("theatre, then", "theatre then"),  # articles only as whole words
        ("U.S.A.!", "usa"),
        ("  New\tYork \n City ", "new york city"),
        ("Rock 'n' Roll", "rock n roll"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


# --- EM and F1 ----------------------------------------------------------------------------------


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("The Beatles.", "beatles") == 1.0
    assert exact_match("Beatles", "The Rolling Stones") == 0.0


def test_f1_partial_overlap_by_hand():
    # prediction tokens: [new, york, city, hall]; gold tokens: [york, city]
    # overlap = 2, precision = 2/4 = 0.5, recall = 2/2 = 1.0, F1 = 2 * 0.5 * 1.0 / 1.5 = 2/3
    assert f1_score("New York City Hall", "York City") == pytest.approx(2 / 3)


def test_f1_counts_repeated_tokens_once_per_occurrence():
    # prediction [paris, paris]; gold [paris]: overlap = min(2, 1) = 1, precision 1/2, recall 1, F1 = 2/3
    assert f1_score("Paris Paris", "Paris") == pytest.approx(2 / 3)


def test_f1_disjoint_and_identical():
    assert f1_score("Berlin", "Paris") == 0.0
    assert f1_score("the Paris", "Paris!") == 1.0


@pytest.mark.parametrize("closed", ["yes", "no", "noanswer"])
def test_yes_no_noanswer_gold_gets_no_partial_f1(closed):
    assert f1_score(f"{closed} it is", closed) == 0.0


@pytest.mark.parametrize("closed", ["yes", "no", "noanswer"])
def test_yes_no_noanswer_prediction_gets_no_partial_f1(closed):
    assert f1_score(closed, f"{closed} it is") == 0.0


def test_yes_no_still_match_themselves():
    assert f1_score("Yes.", "yes") == 1.0
    assert score("<answer>No</answer>", "no", metric="f1")["score"] == 1.0


# --- ground truth forms -------------------------------------------------------------------------


def test_list_ground_truth_takes_the_best_of_each_metric():
    result = score("<answer>New York City</answer>", ["NYC", "New York", "Big Apple"])
    # EM matches nothing; best F1 is against "New York": precision 2/3, recall 1, F1 = 0.8
    assert result["em"] == 0.0
    assert result["f1"] == pytest.approx(0.8)
    assert score("<answer>NYC</answer>", ("New York", "nyc"))["em"] == 1.0


def test_numpy_array_ground_truth_as_verl_passes_parquet_lists():
    golds = np.array(["Paris", "City of Light"], dtype=object)
    assert score("<answer>city of light</answer>", golds) == {"score": 1.0, "em": 1.0, "f1": 1.0}
    assert score("<answer>paris</answer>", np.array(["Lyon", "Paris"]))["em"] == 1.0


@pytest.mark.parametrize("bad", [None, "", "   ", [], (), np.array([], dtype=object), ["Paris", ""]])
def test_empty_ground_truth_raises(bad):
    with pytest.raises(ValueError, match="ground_truth"):
        score("<answer>Paris</answer>", bad)


@pytest.mark.parametrize("gold", ["The The", "!!!"])
def test_gold_answers_that_normalisation_erases_stay_answerable(gold):
    # Real HotpotQA dev answers (band names): SQuAD normalisation maps them to "".
    assert score(f"<answer>{gold.lower()}</answer>", gold) == {"score": 1.0, "em": 1.0, "f1": 1.0}
    assert score("<answer>the</answer>", gold)["em"] == 0.0
    assert score("<answer></answer>", gold)["em"] == 0.0


def test_non_string_ground_truth_raises():
    with pytest.raises(TypeError, match="ground_truth"):
        score("<answer>1990</answer>", [1990])


# --- metric selection ---------------------------------------------------------------------------


def test_score_is_em_by_default_and_f1_on_request():
    text = "<answer>New York City Hall</answer>"
    assert score(text, "York City")["score"] == 0.0
    result = score(text, "York City", metric="f1")
    assert result["score"] == pytest.approx(2 / 3)
    assert result["em"] == 0.0


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="metric"):
        score("<answer>Paris</answer>", "Paris", metric="accuracy")


def test_result_is_all_floats():
    result = score("<answer>Paris</answer>", np.array(["Paris"]), extra_info={"index": 3}, unused_kwarg=1)
    assert set(result) == {"score", "em", "f1"}
    assert all(type(value) is float for value in result.values())


# --- through verl's own reward path -------------------------------------------------------------


class _ByteTokenizer:
    """Decodes UTF-8 byte ids, which is all verl's naive reward manager asks of a tokenizer."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids.tolist()).decode()


def _one_response(text: str, ground_truth: np.ndarray) -> "DataProto":
    from verl import DataProto

    ids = list(text.encode())
    padding = 4  # right padding that the manager must cut off using the attention mask
    return DataProto.from_dict(
        tensors={
            "responses": torch.tensor([ids + [0] * padding]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * padding]),
        },
        non_tensors={
            "data_source": np.array(["hotpotqa"], dtype=object),
            "reward_model": np.array([{"ground_truth": ground_truth}], dtype=object),
            "extra_info": np.array([{"index": 0}], dtype=object),
        },
    )


@pytest.fixture
def fresh_event_loop():
    """The reward manager captures the current event loop when built; give it one this test owns."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def naive_reward_manager(**reward_kwargs):
    """verl's naive reward manager, loaded from config the way verl's reward loop loads it."""
    from verl.trainer.ppo.reward import load_reward_manager

    config = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://steppo_verl.tasks.qa.reward",
                    "name": "compute_score",
                    "reward_kwargs": reward_kwargs,
                },
                "reward_manager": {"source": "register", "name": "naive"},
                "sandbox_fusion": {"url": None},
            }
        }
    )
    return load_reward_manager(config, _ByteTokenizer())


def test_verl_naive_reward_manager_loads_and_calls_compute_score(fresh_event_loop):
    manager = naive_reward_manager(metric="f1")
    data = _one_response("I think <answer>New York City Hall</answer>", np.array(["York City", "Boston"]))

    result = fresh_event_loop.run_until_complete(manager.run_single(data))

    assert result["reward_score"] == pytest.approx(2 / 3)
    assert result["reward_extra_info"] == pytest.approx({"score": 2 / 3, "em": 0.0, "f1": 2 / 3})


def test_passage_answer_is_not_scored_through_verls_reward_manager(fresh_event_loop):
    """verl's agent loop hands each trajectory's extra_fields to the reward loop as ``tool_extra_fields``,
    which the reward manager merges into ``extra_info``: the policy's steps reach the reward."""
    transcript, extra_info = transcript_and_extra_info("I could not find it.")
    data = _one_response(transcript, np.array(["Paris"]))
    assert fresh_event_loop.run_until_complete(naive_reward_manager().run_single(data))["reward_score"] == 1.0
    data.non_tensor_batch["tool_extra_fields"] = np.array([extra_info], dtype=object)
    assert fresh_event_loop.run_until_complete(naive_reward_manager().run_single(data))["reward_score"] == 0.0


# --- properties ---------------------------------------------------------------------------------

_answers = st.text(alphabet=st.sampled_from("abc tTheAN.,!'-\n"), max_size=20) | st.text(max_size=20)


@given(_answers)
def test_normalize_answer_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@given(_answers, _answers)
def test_exact_match_implies_full_f1(prediction, gold):
    assume(gold.strip())
    em, f1 = exact_match(prediction, gold), f1_score(prediction, gold)
    assert 0.0 <= f1 <= 1.0
    if em == 1.0:
        assert f1 == 1.0

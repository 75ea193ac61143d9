"""The step-aware agent loop, run for real on CPU: verl's interfaces, a scripted server standing in
for vLLM (as verl's own CPU tests do), the tiny local tokenizer and small test tools."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
from verl.utils.dataset.rl_dataset import RLHFDataset
from verl.workers.rollout.replica import TokenOutput

from steppo_verl.advantage import compute_steppo_advantage
from steppo_verl.agent_loop import StepAgentLoop, state_key
from steppo_verl.endings import Ending
from steppo_verl.dev.tiny_model import build_tiny_tokenizer
from steppo_verl.protocol import locate_steps, validate_step_ids

PROMPT = [{"role": "system", "content": "Answer with search."}, {"role": "user", "content": "Question: capital?"}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def trainer_config(response_length=400, max_assistant_turns=5):
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(
            "ppo_trainer",
            overrides=[
                f"actor_rollout_ref.rollout.response_length={response_length}",
                f"actor_rollout_ref.rollout.multi_turn.max_assistant_turns={max_assistant_turns}",
                "actor_rollout_ref.rollout.multi_turn.format=hermes",
                "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=200",
            ],
        )


class ScriptedServer:
    """Stands in for verl's LLM server client: returns scripted turns, records what it was sent."""

    def __init__(self, tokenizer, turns, delay_s=0.0):
        self.tokenizer, self.turns, self.delay_s = tokenizer, list(turns), delay_s
        self.prompts: list[list[int]] = []
        self.generated: list[list[int]] = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        await asyncio.sleep(self.delay_s)
        self.prompts.append(list(prompt_ids))
        text = self.turns.pop(0)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not text.endswith("..."):  # "..." marks a turn cut off by the token budget
            ids.append(self.tokenizer.eos_token_id)
        self.generated.append(ids)
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")


def _schema(name):
    return OpenAIFunctionToolSchema.model_validate(
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"{name} tool",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": []},
            },
        }
    )


class EchoSearch(BaseTool):
    """Deterministic stand-in for retrieval with a per-call tool reward."""

    def __init__(self, reward=0.5, delay_s=0.0, fail=False):
        super().__init__({}, _schema("search"))
        self.reward, self.delay_s, self.fail = reward, delay_s, fail

    async def execute(self, instance_id, parameters, **kwargs):
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("retriever is down")
        query = parameters.get("query") or parameters.get("query_list")
        return ToolResponse(text=f"Doc 1 (Title: T) result for {query}"), self.reward, {}


def make_loop(tokenizer, server, tools, response_length=400, max_assistant_turns=5, loop_class=None, **kwargs):
    """A step agent loop (``loop_class``, default :class:`StepAgentLoop`) as verl's worker builds it."""
    config = trainer_config(response_length, max_assistant_turns)
    return (loop_class or StepAgentLoop)(
        trainer_config=DictConfigWrap(config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        hf_model_type="qwen2",
        tools=ToolListWrap(tools),
        **kwargs,
    )


def call(query, name="search"):
    return f'<tool_call>{{"name": "{name}", "arguments": {{"query": "{query}"}}}}</tool_call>'


def run(tokenizer, server, tools, extra_info=None, **kwargs):
    """Build the loop inside the event loop (verl binds it to the running loop) and run one episode."""

    async def episode():
        loop = make_loop(tokenizer, server, tools, **kwargs)
        return await loop.run({"temperature": 1.0}, raw_prompt=PROMPT, extra_info=extra_info or {})

    return asyncio.run(episode())


def expected_layout(server, output):
    """step_ids from what the server generated and what came back as observations in between."""
    ids = []
    for k, generated in enumerate(server.generated):
        ids += [k] * len(generated)
        if k + 1 < len(server.prompts):  # observation tokens = growth of the prompt beyond the step
            growth = len(server.prompts[k + 1]) - len(server.prompts[k]) - len(generated)
            ids += [-1] * growth
    ids += [-1] * (len(output.response_ids) - len(ids))
    return ids[: len(output.response_ids)]


def observations(tokenizer, output):
    mask = torch.tensor(output.response_mask)
    return tokenizer.decode([t for t, m in zip(output.response_ids, mask.tolist()) if m == 0])


def assert_consistent(output):
    step_ids = torch.tensor([output.step_ids])
    validate_step_ids(step_ids, torch.tensor([output.response_mask]))
    assert len(output.step_ids) == len(output.response_ids) == len(output.env_rewards) == len(output.step_keys)


def test_several_tool_steps_then_an_answer(tokenizer):
    server = ScriptedServer(tokenizer, ["Let me search." + call("capital"), call("France"), "<answer>Paris</answer>"])
    output = run(tokenizer, server, [EchoSearch(reward=0.5)])
    assert_consistent(output)
    assert output.step_ids == expected_layout(server, output)
    assert max(output.step_ids) == 2 and output.extra_fields["num_steps"] == 3
    assert not output.truncated and output.bootstrap_index == -1 and output.extra_fields["ending"] == "answer"
    # Token-in/token-out: every request extends the previous one by exactly the generated tokens.
    for k in range(1, len(server.prompts)):
        previous = server.prompts[k - 1] + server.generated[k - 1]
        assert server.prompts[k][: len(previous)] == previous
    # Tool rewards sit on the last token of the step whose call earned them.
    steps = locate_steps(torch.tensor([output.response_mask]), torch.tensor([output.step_ids]))
    last = (steps.next_starts()[0] - 1).tolist()
    rewards = torch.tensor(output.env_rewards)
    assert rewards.sum().item() == pytest.approx(1.0)
    assert rewards[last[0]] == 0, "the token before step 1 is an observation token"
    assert rewards[steps.starts[0, 0] + len(server.generated[0]) - 1] == 0.5
    # Step keys: step 0 from the prompt, later steps from their observation, constant over a step.
    keys = torch.tensor(output.step_keys)
    assert keys[steps.starts[0, 0]].item() == state_key(server.prompts[0])
    assert len({keys[s].item() for s in steps.starts[0].tolist()}) == 3
    assert "result for capital" in observations(tokenizer, output)


class Corridor(BaseTool):
    """A tool that names its exact state: the observation also shows text the state does not depend on."""

    def __init__(self):
        super().__init__({}, _schema("search"))

    async def execute(self, instance_id, parameters, **kwargs):
        query = parameters.get("query")
        state = None if query == "unknown" else "hall"
        return ToolResponse(text=f"You are in the hall. Note: {query}."), 0.0, {"state": state}


def test_a_tool_named_state_keys_the_step_instead_of_the_observation_text(tokenizer):
    server = ScriptedServer(tokenizer, [call("one"), call("two"), call("unknown"), "<answer>x</answer>"])
    output = run(tokenizer, server, [Corridor()])
    steps = locate_steps(torch.tensor([output.response_mask]), torch.tensor([output.step_ids]))
    keys = [output.step_keys[s] for s in steps.starts[0].tolist()]
    assert keys[1] == keys[2] == state_key({"tool_states": ["hall"]}), "same state, different texts: one key"
    assert keys[3] != keys[1], "a call that names no state is keyed by its observation text"
    assert keys[0] == state_key(server.prompts[0])


def test_step_rewards_through_the_estimator(tokenizer):
    server = ScriptedServer(tokenizer, [call("a"), "<answer>x</answer>"])
    output = run(tokenizer, server, [EchoSearch(reward=0.25)])
    fields = output.as_dict()
    assert fields["step_ids"].dtype == torch.int64 and fields["env_rewards"].dtype == torch.float32
    rewards = (fields["env_rewards"] + torch.nn.functional.one_hot(
        torch.tensor(len(output.response_ids) - 1), len(output.response_ids)))[None]  # + outcome 1.0
    adv, ret = compute_steppo_advantage(
        rewards, torch.zeros_like(rewards), fields["response_mask"][None], fields["step_ids"][None], whiten=False
    )
    step_returns = ret[0][fields["step_ids"] >= 0].unique().tolist()
    assert sorted(step_returns) == pytest.approx([1.0, 1.25])  # step 0: 0.25 + 1.0, step 1: 1.0


def test_malformed_tool_call_gets_an_explanation_and_the_episode_goes_on(tokenizer):
    server = ScriptedServer(tokenizer, ["<tool_call>{not json}</tool_call>", "<answer>x</answer>"])
    output = run(tokenizer, server, [EchoSearch()])
    assert_consistent(output)
    assert output.step_ids == expected_layout(server, output)
    assert max(output.step_ids) == 1 and not output.truncated
    assert "could not be parsed" in observations(tokenizer, output)
    assert output.env_rewards == [0.0] * len(output.response_ids)


def test_unknown_tool_is_reported_to_the_model(tokenizer):
    server = ScriptedServer(tokenizer, [call("1+1", name="calculator"), "<answer>2</answer>"])
    output = run(tokenizer, server, [EchoSearch()])
    assert_consistent(output)
    assert output.step_ids == expected_layout(server, output)
    assert "Unknown function 'calculator'" in observations(tokenizer, output)
    assert output.extra_fields["ending"] == "answer"


class Calculator(EchoSearch):
    def __init__(self):
        BaseTool.__init__(self, {}, _schema("calculator"))
        self.reward, self.delay_s, self.fail = 0.0, 0.0, False


def test_a_samples_tool_selection_limits_the_prompt_and_the_calls_to_its_tools(tokenizer):
    # verl's extra_info["tool_selection"]: this sample may search, not calculate (verl drops unknown names).
    server = ScriptedServer(tokenizer, [call("1+1", name="calculator"), call("a"), "<answer>2</answer>"])
    output = run(tokenizer, server, [EchoSearch(), Calculator()], extra_info={"tool_selection": ["search", "nope"]})
    prompt = tokenizer.decode(server.prompts[0])
    assert "search tool" in prompt and "calculator" not in prompt
    assert "Unknown function 'calculator'" in observations(tokenizer, output)
    assert "result for a" in observations(tokenizer, output)


def test_without_a_tool_selection_every_tool_is_offered(tokenizer):
    server = ScriptedServer(tokenizer, [call("1+1", name="calculator"), "<answer>2</answer>"])
    output = run(tokenizer, server, [EchoSearch(), Calculator()])
    prompt = tokenizer.decode(server.prompts[0])
    assert "search tool" in prompt and "calculator tool" in prompt
    assert "result for 1+1" in observations(tokenizer, output)


def test_retriever_that_times_out_becomes_an_observation(tokenizer):
    server = ScriptedServer(tokenizer, [call("slow"), "<answer>x</answer>"])
    started = time.monotonic()
    output = run(tokenizer, server, [EchoSearch(delay_s=60.0)], tool_timeout_s=0.2)
    # The tool sleeps 60 s: ending well before that shows the call was cut, with room for a loaded machine
    # (building the loop alone took 6 s beside a training run).
    assert time.monotonic() - started < 30
    assert_consistent(output)
    assert output.step_ids == expected_layout(server, output)
    assert "timed out after 0.2 s" in observations(tokenizer, output)
    assert not output.truncated


def test_retriever_that_is_down_becomes_an_observation(tokenizer):
    server = ScriptedServer(tokenizer, [call("x"), "<answer>x</answer>"])
    output = run(tokenizer, server, [EchoSearch(fail=True)])
    assert_consistent(output)
    assert "retriever is down" in observations(tokenizer, output)


def test_turn_limit_that_a_task_bootstraps_leaves_a_bootstrap_position(tokenizer):
    server = ScriptedServer(tokenizer, [call("a"), call("b"), "<answer>never</answer>"])
    output = run(tokenizer, server, [EchoSearch(reward=0.5)], max_assistant_turns=2, bootstrap_endings=["turn_limit"])
    assert_consistent(output)
    assert len(server.generated) == 2
    assert output.truncated and output.extra_fields["ending"] == Ending.TURN_LIMIT.value
    assert max(output.step_ids) == 1
    # The last step's call was still answered, then one non-action token marks s_K for the critic.
    assert "result for b" in observations(tokenizer, output)
    assert output.bootstrap_index == len(output.response_ids) - 1
    assert output.response_mask[output.bootstrap_index] == 0 and output.step_ids[-1] == -1
    assert output.response_ids[output.bootstrap_index] == tokenizer.pad_token_id
    assert sum(output.env_rewards) == pytest.approx(1.0)


def test_turn_limit_ends_the_episode_without_bootstrap_by_default(tokenizer):
    server = ScriptedServer(tokenizer, [call("a"), call("b"), "<answer>never</answer>"])
    output = run(tokenizer, server, [EchoSearch(reward=0.5)], max_assistant_turns=2)
    assert_consistent(output)
    assert output.extra_fields["ending"] == Ending.TURN_LIMIT.value
    assert output.as_dict()["ending"].item() == Ending.TURN_LIMIT.code
    assert not output.truncated and output.bootstrap_index == -1
    assert "result for b" in observations(tokenizer, output), "the last call is still answered"
    assert output.response_ids[-1] != tokenizer.pad_token_id, "no bootstrap token"


def test_response_length_limit_cutting_a_step(tokenizer):
    long_turn = "word " * 200 + "..."
    server = ScriptedServer(tokenizer, [call("a"), long_turn])
    output = run(tokenizer, server, [EchoSearch()], response_length=120)
    assert_consistent(output)
    assert len(output.response_ids) == 120
    assert output.extra_fields["ending"] == Ending.LENGTH_LIMIT.value
    assert not output.truncated, "a length cut is terminal by default: the runaway earns what it got"
    assert output.bootstrap_index == -1
    assert output.step_ids == expected_layout(server, output)
    assert output.step_ids[-1] == 1, "the cut step runs to the end of the budget"


def test_wall_clock_timeout_truncates(tokenizer):
    server = ScriptedServer(tokenizer, [call("a"), call("b"), "<answer>x</answer>"], delay_s=0.3)
    output = run(tokenizer, server, [EchoSearch()], max_episode_seconds=0.2)
    assert_consistent(output)
    assert len(server.generated) == 1
    assert output.truncated and output.extra_fields["ending"] == Ending.TIMEOUT.value
    assert output.bootstrap_index == len(output.response_ids) - 1


def test_loop_is_registered_with_verl_and_configurable_by_yaml():
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from omegaconf import OmegaConf

    assert _agent_loop_registry["steppo_agent"]["_target_"] == "steppo_verl.agent_loop.StepAgentLoop"
    from importlib.resources import files

    entries = OmegaConf.load(files("steppo_verl") / "config" / "agent_loop.yaml")
    entry = next(e for e in entries if e.name == "steppo_agent")
    assert entry._target_ == "steppo_verl.agent_loop.StepAgentLoop"
    assert json.loads(json.dumps(OmegaConf.to_container(entry)))["tool_timeout_s"] > 0


def test_turn_limit_whose_last_observation_does_not_fit_is_a_length_cut(tokenizer):
    turns = [call("a"), call("b")]
    roomy = run(tokenizer, ScriptedServer(tokenizer, turns), [EchoSearch()], max_assistant_turns=2)
    last_action = max(t for t, k in enumerate(roomy.step_ids) if k == 1)
    tight = last_action + 3  # the last step fits, its observation does not
    output = run(tokenizer, ScriptedServer(tokenizer, turns), [EchoSearch()], max_assistant_turns=2,
                 response_length=tight, bootstrap_endings=["turn_limit", "length_limit"])
    assert_consistent(output)
    assert output.extra_fields["ending"] == Ending.LENGTH_LIMIT.value and output.truncated
    assert output.bootstrap_index == -1, "no V(s_K) position without the final observation"
    assert output.step_ids[: last_action + 1] == roomy.step_ids[: last_action + 1]


def test_forced_first_search_becomes_part_of_the_prompt(tokenizer):
    server = ScriptedServer(tokenizer, [call("b"), "<answer>x</answer>"])
    output = run(tokenizer, server, [EchoSearch(reward=0.5)], initial_search_tool="search",
                 extra_info={"question": "capital of Verin?"})
    assert_consistent(output)
    prompt = tokenizer.decode(output.prompt_ids)
    assert "result for ['capital of Verin?']" in prompt, "the question's search results are in s_0"
    assert output.step_ids == expected_layout(server, output)
    assert max(output.step_ids) == 1, "the forced search is not a model step"
    assert sum(output.env_rewards) == pytest.approx(0.5), "only the model's own call is rewarded"


class RecordingSearch(EchoSearch):
    """A search tool that records each call in the trajectory's extra_fields, as the search tool's index map does."""

    async def execute(self, instance_id, parameters, **kwargs):
        kwargs["agent_data"].extra_fields.setdefault("searched", []).append(parameters.get("query_list") or parameters)
        return await super().execute(instance_id, parameters, **kwargs)


class GlobalStepsServer(ScriptedServer):
    """Returns verl's rollout-server extra fields (the weights' global steps) with every turn."""

    async def generate(self, request_id, **kwargs) -> TokenOutput:
        output = await super().generate(request_id, **kwargs)
        output.extra_fields = {"min_global_steps": 3, "max_global_steps": 4}
        return output


def test_forced_first_search_keeps_the_servers_extra_fields_and_its_own(tokenizer):
    # verl's generating state copies the server's fields only into an empty extra_fields; a tool that writes
    # there before the first generation would otherwise leave verl's metrics without its global steps.
    server = GlobalStepsServer(tokenizer, [call("b"), "<answer>x</answer>"])
    output = run(tokenizer, server, [RecordingSearch()], initial_search_tool="search",
                 extra_info={"question": "capital of Verin?"})
    assert output.extra_fields["min_global_steps"] == 3 and output.extra_fields["max_global_steps"] == 4
    assert output.extra_fields["searched"] == [["capital of Verin?"], {"query": "b"}], "both searches, in order"


def test_length_limit_that_a_task_bootstraps_has_no_bootstrap_position(tokenizer):
    long_turn = "word " * 200 + "..."
    server = ScriptedServer(tokenizer, [call("a"), long_turn])
    output = run(tokenizer, server, [EchoSearch()], response_length=120, bootstrap_endings=["length_limit"])
    assert output.truncated and output.bootstrap_index == -1, "the state after a cut step is incomplete"


def test_agent_loop_rejects_an_ending_that_cannot_bootstrap(tokenizer):
    with pytest.raises(ValueError, match="'answer' ends the episode"):
        make_loop(tokenizer, ScriptedServer(tokenizer, []), [EchoSearch()], bootstrap_endings=["answer"])
    with pytest.raises(ValueError, match="unknown ending 'turnlimit'"):
        make_loop(tokenizer, ScriptedServer(tokenizer, []), [EchoSearch()], bootstrap_endings=["turnlimit"])

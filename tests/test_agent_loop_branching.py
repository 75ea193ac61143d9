"""ARPO's branching rollouts in ``steppo_agent``, run for real on CPU with a scripted server that reports
top-k log-probs as the ``hf`` server does (``extra_fields["top_logprobs"]``, one list of k per token)."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch
from test_agent_loop import PROMPT, EchoSearch, call, make_loop
from verl.workers.rollout.replica import TokenOutput

from steppo_verl.branch_loop import branch_seed
from steppo_verl.branching import PLAIN_ROLLOUT
from steppo_verl.protocol import validate_step_ids
from steppo_verl.dev.tiny_model import build_tiny_tokenizer

SEED = 42  # verl's default actor_rollout_ref.rollout.seed, which make_loop's config keeps
SAMPLE = {"global_steps": 3, "index": 7, "session_id": 0}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


class TurnServer:
    """Answers by the trajectory's turn (how many tool responses its prompt holds): a tool call at turns
    ``0 .. calls-1``, then an answer. Each reply names its call number, so a branch's own continuation
    differs from its parent's. Top-2 log-probs ``[log p, log(1 - p)]`` per token, ``p = probs[turn]``."""

    def __init__(self, tokenizer, probs, calls=2):
        self.tokenizer, self.probs, self.calls = tokenizer, probs, calls
        self.sampling_params: list[dict] = []
        self.count = 0

    def turn(self, prompt_text: str) -> int:
        return prompt_text.count("result for")

    def reply(self, turn: int) -> str:
        return call(f"q{turn}n{self.count}") if turn < self.calls else f"<answer>Paris {self.count}</answer>"

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        await asyncio.sleep(0)
        self.sampling_params.append(dict(sampling_params))
        turn = self.turn(self.tokenizer.decode(prompt_ids))
        self.count += 1
        ids = self.tokenizer.encode(self.reply(turn), add_special_tokens=False) + [self.tokenizer.eos_token_id]
        p = self.probs[turn]
        top = [[math.log(p), math.log(1 - p)]] * len(ids)
        return TokenOutput(
            token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed",
            extra_fields={"global_steps": 3, "top_token_ids": [[1, 2]] * len(ids), "top_logprobs": top},
        )


def run_branching(tokenizer, server, branching, tools=None, sampling_params=None, **kwargs):
    async def episode():
        loop = make_loop(tokenizer, server, tools or [EchoSearch()], branching=branching, **kwargs)
        params = {"temperature": 1.0, **(sampling_params or {})}
        return await loop.run(params, raw_prompt=PROMPT, extra_info={}, **SAMPLE)

    return asyncio.run(episode())


def hand_entropy(p, window, vocab_size):
    """ARPO's entropy of a segment whose every token has top-2 probabilities (p, 1 - p)."""
    return window * -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(vocab_size)


def lineage(outputs):
    return [(o.path_id, o.parent_id, o.branch_position) for o in outputs]


def test_entropy_rise_after_a_tool_response_branches_every_path_once(tokenizer):
    # p = 0 and a steep weight make the rule exact: branch iff the entropy rose since the path's first
    # segment (U - 100 * rise <= 0); turn 1 (after the first tool response) is the uncertain one.
    branching = dict(initial_rollouts=2, total_rollouts=5, beam=2, branch_probability=0.0,
                     entropy_weight=100.0, entropy_window=3, top_k=2)
    server = TurnServer(tokenizer, probs=[0.99, 0.6, 0.99])
    outputs = run_branching(tokenizer, server, branching)

    # Round 0: paths 0, 1 call a tool, no rise. Round 1: both rise and branch (paths 2, 3 copy them up to
    # their second tool response). Round 2: every path answers; one slot is left, so a whole rollout
    # (path 4) starts. Rounds 3-5: path 4 alone; no slot left for its branch.
    assert len(outputs) == 5
    parents = [(o.path_id, o.parent_id) for o in outputs]
    assert parents == [(0, -1), (1, -1), (2, 0), (3, 1), (4, -1)]
    for branch in outputs[2:4]:
        parent = outputs[branch.parent_id]
        second_observation_end = max(i for i, s in enumerate(parent.step_ids) if s == 1)
        observation = [i for i in range(second_observation_end + 1, len(parent.step_ids)) if parent.step_ids[i] == -1]
        assert branch.branch_position == observation[-1] + 1 == parent.step_ids.index(2)
    assert [o.branch_position for o in (outputs[0], outputs[1], outputs[4])] == [-1, -1, -1]
    assert all(params["top_logprobs"] == 2 for params in server.sampling_params)
    # The top-k lists stay out of the rows.
    assert all("top_logprobs" not in o.extra_fields and "top_token_ids" not in o.extra_fields for o in outputs)


def test_branch_rows_share_exactly_the_prefix_up_to_the_branch_point(tokenizer):
    branching = dict(initial_rollouts=2, total_rollouts=4, beam=2, branch_probability=0.0,
                     entropy_weight=100.0, entropy_window=3, top_k=2)
    outputs = run_branching(tokenizer, TurnServer(tokenizer, probs=[0.99, 0.6, 0.99]), branching)
    branches = [o for o in outputs if o.parent_id >= 0]
    assert len(branches) == 2
    for branch in branches:
        parent, at = outputs[branch.parent_id], branch.branch_position
        assert branch.prompt_ids == parent.prompt_ids
        assert branch.response_ids[:at] == parent.response_ids[:at]
        assert branch.response_mask[:at] == parent.response_mask[:at]
        assert branch.response_ids[at:] != parent.response_ids[at:]  # its own continuation
        # Copied steps keep their ids, keys and rewards; the branch's own step continues the numbering
        # and was taken from the same state as the parent's step there.
        assert branch.step_ids[:at] == parent.step_ids[:at]
        assert branch.step_keys[:at] == parent.step_keys[:at]
        assert branch.env_rewards[:at] == parent.env_rewards[:at]
        own = sorted({s for s in branch.step_ids[at:] if s >= 0})
        assert own == [2]
        assert branch.step_keys[branch.step_ids.index(2)] == parent.step_keys[parent.step_ids.index(2)]
        validate_step_ids(torch.tensor([branch.step_ids]), torch.tensor([branch.response_mask]))


def test_branching_decisions_follow_arpo_rule_with_the_samples_seed(tokenizer):
    config = dict(initial_rollouts=3, total_rollouts=5, beam=2, branch_probability=0.5,
                  entropy_weight=0.2, entropy_window=3, top_k=2)
    probs = [0.9, 0.55, 0.9]
    outputs = run_branching(tokenizer, TurnServer(tokenizer, probs=probs), config)

    # Hand computation: the entropies of turn 0 (H_init) and turn 1, the draws of the sample's seed.
    vocab = len(tokenizer)
    rise = hand_entropy(probs[1], 3, vocab) - hand_entropy(probs[0], 3, vocab)
    rng = random.Random(branch_seed(SEED, {**SAMPLE, "raw_prompt": PROMPT}))
    expected, slots = [], 2  # (parent path, the turn after whose tool response it branches)
    for path in range(3):  # round 0: every path called a tool, no rise; one draw each while slots last
        if slots - len(expected) > 0 and min(1.0, max(0.0, rng.random())) <= 0.5:
            expected.append((path, 0))
    for path in range(3 + len(expected)):  # round 1: the entropy rose by `rise` on every active path
        if slots - len(expected) <= 0:
            break
        if min(1.0, max(0.0, rng.random() - 0.2 * rise)) <= 0.5:
            expected.append((path, 1))

    branches = outputs[3 : 3 + len(expected)]
    assert [o.parent_id for o in branches] == [parent for parent, _ in expected]
    for branch, (parent, turn) in zip(branches, expected):
        assert branch.branch_position == outputs[parent].step_ids.index(turn + 1)
    # Round 2 ends every path: what is left of the budget starts as whole rollouts.
    assert len(outputs) == 5 and all(o.parent_id == -1 for o in outputs[3 + len(expected) : 4 + len(expected)])


def test_a_validation_sample_runs_one_plain_trajectory_with_branching_configured(tokenizer):
    # The branch worker marks validation samples; a branching budget there would replace val_kwargs.n.
    branching = dict(initial_rollouts=2, total_rollouts=5, beam=2, branch_probability=1.0, entropy_window=3, top_k=2)
    server = TurnServer(tokenizer, probs=[0.99, 0.6, 0.99])
    output = run_branching(tokenizer, server, branching, sampling_params={PLAIN_ROLLOUT: True})

    assert not isinstance(output, list)
    assert (output.path_id, output.parent_id, output.branch_position) == (0, -1, -1)
    validate_step_ids(torch.tensor([output.step_ids]), torch.tensor([output.response_mask]))
    assert max(output.step_ids) == 2  # three steps (ids 0-2): two tool calls and the answer
    assert server.count == 3
    # The mark stays out of what the server sees, and no top-k log-probs are asked for.
    assert all(PLAIN_ROLLOUT not in params and "top_logprobs" not in params for params in server.sampling_params)


def test_budget_is_filled_exactly_when_no_path_branches(tokenizer):
    branching = dict(initial_rollouts=2, total_rollouts=5, beam=3, branch_probability=0.0,
                     entropy_weight=100.0, entropy_window=3, top_k=2)
    outputs = run_branching(tokenizer, TurnServer(tokenizer, probs=[0.6, 0.9, 0.9]), branching)
    assert [o.path_id for o in outputs] == [0, 1, 2, 3, 4]
    assert all(o.parent_id == -1 and o.branch_position == -1 for o in outputs)


def test_same_seed_same_rows_and_another_sample_other_rows(tokenizer):
    branching = dict(initial_rollouts=4, total_rollouts=8, beam=2, entropy_window=3, top_k=2)

    def rows():
        outputs = run_branching(tokenizer, TurnServer(tokenizer, probs=[0.9, 0.6, 0.9]), branching)
        return [(o.path_id, o.parent_id, o.branch_position, o.response_ids, o.step_ids) for o in outputs]

    first, second = rows(), rows()
    assert first == second and len(first) == 8
    seeds = {branch_seed(SEED, {**SAMPLE, "raw_prompt": PROMPT, "index": i}) for i in range(3)}
    assert len(seeds) == 3


def test_rows_carry_the_branch_fields_as_tensors(tokenizer):
    branching = dict(initial_rollouts=1, total_rollouts=2, beam=2, branch_probability=1.0, entropy_window=3, top_k=2)
    outputs = run_branching(tokenizer, TurnServer(tokenizer, probs=[0.9, 0.6, 0.9]), branching)
    fields = [o.as_dict() for o in outputs]
    assert [int(f["parent_id"]) for f in fields] == [-1, 0]
    assert [int(f["path_id"]) for f in fields] == [0, 1]
    assert int(fields[1]["branch_position"]) == outputs[1].branch_position > 0
    assert fields[0]["branch_position"].dtype == torch.int64


def test_server_without_top_logprobs_is_refused_with_what_to_do(tokenizer):
    class PlainServer(TurnServer):
        async def generate(self, request_id, **kwargs):
            output = await super().generate(request_id, **kwargs)
            return output.model_copy(update={"extra_fields": {}})

    branching = dict(initial_rollouts=2, total_rollouts=3, top_k=2)
    with pytest.raises(RuntimeError, match="top-k log-probs.*PlainServer"):
        run_branching(tokenizer, PlainServer(tokenizer, probs=[0.9, 0.6, 0.9]), branching)


def test_rollout_n_above_one_with_branching_is_refused(tokenizer):
    from hydra import compose, initialize_config_dir  # noqa: F401  (make_loop composes verl's config)
    from test_agent_loop import trainer_config

    config = trainer_config()
    config.actor_rollout_ref.rollout.n = 4
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from steppo_verl.agent_loop import StepAgentLoop

    with pytest.raises(ValueError, match=r"rollout.n=1 \(it is 4\)"):
        StepAgentLoop(
            trainer_config=DictConfigWrap(config), server_manager=None, tokenizer=tokenizer, processor=None,
            dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data), hf_model_type="qwen2",
            tools=ToolListWrap([]), branching={"total_rollouts": 4, "initial_rollouts": 2},
        )


def test_unknown_branching_option_is_named(tokenizer):
    with pytest.raises(ValueError, match=r"unknown options \['beams'\]"):
        run_branching(tokenizer, TurnServer(tokenizer, probs=[0.9]), {"beams": 2})


class ForkingTool(EchoSearch):
    """A tool that keeps per-trajectory state keyed by verl's AgentData, and copies it on a branch."""

    def __init__(self):
        super().__init__()
        self.calls: dict[int, int] = {}

    async def execute(self, instance_id, parameters, agent_data=None, **kwargs):
        self.calls[id(agent_data)] = self.calls.get(id(agent_data), 0) + 1
        response, reward, metrics = await super().execute(instance_id, parameters)
        text = f"{response.text} call {self.calls[id(agent_data)]}"
        return response.model_copy(update={"text": text}), reward, metrics

    def on_branch(self, parent, child):
        self.calls[id(child)] = self.calls[id(parent)]


def test_tool_state_keyed_by_agent_data_follows_the_branch(tokenizer):
    branching = dict(initial_rollouts=1, total_rollouts=2, beam=2, branch_probability=1.0, entropy_window=3, top_k=2)
    tool = ForkingTool()
    server = TurnServer(tokenizer, probs=[0.9, 0.6, 0.9, 0.9], calls=3)
    outputs = run_branching(tokenizer, server, branching, tools=[tool])
    branch = outputs[1]
    # Branched after the first tool response: its own next call is the trajectory's second.
    assert branch.branch_position > 0
    own_text = tokenizer.decode(branch.response_ids[branch.branch_position:])
    assert "call 2" in own_text and "call 1" not in own_text

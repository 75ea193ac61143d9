"""ARPO's branching rollouts in the environment loop (``steppo_env_agent``): the toy corridor, a scripted server
that reports top-k log-probs as the ``hf`` server does, and branches that get their environment's state by
replaying their parent's actions on a new instance."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch
from test_agent_loop import tokenizer  # noqa: F401  (the tiny tokenizer fixture)
from test_agent_loop_branching import TurnServer
from test_env_loop import CORRIDOR, PROMPT, WIN, RecordingCorridor, act, corridor_keys, make_env_loop

from steppo_verl.branching import PLAIN_ROLLOUT
from steppo_verl.endings import Ending
from steppo_verl.env_loop import EnvironmentFailure
from steppo_verl.protocol import validate_step_ids

SAMPLE = {"global_steps": 3, "index": 7, "session_id": 0}
# p = 0 and a steep weight make ARPO's rule exact: branch iff the entropy rose since the path's first segment.
ON_RISE = dict(branch_probability=0.0, entropy_weight=100.0, entropy_window=3, top_k=2)


class WalkServer(TurnServer):
    """Walks the corridor's winning path: turn t (the number of its thoughts in the conversation) acts ``WIN[t]``,
    its thought numbered by the call, so a branch's own turns differ from its parent's. Top-2 log-probs
    ``[log p, log(1 - p)]`` per token with ``p = probs[t]``."""

    def turn(self, prompt_text: str) -> int:
        return prompt_text.count("Thought ")

    def reply(self, turn: int) -> str:
        return f"Thought {self.count}. <action>{WIN[turn]}</action>"


class DriftingCorridor(RecordingCorridor):
    """A corridor whose every new instance starts one cell further right: replaying actions cannot reach a
    parent's state."""

    def reset(self, task):
        return super().reset({**task, "start": task["start"] + len(RecordingCorridor.instances) - 1})


class DyingCorridor(RecordingCorridor):
    """The first instance's game process dies on its third action; the others are slow, and note whether they
    were stepped after being closed."""

    def step(self, action):
        if len(self.actions) == 2 and self is RecordingCorridor.instances[0]:
            raise ConnectionError("game process died")
        time.sleep(0.05)
        self.stepped_after_close = self.closed
        return super().step(action)


def run_branching(tokenizer, server, branching, env_class=RecordingCorridor, sampling_params=None):
    RecordingCorridor.instances.clear()

    async def episode():
        loop = make_env_loop(tokenizer, server, env={"class": f"{__name__}.{env_class.__name__}"},
                             branching=branching)
        params = {"temperature": 1.0, **(sampling_params or {})}
        return await loop.run(params, raw_prompt=PROMPT, extra_info={"env_task": CORRIDOR}, **SAMPLE)

    return asyncio.run(episode())


def test_a_path_whose_entropy_rose_branches_and_its_branch_continues_from_the_same_state(tokenizer):
    # Turn 1 (after the first observation) is the uncertain one: both initial paths branch there.
    branching = dict(initial_rollouts=2, total_rollouts=4, beam=2, **ON_RISE)
    outputs = run_branching(tokenizer, WalkServer(tokenizer, probs=[0.99, 0.6, 0.99, 0.99]), branching)

    assert [(o.path_id, o.parent_id) for o in outputs] == [(0, -1), (1, -1), (2, 0), (3, 1)]
    for output in outputs:  # every path walked the corridor to the end and won
        assert output.as_dict()["ending"].item() == Ending.ENV_DONE.code
        assert output.extra_fields["env_info"]["won"]
        assert sum(output.env_rewards) == 1.0  # the door's reward, once
        validate_step_ids(torch.tensor([output.step_ids]), torch.tensor([output.response_mask]))
        starts = [output.step_ids.index(k) for k in range(len(WIN))]
        assert [output.step_keys[i] for i in starts] == corridor_keys(WIN)
    for branch in outputs[2:]:
        parent, at = outputs[branch.parent_id], branch.branch_position
        # It left its parent where the parent's step 2 starts, after step 1's observation; up to there, it is
        # the parent's row token for token.
        assert at == parent.step_ids.index(2)
        assert branch.response_ids[:at] == parent.response_ids[:at]
        assert branch.step_ids[:at] == parent.step_ids[:at] and branch.step_keys[:at] == parent.step_keys[:at]
        assert branch.response_ids[at:] != parent.response_ids[at:]  # its own turns
    # Each branch's environment replayed its parent's two actions, then took its own two; every one was closed.
    envs = RecordingCorridor.instances
    assert len(envs) == 4 and all(env.closed for env in envs)
    assert sorted(len(env.actions) for env in envs) == [4, 4, 4, 4]
    assert all(env.actions == WIN for env in envs)


def test_branch_replays_only_the_actions_the_environment_was_sent(tokenizer):
    class InvalidFirst(WalkServer):
        """The first call has no action tag: answered "invalid action", the corridor not stepped."""

        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            output = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
            if self.count == 1:
                ids = self.tokenizer.encode("I am not sure.", add_special_tokens=False) + [self.tokenizer.eos_token_id]
                output = output.model_copy(update={"token_ids": ids, "log_probs": [-0.5] * len(ids),
                                                   "extra_fields": {**output.extra_fields,
                                                                    "top_logprobs": [[math.log(0.99), math.log(0.01)]]
                                                                    * len(ids)}})
            return output

    # Steps: 0 invalid (low entropy, H_init), 1 "right" (no rise), 2 "take key" (rise: branch), 3-4 the rest.
    branching = dict(initial_rollouts=1, total_rollouts=2, beam=2, **ON_RISE)
    outputs = run_branching(tokenizer, InvalidFirst(tokenizer, probs=[0.99, 0.6, 0.6, 0.6]), branching)
    parent, branch = outputs
    assert branch.parent_id == 0 and branch.branch_position == parent.step_ids.index(3)
    first, second = RecordingCorridor.instances
    # The invalid turn was never sent to the corridor, so the branch's replay did not send it either: both
    # environments got exactly the four actions of the walk.
    assert first.actions == WIN and second.actions == WIN
    at = branch.branch_position
    assert branch.step_ids[at] == 3 and branch.step_keys[at] == parent.step_keys[at]
    assert branch.step_keys[at] == corridor_keys(WIN)[2]  # holding the key in cell 2


def test_environment_that_does_not_replay_to_the_parents_state_is_refused_and_every_env_closed(tokenizer):
    branching = dict(initial_rollouts=1, total_rollouts=2, beam=2, **ON_RISE)
    with pytest.raises(EnvironmentFailure, match=r"DriftingCorridor replayed the 2 actions.*determined by its task"):
        run_branching(tokenizer, WalkServer(tokenizer, probs=[0.99, 0.6, 0.99, 0.99]), branching,
                      env_class=DriftingCorridor)
    assert len(RecordingCorridor.instances) == 2 and all(env.closed for env in RecordingCorridor.instances)


def test_environment_failing_in_one_path_closes_every_paths_environment(tokenizer):
    branching = dict(initial_rollouts=2, total_rollouts=4, beam=2, **ON_RISE)
    with pytest.raises(EnvironmentFailure, match=r"DyingCorridor.step\('right'\) raised ConnectionError"):
        run_branching(tokenizer, WalkServer(tokenizer, probs=[0.99, 0.6, 0.99, 0.99]), branching,
                      env_class=DyingCorridor)
    envs = RecordingCorridor.instances
    assert len(envs) == 4 and all(env.closed for env in envs)
    # The paths still stepping when one failed finished their step before their environments were closed.
    assert not any(env.stepped_after_close for env in envs[1:])


def test_a_validation_sample_runs_one_plain_trajectory(tokenizer):
    branching = dict(initial_rollouts=2, total_rollouts=4, beam=2, **ON_RISE)
    server = WalkServer(tokenizer, probs=[0.99, 0.6, 0.99, 0.99])
    output = run_branching(tokenizer, server, branching, sampling_params={PLAIN_ROLLOUT: True})
    assert not isinstance(output, list)
    assert (output.path_id, output.parent_id, output.branch_position) == (0, -1, -1)
    assert server.count == len(WIN) and len(RecordingCorridor.instances) == 1
    assert RecordingCorridor.instances[0].closed
    assert all(PLAIN_ROLLOUT not in params and "top_logprobs" not in params for params in server.sampling_params)

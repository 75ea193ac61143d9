"""The ``arpo`` estimator on branched rows from ``steppo_agent``: against plain loops, through verl's registry,
through the StepPO trainer and TransferQueue, and its start-up checks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from test_agent_loop import PROMPT, EchoSearch, make_loop
from test_agent_loop_branching import TurnServer
from test_trainer import transfer_queue, trainer_with, verl_config  # noqa: F401  (transfer_queue is a fixture)
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.core_algos import get_adv_estimator_fn
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from steppo_verl.branch_worker import MANAGER_CLASS
from steppo_verl import branching
from steppo_verl.advantage import compute_steppo_advantage
from steppo_verl.branching import arpo_advantages, arpo_estimator, arpo_loss_mask, branch_state_keys
from steppo_verl.metrics import observed_returns
from steppo_verl.protocol import locate_steps
from steppo_verl.dev.tiny_model import build_tiny_tokenizer
from steppo_verl.trainer import validate_steppo_config

BRANCHING = dict(initial_rollouts=2, total_rollouts=5, beam=2, entropy_window=3, top_k=2)


@pytest.fixture(scope="module")
def rows():
    """Two prompts' branched rollouts (5 rows each), with an outcome score per row."""
    tokenizer = build_tiny_tokenizer()

    async def sample(index):
        server = TurnServer(tokenizer, probs=[0.9, 0.6, 0.9])
        loop = make_loop(tokenizer, server, [EchoSearch(reward=0.0)], branching=BRANCHING)
        return await loop.run({}, raw_prompt=PROMPT, extra_info={}, index=index, global_steps=1, session_id=0)

    outputs = [o for index in (0, 1) for o in asyncio.run(sample(index))]
    assert any(o.parent_id >= 0 for o in outputs), "the fixture must branch"
    scores = torch.Generator().manual_seed(1)
    for output in outputs:
        output.reward_score = float(torch.randint(0, 3, (1,), generator=scores))
    return outputs, ["p0"] * 5 + ["p1"] * 5


def padded(outputs, name, pad=0):
    return torch.nested.as_nested_tensor(
        [torch.tensor(getattr(o, name)) for o in outputs], layout=torch.jagged
    ).to_padded_tensor(pad)


def batch_of(outputs):
    mask = padded(outputs, "response_mask")
    rewards = torch.zeros(mask.shape)
    lengths = mask.new_tensor([len(o.response_mask) for o in outputs])
    rewards[torch.arange(len(outputs)), lengths - 1] = torch.tensor([o.reward_score for o in outputs])
    branches = {
        "path_id": torch.tensor([o.path_id for o in outputs]),
        "parent_id": torch.tensor([o.parent_id for o in outputs]),
        "branch_position": torch.tensor([o.branch_position for o in outputs]),
        "responses": padded(outputs, "response_ids"),
    }
    return rewards, mask, branches


def grpo_by_hand(scores, uids):
    """Plain loop: each row's (score - mean) / (std + eps) over its prompt's rows."""
    out = []
    for score, uid in zip(scores, uids):
        group = torch.tensor([s for s, u in zip(scores, uids) if u == uid], dtype=torch.float64)
        out.append((score - group.mean()) / (group.std() + 1e-6) if len(group) > 1 else score)
    return torch.tensor(out, dtype=torch.float32)


def owner_by_hand(outputs, uids, row, position):
    """The row that generated ``position`` of ``row``'s response: follow parents while it lies before the branch."""
    while outputs[row].parent_id >= 0 and position < outputs[row].branch_position:
        row = next(r for r, o in enumerate(outputs) if uids[r] == uids[row] and o.path_id == outputs[row].parent_id)
    return row


def test_arpo_soft_is_grpo_over_every_rollout_of_a_prompt(rows):
    outputs, uids = rows
    rewards, mask, branches = batch_of(outputs)
    estimator = get_adv_estimator_fn("arpo")
    assert estimator is arpo_estimator
    advantages, returns = estimator(rewards, mask, config={"arpo": {"attribution": "soft"}}, index=np.array(uids),
                                    branches=branches)
    expected = grpo_by_hand([o.reward_score for o in outputs], uids)[:, None] * mask
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, advantages)


def test_arpo_hard_gives_a_shared_token_its_holders_mean_once(rows):
    outputs, uids = rows
    rewards, mask, branches = batch_of(outputs)
    config = {"arpo": {"attribution": "hard"}}
    advantages, _ = arpo_estimator(rewards, mask, config=config, index=np.array(uids), branches=branches)
    weights = arpo_loss_mask(rewards, mask, config=config, index=np.array(uids), branches=branches)
    scores = grpo_by_hand([o.reward_score for o in outputs], uids)
    for b, output in enumerate(outputs):
        for t in range(len(output.response_mask)):
            owner = owner_by_hand(outputs, uids, b, t)
            holders = [r for r in range(len(outputs)) if t < len(outputs[r].response_mask)
                       and owner_by_hand(outputs, uids, r, t) == owner]
            expected = float(scores[holders].mean()) * output.response_mask[t]
            assert float(advantages[b, t]) == pytest.approx(expected, abs=1e-5), (b, t)
            assert int(weights[b, t]) == int(owner == b) * output.response_mask[t]
    # Each branch's copied prefix is trained only in its parent.
    for b, output in enumerate(outputs):
        if output.parent_id >= 0:
            assert int(weights[b, : output.branch_position].sum()) == 0
            own = output.response_mask[output.branch_position :]
            assert int(weights[b, output.branch_position :].sum()) == sum(own)


def test_hard_loss_mask_is_read_from_lineage_without_recomputing_the_advantages(rows, monkeypatch):
    outputs, uids = rows
    rewards, mask, branches = batch_of(outputs)
    config = {"arpo": {"attribution": "hard"}}
    _, estimator_weights = arpo_advantages(rewards, mask, config, np.array(uids), branches)

    def recomputed(*args, **kwargs):
        raise AssertionError("the loss mask recomputed the advantages the estimator already has")

    monkeypatch.setattr(branching, "grpo_scores", recomputed)
    monkeypatch.setattr(branching, "_shared_mean", recomputed)
    weights = arpo_loss_mask(rewards, mask, config=config, index=np.array(uids), branches=branches)
    assert weights.dtype == mask.dtype
    assert torch.equal(weights, estimator_weights.to(mask.dtype))
    for b, output in enumerate(outputs):
        for t, trained in enumerate(output.response_mask):
            assert int(weights[b, t]) == int(owner_by_hand(outputs, uids, b, t) == b) * trained, (b, t)


def test_verls_filler_rows_copying_a_branch_do_not_break_the_tree(rows):
    outputs, uids = rows
    rewards, mask, branches = batch_of(outputs)
    config = {"arpo": {"attribution": "hard"}}
    clean, _ = arpo_estimator(rewards, mask, config=config, index=np.array(uids), branches=branches)
    # verl pads a batch with copies of a real row (here a branch) under one fresh uid, response masked.
    filler = {name: torch.cat([value, value[[2, 2]]]) for name, value in branches.items()}
    filler["is_padding"] = torch.tensor([False] * len(outputs) + [True, True])
    padded_mask = torch.cat([mask, torch.zeros_like(mask[:2])])
    padded_rewards = torch.cat([rewards, torch.zeros_like(rewards[:2])])
    index = np.array(uids + ["pad1", "pad1"])
    advantages, _ = arpo_estimator(padded_rewards, padded_mask, config=config, index=index, branches=filler)
    torch.testing.assert_close(advantages[: len(outputs)], clean)
    assert advantages[len(outputs):].abs().sum() == 0


def test_arpo_without_branch_fields_says_where_they_come_from():
    with pytest.raises(ValueError, match="branch fields.*StepPO trainer"):
        arpo_estimator(torch.zeros(2, 3), torch.ones(2, 3), config={}, index=np.array(["a", "a"]))


def test_unknown_arpo_attribution_is_refused(rows):
    outputs, uids = rows
    rewards, mask, branches = batch_of(outputs)
    with pytest.raises(ValueError, match=r"attribution must be one of \('soft', 'hard'\), got 'mean'"):
        arpo_estimator(rewards, mask, config={"arpo": {"attribution": "mean"}}, index=np.array(uids), branches=branches)


def test_trainer_hard_arpo_stores_advantages_and_the_actors_mask(transfer_queue, rows):  # noqa: F811
    outputs, uids = rows
    keys, samples = [], []
    for output, uid in zip(outputs, uids):
        sample = output.as_dict()
        sample["uid"] = uid
        sample["old_log_probs"] = sample["rollout_log_probs"].clone()
        keys.append(f"{uid}_{output.path_id}_0")
        samples.append(sample)
    transfer_queue.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(samples))
    batch = KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id="train")
    config = verl_config("algorithm.adv_estimator=arpo", "+algorithm.arpo.attribution=hard")
    trainer_with(config, tokenizer=build_tiny_tokenizer())._compute_advantage(batch, {})
    stored = transfer_queue.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages", "response_mask"])

    rewards, mask, branches = batch_of(outputs)
    expected, _ = arpo_estimator(rewards, mask, config={"arpo": {"attribution": "hard"}}, index=np.array(uids),
                                 branches=branches)
    torch.testing.assert_close(stored["advantages"].to_padded_tensor(0.0), expected)
    stored_mask = stored["response_mask"].to_padded_tensor(0)
    for b, output in enumerate(outputs):
        start = output.branch_position if output.parent_id >= 0 else 0
        assert int(stored_mask[b, :start].sum()) == 0
        assert stored_mask[b, start : len(output.response_mask)].tolist() == output.response_mask[start:]


def same_state_by_hand(outputs, uids, b, c, start):
    """Whether rows b and c left the same state at response token ``start``: one prompt, and the token before
    it generated by the same row (nothing before it: the prompt)."""
    if uids[b] != uids[c]:
        return False
    return start == 0 or owner_by_hand(outputs, uids, b, start - 1) == owner_by_hand(outputs, uids, c, start - 1)


def steps_of(outputs):
    return locate_steps(padded(outputs, "response_mask"), padded(outputs, "step_ids", -1))


def test_branch_state_keys_join_exactly_the_steps_whose_rows_share_the_prefix(rows):
    outputs, uids = rows
    _, mask, branches = batch_of(outputs)
    steps = steps_of(outputs)
    keys = branch_state_keys(np.array(uids), branches, mask, steps)

    # By hand: same start token, and the same state there (same_state_by_hand).
    starts = [(b, k, int(steps.starts[b, k])) for b in range(len(outputs)) for k in range(int(steps.num_steps[b]))]
    shared_branch_points = 0
    for b, k, start in starts:
        for c, j, other in starts:
            same = start == other and same_state_by_hand(outputs, uids, b, c, start)
            assert bool(keys[b, k] == keys[c, j]) == same, (b, k, c, j)
            if same:  # a shared key is a shared state: the same tokens before the step
                assert outputs[b].response_ids[:start] == outputs[c].response_ids[:start]
            shared_branch_points += same and start > 0 and b != c
    assert shared_branch_points > 0, "the fixture's branches share a branch point with their parents"


def test_steppo_on_branch_returns_reads_the_siblings_mean_return(transfer_queue, rows):  # noqa: F811
    outputs, uids = rows
    gen = torch.Generator().manual_seed(0)
    keys, samples = [], []
    for output, uid in zip(outputs, uids):
        sample = output.as_dict()
        sample["uid"] = uid
        sample["values"] = torch.randn(len(output.response_ids), generator=gen)  # the critic's output
        sample["old_log_probs"] = sample["rollout_log_probs"].clone()
        keys.append(f"{uid}_{output.path_id}_0")
        samples.append(sample)
    transfer_queue.kv_batch_put(keys=keys, partition_id="branch_values", fields=list_of_dict_to_tensordict(samples))
    batch = KVBatchMeta(keys=keys, tags=[{}] * len(keys), partition_id="branch_values")
    config = verl_config("algorithm.adv_estimator=steppo", "critic.enable=true", "algorithm.lam=1.0",
                         "algorithm.gamma=1.0", "+algorithm.steppo.values=branch_returns")
    trainer_with(config, tokenizer=build_tiny_tokenizer())._compute_advantage(batch, {})
    stored = transfer_queue.kv_batch_get(keys=keys, partition_id="branch_values", select_fields=["advantages"])

    # By hand: at each step start whose exact state another row of the prompt also left (same start token, same
    # generating row before it), the mean of the other rows' returns from there; the critic's value elsewhere.
    rewards, mask, _ = batch_of(outputs)
    step_ids = padded(outputs, "step_ids", -1)
    values = torch.nested.as_nested_tensor([s["values"] for s in samples], layout=torch.jagged).to_padded_tensor(0.0)
    steps = steps_of(outputs)
    outcomes = observed_returns(rewards, steps, 1.0, None)
    expected_values, replaced = values.clone(), 0
    for b in range(len(outputs)):
        for k in range(int(steps.num_steps[b])):
            start = int(steps.starts[b, k])
            others = [
                float(outcomes[c, j]) for c in range(len(outputs)) for j in range(int(steps.num_steps[c]))
                if c != b and int(steps.starts[c, j]) == start and same_state_by_hand(outputs, uids, b, c, start)
            ]
            if others:
                expected_values[b, start] = sum(others) / len(others)
                replaced += 1
    assert replaced > len(outputs), "every first step, and the branch points"
    expected, _ = compute_steppo_advantage(rewards, expected_values, mask, step_ids, gamma=1.0, lam=1.0)
    torch.testing.assert_close(stored["advantages"].to_padded_tensor(0.0), expected)


@pytest.mark.parametrize("reader, message", [
    (("algorithm.adv_estimator=steppo", "critic.enable=true", "+algorithm.steppo.values=branch_returns"),
     "branch_returns values the states that branched rollouts share"),
    (("algorithm.adv_estimator=arpo",), "adv_estimator=arpo attributes advantages over branched rollouts"),
])
def test_an_estimator_reading_branches_without_branching_rollouts_fails_at_start_up(reader, message):
    # Each option is named in its own words: an arpo run is not told about steppo.values.
    config = verl_config(*reader, "data.train_files=[]",
                         "actor_rollout_ref.rollout.agent.default_agent_loop=steppo_agent")
    with pytest.raises(ValueError, match=f"{message}.*no training agent loop.*branching block") as error:
        validate_steppo_config(config)
    assert ("branch_returns" in str(error.value)) == ("steppo.values=branch_returns" in reader[-1])


def branching_config(tmp_path, *overrides):
    loops = tmp_path / "loops.yaml"
    loops.write_text("- name: steppo_agent\n  _target_: steppo_verl.agent_loop.StepAgentLoop\n"
                     "  branching: {initial_rollouts: 2, total_rollouts: 4}\n")
    return verl_config("algorithm.adv_estimator=arpo", "data.train_files=[]", "actor_rollout_ref.rollout.name=hf",
                       "actor_rollout_ref.rollout.agent.default_agent_loop=steppo_agent",
                       f"actor_rollout_ref.rollout.agent.agent_loop_config_path={loops}", *overrides)


def test_branching_with_rollout_n_above_one_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError, match=r"rollout.n=1 \(it is 4\)"):
        validate_steppo_config(branching_config(tmp_path, "actor_rollout_ref.rollout.n=4"))


def test_branching_on_a_server_without_top_k_log_probs_fails_at_start_up(tmp_path):
    # verl 0.9.1's vLLM server returns the sampled token's log-prob only: the entropy rule would have nothing.
    manager = f"+actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}"
    with pytest.raises(ValueError, match=r"the 'vllm' server does not return them.*\(hf\)"):
        validate_steppo_config(branching_config(tmp_path, "actor_rollout_ref.rollout.n=1", manager,
                                                "actor_rollout_ref.rollout.name=vllm"))


def test_branching_with_verls_agent_loop_manager_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError, match=f"last one's reward.*agent_loop_manager_class={MANAGER_CLASS}"):
        validate_steppo_config(branching_config(tmp_path, "actor_rollout_ref.rollout.n=1"))
    manager = f"+actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}"
    validate_steppo_config(branching_config(tmp_path, "actor_rollout_ref.rollout.n=1", manager))


class RecordingWorkers:
    """The actor and critic worker groups of verl's trainer, recording the batch each update receives."""

    def __init__(self):
        self.received = {}

    def _update(self, role):
        def update(batch):
            self.received[role] = dict(batch.extra_info)
            return _Output({"metrics": {"mfu": 0.0}})
        return update

    def __getattr__(self, name):
        return self._update(name)


class _Output(dict):
    def get(self, *args):  # the critic's worker group returns a future
        return self if not args else dict.get(self, *args)


class _Batch:
    extra_info: dict

    def __init__(self):
        self.extra_info = {}


@pytest.mark.parametrize("branching", [True, False])
def test_a_ppo_mini_batch_counts_the_rows_a_branching_sample_returns(tmp_path, branching):
    # 4 prompts per mini-batch; a branching sample returns total_rollouts=4 rows with rollout.n=1, so a
    # mini-batch holds 16 rows (not 4, which would make 4x the configured number of updates per step).
    manager = f"+actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}"
    common = ("actor_rollout_ref.actor.ppo_mini_batch_size=4", "critic.ppo_mini_batch_size=4", "critic.enable=true")
    if branching:
        config = branching_config(tmp_path, "actor_rollout_ref.rollout.n=1", manager, *common)
    else:
        config = verl_config("algorithm.adv_estimator=grpo", "data.train_files=[]", "actor_rollout_ref.rollout.n=2",
                             *common)
    trainer = trainer_with(config)
    trainer._rows_per_sample = validate_steppo_config(config)
    trainer.use_critic, trainer.distillation_config = True, None
    trainer.actor_rollout_wg = trainer.critic_wg = workers = RecordingWorkers()
    trainer._update_actor(_Batch(), {})
    trainer._update_critic(_Batch(), {})
    rows = 16 if branching else 8
    assert workers.received["update_actor"]["mini_batch_size"] == rows
    assert workers.received["train_mini_batch"]["mini_batch_size"] == rows
    assert trainer._get_required_batch_multiple(dp_size=1) == rows
    assert config.actor_rollout_ref.rollout.n == (1 if branching else 2), "rollout.n is restored"


def test_branching_loops_with_different_budgets_fail_at_start_up(tmp_path):
    loops = tmp_path / "loops.yaml"
    loops.write_text("- name: steppo_agent\n  _target_: steppo_verl.agent_loop.StepAgentLoop\n"
                     "  branching: {initial_rollouts: 2, total_rollouts: 4}\n"
                     "- name: other_agent\n  _target_: steppo_verl.agent_loop.StepAgentLoop\n"
                     "  branching: {initial_rollouts: 2, total_rollouts: 8}\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    train = tmp_path / "train.parquet"
    pq.write_table(pa.table({"agent_name": ["steppo_agent", "other_agent"]}), train)
    manager = f"+actor_rollout_ref.rollout.agent.agent_loop_manager_class={MANAGER_CLASS}"
    config = verl_config("algorithm.adv_estimator=arpo", "actor_rollout_ref.rollout.name=hf",
                         "actor_rollout_ref.rollout.n=1", manager,
                         f"actor_rollout_ref.rollout.agent.agent_loop_config_path={loops}",
                         f"data.train_files=[{train}]")
    with pytest.raises(ValueError, match=r"different total_rollouts \[4, 8\]"):
        validate_steppo_config(config)


def test_arpo_with_an_unknown_attribution_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="algorithm.arpo.attribution"):
        validate_steppo_config(verl_config("algorithm.adv_estimator=arpo", "data.train_files=[]",
                                           "actor_rollout_ref.rollout.agent.default_agent_loop=steppo_agent",
                                           "+algorithm.arpo.attribution=half"))


def test_arpo_is_registered_and_checked_by_the_plugin():
    from steppo_verl.registration import register_components

    assert "advantage estimators" not in register_components()
    assert get_adv_estimator_fn("arpo") is arpo_estimator

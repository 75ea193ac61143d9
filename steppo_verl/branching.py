"""ARPO's entropy-adaptive branching rollouts, as pure pieces: entropy, branching rule, budget, attribution.

ARPO (Agentic Reinforced Policy Optimization, Dong et al., 2025, arXiv 2507.19849) samples
``initial_rollouts`` whole trajectories per prompt, then, round by round (one model turn plus its
tool call per active path), may branch an active path into a copy of its whole context, until
``total_rollouts`` trajectories exist. The more the entropy of what a path just generated rose
since its first segment, the likelier it branches:

    branch  iff  clamp(U(0,1) - entropy_weight * (H_now - H_init), 0, 1) <= branch_probability

Advantages come from GRPO over all rollouts of a prompt; tokens of a shared prefix are then either
trained once per trajectory that holds them ("soft": in expectation they carry their branches' mean
advantage) or once in all, with that mean ("hard").

This module holds no agent loop: both step agent loops drive :class:`BranchPlanner` (one per prompt)
through :mod:`steppo_verl.branch_loop`, and the ``arpo`` estimator registered here
(``algorithm.adv_estimator=arpo``, ``algorithm.arpo.attribution: soft|hard``) calls
:func:`branch_advantages` on the branch fields the StepPO trainer fetches. Everything is
deterministic given the ``random.Random`` passed in.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est

from steppo_verl.advantage import algorithm_option, episode_baseline
from steppo_verl.protocol import Steps

ATTRIBUTIONS = ("soft", "hard")
# Per-row fields of a branched trajectory (steppo_verl.step_record.StepAgentLoopOutput), as the trainer fetches them.
BRANCH_FIELDS = ("path_id", "parent_id", "branch_position")
# A sampling-params key the branch worker sets on validation samples: run one plain trajectory, never branch.
# It travels in sampling_params because that is the one argument verl's worker passes to ``run`` per call.
PLAIN_ROLLOUT = "steppo_plain_rollout"


@dataclass(frozen=True)
class BranchingConfig:
    """ARPO's rollout parameters; the defaults are its public scripts'.

    initial_rollouts: whole trajectories sampled first per prompt.
    total_rollouts: trajectories per prompt in the end (the budget is always exactly filled).
    beam: a path and its branches per round: each active path gets at most ``beam - 1`` new branches
        per round (1: never branch, only whole rollouts).
    branch_probability: ``p`` in the rule; the branching rate when entropy is unchanged.
    entropy_weight: ``beta`` in the rule; how much an entropy rise raises the branching rate.
    entropy_window: how many opening tokens of a segment its entropy is measured on.
    top_k: how many top log-probs per token the entropy is computed from.
    """

    initial_rollouts: int = 8
    total_rollouts: int = 16
    beam: int = 2
    branch_probability: float = 0.5
    entropy_weight: float = 0.2
    entropy_window: int = 20
    top_k: int = 10

    def __post_init__(self):
        for name in ("initial_rollouts", "beam", "entropy_window", "top_k"):
            _check_count(name, getattr(self, name))
        _check_count("total_rollouts", self.total_rollouts)
        if self.total_rollouts < self.initial_rollouts:
            raise ValueError(
                f"branching total_rollouts ({self.total_rollouts}) must be >= initial_rollouts "
                f"({self.initial_rollouts}): branches add to the initial rollouts, never replace them"
            )
        if not _is_number(self.branch_probability) or not 0.0 <= self.branch_probability <= 1.0:
            raise ValueError(f"branching branch_probability must be in [0, 1], got {self.branch_probability!r}")
        if not _is_number(self.entropy_weight) or not math.isfinite(self.entropy_weight):
            raise ValueError(f"branching entropy_weight must be a finite number, got {self.entropy_weight!r}")


    @classmethod
    def from_options(cls, options: Mapping | None) -> BranchingConfig | None:
        """The agent-loop yaml's ``branching:`` block as a config; None (branching off) for a null block.

        Raises:
            ValueError: the block is not a mapping or names an option this config does not have.
        """
        if options is None:
            return None
        if not isinstance(options, Mapping):
            raise ValueError(f"the agent loop's branching block must be a mapping of options or null, got {options!r}")
        options = dict(options)
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            known = [f.name for f in dataclasses.fields(cls)]
            raise ValueError(f"the agent loop's branching block has unknown options {unknown}; known: {known}")
        return cls(**options)


def check_rollout_n_for_branching(n: int) -> None:
    """With branching, one sample already yields its prompt's whole budget of trajectories, all under the
    sample's uid (one GRPO group); ``rollout.n`` copies would repeat the path ids within that group."""
    if n != 1:
        raise ValueError(
            f"branching rollouts (the agent loop's branching block) return total_rollouts trajectories per sample, "
            f"replacing rollout.n copies: set actor_rollout_ref.rollout.n=1 (it is {n}), and count "
            "actor.ppo_mini_batch_size in trajectories"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"branching {name} must be a whole number >= 1, got {value!r}")


# ---------------------------------------------------------------------------------------------- entropy


def segment_entropy(top_logprobs: torch.Tensor, vocab_size: int, window: int) -> torch.Tensor:
    """ARPO's normalised entropy of the opening tokens of segments, from their top-k log-probs.

    top_logprobs: ``(..., T, k)`` the log-probs of each position's ``k`` most likely tokens, as the
        rollout server reports them (``extra_fields["top_logprobs"]``); ``-inf`` entries (tokens
        masked by top-k/top-p sampling, or padding positions of a shorter segment) count as p = 0.
    vocab_size: the tokenizer's vocabulary size; the entropy is divided by ``ln(vocab_size)``.
    window: only the first ``min(window, T)`` positions count.

    Returns ``(...)``: ``sum_t sum_k -p log p / ln(vocab_size)`` over those positions. Summed over
    positions, not averaged, as ARPO's code does: its ``entropy_weight`` is scaled for that sum. An
    empty segment has entropy 0. (vLLM adds the sampled token as a (k+1)-th entry where it is not in
    the top k, and ARPO's sum counts it; the ``hf`` server reports exactly k.)
    """
    if top_logprobs.dim() < 2:
        raise ValueError(f"top_logprobs must be (..., T, k), got shape {tuple(top_logprobs.shape)}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(
            f"vocab_size must be a whole number >= 2 (the entropy is divided by its log), got {vocab_size!r}"
        )
    _check_count("entropy window", window)
    if torch.isnan(top_logprobs).any() or (top_logprobs > 1e-6).any():
        raise ValueError("top_logprobs must be log-probabilities (<= 0, -inf allowed); got NaN or a positive value")
    opening = top_logprobs[..., :window, :].double()
    p_log_p = torch.where(opening.isneginf(), torch.zeros_like(opening), opening.exp() * opening)
    return (-p_log_p.sum(dim=(-2, -1)) / math.log(vocab_size)).to(top_logprobs.dtype)


# ---------------------------------------------------------------------------------------------- rule


def should_branch(uniform: float, entropy_now: float, entropy_init: float, config: BranchingConfig) -> bool:
    """ARPO's rule: ``clamp(uniform - entropy_weight * (entropy_now - entropy_init), 0, 1) <= branch_probability``.

    The clamp matters only at ``branch_probability = 1``: then every draw branches.
    """
    score = uniform - config.entropy_weight * (entropy_now - entropy_init)
    return min(1.0, max(0.0, score)) <= config.branch_probability


# ---------------------------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Path:
    """One trajectory of a prompt: a whole rollout (``parent_id = -1``) or a branch of ``parent_id``.

    branch_position: response tokens copied from the parent (its whole response so far, tool
    response included); the path's own tokens start there. 0 for a whole rollout.
    """

    path_id: int
    parent_id: int = -1
    branch_position: int = 0


@dataclass(frozen=True)
class SegmentReport:
    """What one active path did in a round, as the agent loop saw it.

    entropy: :func:`segment_entropy` of the segment the model just generated.
    continues: the path called a tool and has response room left, so it generates again next round.
    response_length: response tokens so far, the tool response included (what a branch would copy).
    """

    entropy: float
    continues: bool
    response_length: int


class BranchPlanner:
    """ARPO's rollout budget for one prompt, round by round; the agent loop does the generating.

    Round protocol: every active path (first :attr:`active` = the initial rollouts) generates one
    segment (and calls its tool); the loop reports each with a :class:`SegmentReport` to
    :meth:`plan_round`, which returns the new paths to start. A new path is active from the next
    round on: a branch continues from a copy of its parent's context, a whole rollout from the prompt.
    The loop ends when :attr:`done`; :attr:`paths` then holds exactly ``total_rollouts`` paths.

    Budget rule (ARPO's ``vllm_rollout_with_tools``): with ``slots = total - paths so far``, the
    paths that continue are visited in path order; each gets ``min(beam - 1, slots - branched this
    round)`` attempts, each attempt one ``rng.random()`` draw through :func:`should_branch`. When no
    path of the prompt continues and slots are left, one whole rollout starts instead (one per round),
    so the budget is always filled.

    H_init is a path's first segment's entropy; a branch inherits its parent's (its first segment is
    the shared one). ARPO's code keys H_init by row index in a dict it never clears, so there every
    path's H_init is the first segment ever generated in its row index, in whichever earlier batch;
    we follow the paper.
    """

    def __init__(self, config: BranchingConfig, rng: random.Random):
        self.config = config
        self.rng = rng
        self.paths = [Path(path_id) for path_id in range(config.initial_rollouts)]
        self.active = [path.path_id for path in self.paths]
        self._initial_entropy: dict[int, float] = {}

    @property
    def done(self) -> bool:
        return not self.active

    def plan_round(self, reports: Mapping[int, SegmentReport]) -> list[Path]:
        """Record this round's segments (one report per active path) and return the paths to start."""
        self._check_reports(reports)
        for path_id in self.active:
            self._initial_entropy.setdefault(path_id, reports[path_id].entropy)
        continuing = [path_id for path_id in self.active if reports[path_id].continues]
        new_paths = self._branch(continuing, reports) if continuing else self._whole_rollout()
        self.paths.extend(new_paths)
        self.active = continuing + [path.path_id for path in new_paths]
        return new_paths

    def _check_reports(self, reports: Mapping[int, SegmentReport]) -> None:
        if self.done:
            raise ValueError("branch planner is done (no active path): there is no round left to plan")
        missing, unknown = set(self.active) - set(reports), set(reports) - set(self.active)
        if missing or unknown:
            raise ValueError(
                f"a round needs one report per active path {sorted(self.active)}: "
                f"missing {sorted(missing)}, not active {sorted(unknown)}"
            )
        for path_id, report in reports.items():
            if not math.isfinite(report.entropy):
                raise ValueError(f"path {path_id} reported a non-finite segment entropy {report.entropy!r}")

    def _branch(self, continuing: list[int], reports: Mapping[int, SegmentReport]) -> list[Path]:
        slots = self.config.total_rollouts - len(self.paths)
        branches: list[Path] = []
        for source in continuing:
            attempts = min(self.config.beam - 1, slots - len(branches))
            if attempts <= 0:
                break
            for _ in range(attempts):
                if self._draw_branch(source, reports[source].entropy):
                    branches.append(Path(len(self.paths) + len(branches), source, reports[source].response_length))
                    self._initial_entropy[branches[-1].path_id] = self._initial_entropy[source]
        return branches

    def _draw_branch(self, source: int, entropy_now: float) -> bool:
        return should_branch(self.rng.random(), entropy_now, self._initial_entropy[source], self.config)

    def _whole_rollout(self) -> list[Path]:
        return [Path(len(self.paths))] if len(self.paths) < self.config.total_rollouts else []


# ---------------------------------------------------------------------------------------------- attribution


def branch_advantages(
    mode: str,
    returns: torch.Tensor,
    group_ids: torch.Tensor,
    path_ids: torch.Tensor,
    parent_ids: torch.Tensor,
    branch_positions: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    norm_by_std: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages of branched rollouts and the loss weight of each token, ``soft`` or ``hard``.

    returns: ``[B]`` each trajectory's return (outcome score).
    group_ids: ``[B]`` int, the prompt each row belongs to; GRPO compares all rows of a prompt.
    path_ids, parent_ids: ``[B]`` int, the row's path id within its prompt and its parent's
        (``-1``: a whole rollout); the parent must be a row of the batch (any order).
    branch_positions: ``[B]`` int, response tokens copied from the parent (0 for whole rollouts).
    responses, response_mask: ``[B, L]`` the response tokens and which are trained (model tokens).

    Returns ``(advantages, weights)``, both ``[B, L]`` float:

    - ``soft``: every row's tokens carry the row's own GRPO advantage, weight = response_mask; a
      prefix shared by n rows is trained n times, so in expectation with its branches' mean.
    - ``hard``: a shared token is trained once, in the row that generated it, with the mean GRPO
      advantage of the rows that hold it; its copies carry the same advantage with weight 0. A
      row's own tokens (past its branch point) carry its own advantage.
    """
    if mode not in ATTRIBUTIONS:
        raise ValueError(f"branch attribution must be one of {ATTRIBUTIONS}, got {mode!r}")
    owners = Lineage(group_ids, path_ids, parent_ids, branch_positions, responses).token_owners(response_mask)
    _check_returns(returns, group_ids)
    scores = grpo_scores(returns, group_ids, norm_by_std, epsilon)
    mask = response_mask.to(scores.dtype)
    if mode == "soft":
        return scores[:, None] * mask, mask
    return _shared_mean(scores, owners) * mask, _own_tokens(owners, mask)


def hard_loss_weights(
    group_ids: torch.Tensor,
    path_ids: torch.Tensor,
    parent_ids: torch.Tensor,
    branch_positions: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """``[B, L]`` float, the weights of ``hard`` attribution alone (as :func:`branch_advantages` returns them),
    from the rows' lineage: which row generated a token does not depend on the returns, so no GRPO scores
    or shared means are computed. Arguments as :func:`branch_advantages`.
    """
    owners = Lineage(group_ids, path_ids, parent_ids, branch_positions, responses).token_owners(response_mask)
    return _own_tokens(owners, response_mask.float())


def grpo_scores(returns: torch.Tensor, group_ids: torch.Tensor, norm_by_std: bool, epsilon: float) -> torch.Tensor:
    """``[B]`` GRPO's advantage of each return within its group (``group_ids`` ``[B]``, any int labels)."""
    groups = torch.unique(group_ids, return_inverse=True)[1]
    baseline, scale = episode_baseline(returns.float(), groups, norm_by_std, epsilon)
    return (returns.float() - baseline) / scale


def parent_rows(group_ids: torch.Tensor, path_ids: torch.Tensor, parent_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` the row of each row's parent path within its group, ``-1`` for whole rollouts.

    Raises:
        ValueError: a (group, path id) pair appears twice, a parent is missing from the batch, or
        the parents form a cycle.
    """
    batch = group_ids.shape[0]
    pairs = torch.stack([group_ids, path_ids], dim=1)
    parent_pairs = torch.stack([group_ids, parent_ids], dim=1)
    keys = torch.unique(torch.cat([pairs, parent_pairs]), dim=0, return_inverse=True)[1]
    row_keys, parent_keys = keys[:batch], keys[batch:]
    repeated = torch.bincount(row_keys).gt(1).nonzero()[:, 0]
    if repeated.numel():
        row = int((row_keys == repeated[0]).nonzero()[0, 0])
        raise ValueError(f"path {int(path_ids[row])} of group {int(group_ids[row])} appears in more than one row")
    row_of_key = torch.full((int(keys.max()) + 1,), -1, dtype=torch.long).index_put_((row_keys,), torch.arange(batch))
    parents = torch.where(parent_ids < 0, -1, row_of_key[parent_keys])
    orphans = ((parent_ids >= 0) & (parents < 0)).nonzero()[:, 0]
    if orphans.numel():
        row = int(orphans[0])
        raise ValueError(
            f"row {row} (group {int(group_ids[row])}, path {int(path_ids[row])}) branches from path "
            f"{int(parent_ids[row])}, which is not in the batch"
        )
    _check_acyclic(parents)
    return parents


def _check_acyclic(parents: torch.Tensor) -> None:
    """Every chain of parents must end at a whole rollout; pointer jumping reaches it in log2(B) steps."""
    up = torch.where(parents < 0, torch.arange(parents.shape[0]), parents)
    for _ in range(max(1, parents.shape[0]).bit_length()):
        up = up[up]
    in_cycle = (parents[up] >= 0).nonzero()[:, 0]
    if in_cycle.numel():
        raise ValueError(f"row {int(in_cycle[0])}'s chain of parent paths is a cycle; branches must form a tree")


def token_owners(
    parents: torch.Tensor, branch_positions: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """``[B, L]`` the row that generated each token: a token before a row's branch position is its parent's.

    parents: ``[B]`` parent rows (``-1``: whole rollout); branch_positions: ``[B]``;
    responses, response_mask: ``[B, L]``, used to check that each branch copies its parent's prefix.
    Resolved by pointer jumping over the tree, not per token.
    """
    rows = _rows(responses)
    positions = torch.arange(responses.shape[1])[None, :]
    copied = (parents[:, None] >= 0) & (positions < branch_positions[:, None])
    _check_copies(parents, branch_positions, copied, responses, response_mask)
    owners = torch.where(copied, parents[:, None], rows)
    for _ in range(max(1, responses.shape[0]).bit_length()):
        owners = owners.gather(0, owners)
    return owners


def _check_copies(parents, branch_positions, copied, responses, response_mask) -> None:
    source = parents.clamp(min=0)
    differs = copied & ((responses != responses[source]) | (response_mask != response_mask[source]))
    bad = differs.any(dim=1).nonzero()[:, 0]
    if bad.numel():
        row = int(bad[0])
        token = int(differs[row].nonzero()[0, 0])
        raise ValueError(
            f"row {row} branches from row {int(parents[row])} at response token {int(branch_positions[row])}, "
            f"but its response (or mask) differs from the parent's at token {token}: a branch copies its "
            "parent's prefix exactly"
        )


def _shared_mean(scores: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` at each token, the mean score of the rows holding the same generated token (same owner)."""
    per_token = scores[:, None].expand_as(owners).double()
    totals = torch.zeros_like(per_token).scatter_add_(0, owners, per_token)
    counts = torch.zeros_like(per_token).scatter_add_(0, owners, torch.ones_like(per_token))
    return (totals.gather(0, owners) / counts.gather(0, owners)).to(scores.dtype)


def _own_tokens(owners: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` ``mask`` where the row generated the token itself (``owners`` ``[B, L]``), 0 on copied tokens."""
    return (owners == _rows(owners)) * mask


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, 1]`` each row's index, to compare with ``[B, L]`` owners."""
    return torch.arange(x.shape[0], device=x.device)[:, None]


class Lineage(NamedTuple):
    """The rows of a branched batch, as :func:`branch_advantages` takes them: ``group_ids``, ``path_ids``,
    ``parent_ids``, ``branch_positions`` ``[B]`` and ``responses`` ``[B, L]``."""

    group_ids: torch.Tensor
    path_ids: torch.Tensor
    parent_ids: torch.Tensor
    branch_positions: torch.Tensor
    responses: torch.Tensor

    def token_owners(self, response_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` the row that generated each token (:func:`token_owners`), after checking the lineage
        (shapes, branch positions, unique paths, parents present, no cycles, copied prefixes)."""
        _check_lineage(*self, response_mask)
        parents = parent_rows(self.group_ids, self.path_ids, self.parent_ids)
        return token_owners(parents, self.branch_positions, self.responses, response_mask)


def _check_returns(returns: torch.Tensor, group_ids: torch.Tensor) -> None:
    if returns.shape != group_ids.shape:
        raise ValueError(f"returns must be [B] = [{group_ids.shape[0]}], got {tuple(returns.shape)}")
    non_finite = (~returns.isfinite()).nonzero()[:, 0]
    if non_finite.numel():
        raise ValueError(f"returns must be finite, got {float(returns[non_finite[0]])} in row {int(non_finite[0])}")


def _check_lineage(group_ids, path_ids, parent_ids, branch_positions, responses, response_mask) -> None:
    if responses.dim() != 2 or response_mask.shape != responses.shape:
        raise ValueError(
            f"responses and response_mask must both be [B, L], got {tuple(responses.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    batch, length = responses.shape
    for name, x in [
        ("group_ids", group_ids),
        ("path_ids", path_ids),
        ("parent_ids", parent_ids),
        ("branch_positions", branch_positions),
    ]:
        if x.shape != (batch,):
            raise ValueError(f"{name} must be [B] = [{batch}], got {tuple(x.shape)}")
    outside = (branch_positions < 0) | (branch_positions > length) | ((parent_ids < 0) & (branch_positions != 0))
    if outside.any():
        row = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"row {row}'s branch position {int(branch_positions[row])} must be in [0, {length}], and 0 for a whole "
            f"rollout (its parent id is {int(parent_ids[row])})"
        )


# ---------------------------------------------------------------------------------------------- verl


def arpo_attribution(config: Any) -> str:
    """``algorithm.arpo.attribution``: ``soft`` (ARPO's, the default) or ``hard``."""
    mode = algorithm_option(config, "arpo.attribution", "soft")
    if mode not in ATTRIBUTIONS:
        raise ValueError(f"algorithm.arpo.attribution must be one of {ATTRIBUTIONS}, got {mode!r}")
    return mode


def arpo_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any,
    index: Any,
    branches: Mapping[str, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`branch_advantages` of a verl batch: ``(advantages, loss weights)``, both ``[B, L]``.

    token_level_rewards, response_mask: ``[B, L]``; a row's return is the sum of its rewards.
    index, branches: as :func:`verl_lineage`.
    """
    lineage = verl_lineage(index, branches)
    return branch_advantages(
        arpo_attribution(config),
        token_level_rewards.sum(dim=-1),
        *lineage,
        response_mask,
        norm_by_std=algorithm_option(config, "norm_adv_by_std_in_grpo", True),
    )


def verl_lineage(index: Any, branches: Mapping[str, torch.Tensor] | None) -> Lineage:
    """A verl batch's rows as a :class:`Lineage`.

    index: ``[B]`` the rows' prompt uids (one GRPO group each).
    branches: the rows' :data:`BRANCH_FIELDS` ``[B]`` (``branch_position`` -1 for a whole rollout),
        ``responses`` ``[B, L]`` and optionally ``is_padding`` ``[B]`` (verl's filler rows, which are
        copies of a real row under their own uid: each counts as a whole rollout of its own).
    """
    if branches is None or any(name not in branches for name in (*BRANCH_FIELDS, "responses")):
        raise ValueError(
            "branched rollouts (adv_estimator=arpo, algorithm.steppo.values=branch_returns) need the branch fields "
            "of each row (path_id, parent_id, branch_position) and the responses: train through the StepPO "
            "trainer (python -m steppo_verl.main) on the rows of steppo_agent or steppo_env_agent"
        )
    if index is None:
        raise ValueError("branched rollouts need the rows' prompt uids (index) to group them")
    group_ids = torch.as_tensor(np.unique(np.asarray(index, dtype=str), return_inverse=True)[1].reshape(-1))
    path_ids, parent_ids = branches["path_id"].long(), branches["parent_id"].long()
    positions = branches["branch_position"].long().clamp(min=0)
    padding = branches.get("is_padding")
    if padding is not None and bool(padding.any()):
        rows = torch.arange(path_ids.shape[0])
        path_ids = torch.where(padding, -2 - rows, path_ids)  # unique, and never a real path id (>= 0) or -1
        parent_ids = torch.where(padding, -1, parent_ids)
        positions = torch.where(padding, 0, positions)
    return Lineage(group_ids, path_ids, parent_ids, positions, branches["responses"])


def branch_state_keys(
    index: Any, branches: Mapping[str, torch.Tensor] | None, response_mask: torch.Tensor, steps: Steps
) -> torch.Tensor:
    """``[B, K]`` int64 key of the exact state each step starts from, read from the rows' lineage: two steps
    share a key iff their rows belong to one prompt, the steps start at the same response token, and the
    rows hold the same tokens before it (one row generated them, the other copied them in a branch).

    Every row of a prompt shares the state of its first step (the prompt itself, when the response starts
    with a step), so the batch's mean return from there is the group's (RLOO's baseline); a branch point
    is shared by a path and the branches it spawned there. Arguments as :func:`verl_lineage`; ``steps``
    locates each row's steps (``starts`` ``[B, K]``); keys where ``steps.step_mask`` is False are 0.
    """
    lineage = verl_lineage(index, branches)
    owners = lineage.token_owners(response_mask)
    group_ids = lineage.group_ids
    before = owners.gather(1, (steps.starts - 1).clamp(min=0))
    before = torch.where(steps.starts > 0, before, -1)  # nothing generated before: the prompt, shared by all
    triples = torch.stack([group_ids[:, None].expand_as(before), steps.starts, before], dim=-1)[steps.step_mask]
    keys = torch.zeros(steps.starts.shape, dtype=torch.long)
    keys[steps.step_mask] = torch.unique(triples, dim=0, return_inverse=True)[1]
    return keys


def arpo_loss_mask(token_level_rewards, response_mask, config=None, index=None, branches=None) -> torch.Tensor | None:
    """``[B, L]`` the response mask the actor should train with under ``arpo``, or None to keep verl's.

    Hard attribution trains a shared prefix once, in the row that generated it: its copies get weight 0.
    Read from the rows' lineage alone (:func:`hard_loss_weights`): the estimator has computed the
    advantages already, and ``token_level_rewards`` is not needed.
    """
    if arpo_attribution(config) == "soft":
        return None
    return hard_loss_weights(*verl_lineage(index, branches), response_mask).to(response_mask.dtype)


@register_adv_est("arpo")
def arpo_estimator(token_level_rewards, response_mask, config=None, index=None, branches=None, **kwargs):
    """verl entry for ``algorithm.adv_estimator=arpo``: GRPO over all rollouts of a prompt, branches included,
    attributed ``algorithm.arpo.attribution`` (see :func:`branch_advantages`); returns ``(advantages, advantages)``
    as verl's GRPO does."""
    advantages = arpo_advantages(token_level_rewards, response_mask, config, index, branches)[0]
    return advantages, advantages


# What this module registers with verl; the plugin checks each entry after import.
BRANCH_ESTIMATORS = {"arpo": arpo_estimator}
# For estimators that change which tokens the actor trains on: the trainer's one place that stores the mask.
LOSS_MASKS = {"arpo": arpo_loss_mask}

"""Per-step records of a training batch: what each agent step did and what credit it got.

One record per step of each dumped trajectory (schema: :data:`RECORD_SCHEMA`). Every per-step
number comes from the step-segment protocol (:mod:`steppo_verl.protocol`) applied to the same
tensors the estimator and the loss saw, so the view cannot disagree with training: V(s_k), A_k and
R_k are read at step starts, r_k is :func:`~steppo_verl.protocol.step_rewards`, the importance
ratio is the step loss's geometric mean. Python only loops to decode text and build the dicts.

Records land in ``RUN_DIR/steppo_steps/step_{N:06d}.parquet`` (and ``.jsonl`` on request), one
file per dumped training step; ``python -m steppo_verl.inspect RUN_DIR`` renders them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from steppo_verl.loss import clip_binds, step_clip_bounds
from steppo_verl.protocol import Steps, gather_at_step_starts, locate_steps, step_means, step_rewards, step_sums

__all__ = [
    "RECORD_SCHEMA",
    "RECORDS_DIR",
    "DumpConfig",
    "TrajectoryBatch",
    "dump_step_records",
    "read_step_records",
    "rows_to_dump",
    "step_ratios",
    "step_records",
    "write_step_records",
]

RECORDS_DIR = "steppo_steps"

# Nullable columns are the ones whose source is optional (no critic, no log-probs, plain verl).
RECORD_SCHEMA = pa.schema(
    [
        pa.field("training_step", pa.int64(), nullable=False),
        pa.field("trajectory_id", pa.string(), nullable=False),  # "<uid>#<row in the batch>"
        pa.field("uid", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),  # k = 0..num_steps-1
        pa.field("num_steps", pa.int64(), nullable=False),
        pa.field("action", pa.string(), nullable=False),  # decoded action tokens of step k
        pa.field("observation", pa.string(), nullable=False),  # non-action tokens after it, shortened
        pa.field("action_tokens", pa.int64(), nullable=False),
        pa.field("observation_tokens", pa.int64(), nullable=False),
        pa.field("reward", pa.float64(), nullable=False),  # r_k, outcome + env rewards
        pa.field("env_reward", pa.float64()),  # the env/tool part of r_k
        pa.field("value", pa.float64()),  # V(s_k)
        pa.field("advantage", pa.float64(), nullable=False),  # A_k as trained on
        pa.field("return", pa.float64(), nullable=False),  # R_k, the critic target
        pa.field("ratio", pa.float64()),  # geometric-mean importance ratio of the step
        pa.field("clipped", pa.bool_()),  # the ratio lies outside the clip range where it binds
        pa.field("terminated", pa.bool_(), nullable=False),  # the model ended the episode after k
        pa.field("truncated", pa.bool_(), nullable=False),  # a limit cut the episode off after k
        pa.field("ending", pa.string()),  # steppo_verl.endings.Ending: answer | turn_limit | length_limit | ...
        pa.field("bootstrap_value", pa.float64()),  # V_K after the final step (0 if terminal); last step only
        pa.field("state_key", pa.int64()),  # the agent loop's key of the state the step was taken from
        pa.field("outcome", pa.float64()),  # the discounted return observed from step k on (bootstrapped)
    ]
)


@dataclass(frozen=True)
class TrajectoryBatch:
    """A padded verl-style batch: B trajectories, L response tokens each.

    Attributes:
        responses: ``[B, L]`` response token ids.
        response_mask: ``[B, L]`` 1 on action tokens.
        token_level_rewards: ``[B, L]`` verl's rewards (outcome score, KL penalty).
        advantages, returns: ``[B, L]`` the estimator's outputs.
        uid: ``B`` prompt ids (trajectories of one prompt share it).
        step_ids: ``[B, L]`` explicit step ids, or None for ``response_mask`` runs.
        env_rewards: ``[B, L]`` per-step tool rewards of the step-aware agent loop.
        values: ``[B, L]`` critic values (``values[:, t]`` = V before token t).
        old_log_probs, log_probs: ``[B, L]`` log-probs under the behaviour and the current policy.
        truncated: ``[B]`` bool, episodes cut off by a limit.
        ending: ``B`` why each episode ended (names of :class:`steppo_verl.endings.Ending`).
        bootstrap_values: ``[B]`` V_K, the value after the final step the estimator used (0 if terminal).
        step_keys: ``[B, L]`` the agent loop's state key on each step's tokens.
        outcomes: ``[B, K]`` the discounted return observed from each step on
            (:func:`steppo_verl.metrics.observed_returns`).
        response_length: ``[B]`` real response length per row; tokens past it are padding.
    """

    responses: torch.Tensor
    response_mask: torch.Tensor
    token_level_rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    uid: Sequence[str]
    step_ids: torch.Tensor | None = None
    env_rewards: torch.Tensor | None = None
    values: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    truncated: torch.Tensor | None = None
    ending: Sequence[str] | None = None
    bootstrap_values: torch.Tensor | None = None
    step_keys: torch.Tensor | None = None
    outcomes: torch.Tensor | None = None
    response_length: torch.Tensor | None = None

    def select(self, rows: list[int]) -> TrajectoryBatch:
        """The batch restricted to ``rows`` (every tensor and list indexed along dim 0)."""
        index = torch.as_tensor(rows, dtype=torch.int64)

        def take(value):
            if value is None or isinstance(value, torch.Tensor):
                return None if value is None else value[index.to(value.device)]
            return [value[i] for i in rows]

        return dataclasses.replace(self, **{f.name: take(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class DumpConfig:
    """When and how much to dump.

    Attributes:
        run_dir: records go to ``run_dir/steppo_steps/``.
        every_n_steps: dump at training steps divisible by this; 0 turns dumping off.
        max_trajectories: the first this many trajectories of the batch are dumped.
        max_observation_chars: observations longer than this are shortened (with "…").
        clip_ratio_low, clip_ratio_high: the policy loss's clip range, for ``clipped``.
        per_action_clip: the range bounds each step's whole ratio (``loss_mode=steppo_action_clip``).
        jsonl: also write a JSONL copy next to the parquet file.
    """

    run_dir: str | os.PathLike
    every_n_steps: int = 10
    max_trajectories: int = 64
    max_observation_chars: int = 1000
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    per_action_clip: bool = False
    jsonl: bool = False


# ----------------------------------------------------------------------------- per-step tensors


def step_ratios(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    step_advantages: torch.Tensor,
    steps: Steps,
    clip_ratio_low: float,
    clip_ratio_high: float,
    per_action_clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each step's importance ratio and whether the PPO clip binds on it, as the steppo loss has it.

    Args:
        old_log_probs, log_probs: ``[B, L]``.
        step_advantages: ``[B, K]`` A_k.
        steps: the batch's layout.

    Returns:
        ``[B, K]`` ratio ``exp(mean_{t in k} log pi - log pi_old)`` and ``[B, K]`` bool clipped:
        above the upper bound with A_k > 0 or below the lower bound with A_k < 0 (the side where the clip
        removes the gradient); bounds from :func:`steppo_verl.loss.step_clip_bounds`.
    """
    ratio = torch.exp(step_means((log_probs - old_log_probs).double(), steps))
    lower, upper = step_clip_bounds(steps, clip_ratio_low, clip_ratio_high, per_action_clip, ratio.dtype)
    return ratio, clip_binds(ratio, step_advantages, lower, upper) & steps.step_mask


def _spans(steps: Steps, response_length: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, K]`` each step's action span ``[start, action_end)`` and observation end.

    The observation of step k is the non-action tokens from its last action token to the next
    step's first token, or to the row's real end (padding excluded).
    """
    action_end = steps.starts + step_sums(steps.action.to(torch.int64), steps)
    observation_end = torch.minimum(steps.next_starts(), response_length[:, None].to(steps.starts))
    return steps.starts, action_end, torch.maximum(observation_end, action_end)


def _per_step_columns(batch: TrajectoryBatch, config: DumpConfig) -> dict[str, torch.Tensor | None]:
    """``[B, K]`` per-step tensors for every numeric column, plus the layout's own."""
    steps = locate_steps(batch.response_mask, batch.step_ids)
    rewards = batch.token_level_rewards.double()
    env = batch.env_rewards.double() if batch.env_rewards is not None else None
    advantages = gather_at_step_starts(batch.advantages.double(), steps)
    ratio = clipped = None
    if batch.old_log_probs is not None and batch.log_probs is not None:
        ratio, clipped = step_ratios(
            batch.old_log_probs, batch.log_probs, advantages, steps, config.clip_ratio_low, config.clip_ratio_high,
            config.per_action_clip,
        )
    batch_size, length = batch.responses.shape
    response_length = batch.response_length if batch.response_length is not None else torch.full((batch_size,), length)
    no_cuts = torch.zeros(batch_size, dtype=torch.bool)  # plain verl: every episode terminated
    truncated = (no_cuts if batch.truncated is None else batch.truncated.bool()).to(steps.num_steps.device)
    is_last = steps.is_last()
    start, action_end, observation_end = _spans(steps, response_length)
    return {
        "mask": steps.step_mask,
        "num_steps": steps.num_steps[:, None].expand_as(steps.starts),
        "start": start,
        "action_end": action_end,
        "observation_end": observation_end,
        "reward": step_rewards(rewards if env is None else rewards + env, steps),
        "env_reward": step_rewards(env, steps) if env is not None else None,
        "value": gather_at_step_starts(batch.values.double(), steps) if batch.values is not None else None,
        "advantage": advantages,
        "return": gather_at_step_starts(batch.returns.double(), steps),
        "ratio": ratio,
        "clipped": clipped,
        "terminated": is_last & ~truncated[:, None],
        "truncated": is_last & truncated[:, None],
        "state_key": gather_at_step_starts(batch.step_keys, steps) if batch.step_keys is not None else None,
        # [:, :K]: a selection of rows may hold fewer steps than the batch the outcomes were computed on
        "outcome": batch.outcomes.double()[:, : steps.max_steps] if batch.outcomes is not None else None,
    }


# ----------------------------------------------------------------------------- records


def _shorten(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[:max_chars] + "…"


def step_records(batch: TrajectoryBatch, tokenizer: Any, training_step: int, config: DumpConfig) -> list[dict]:
    """One record (a dict following :data:`RECORD_SCHEMA`) per step of every trajectory in ``batch``.

    Args:
        batch: the trajectories to describe (``B`` rows).
        tokenizer: decodes action and observation tokens (``decode(ids) -> str``).
        training_step: verl's ``global_steps``.
        config: observation length and clip range.

    Returns:
        Records ordered by row, then step.
    """
    columns = {name: None if x is None else x.tolist() for name, x in _per_step_columns(batch, config).items()}
    tokens = batch.responses.tolist()
    bootstrap_value = (
        [None] * len(tokens) if batch.bootstrap_values is None else batch.bootstrap_values.double().tolist()
    )
    per_step = ("reward", "env_reward", "value", "advantage", "return", "ratio", "clipped", "terminated", "truncated",
                "state_key", "outcome")
    records = []
    for b, row_mask in enumerate(columns["mask"]):
        for k in (k for k, present in enumerate(row_mask) if present):
            start, action_end, observation_end = (columns[n][b][k] for n in ("start", "action_end", "observation_end"))
            records.append(
                {
                    "training_step": int(training_step),
                    "trajectory_id": f"{batch.uid[b]}#{b}",
                    "uid": str(batch.uid[b]),
                    "step": k,
                    "num_steps": columns["num_steps"][b][k],
                    "action": tokenizer.decode(tokens[b][start:action_end]),
                    "observation": _shorten(
                        tokenizer.decode(tokens[b][action_end:observation_end]), config.max_observation_chars
                    ),
                    "action_tokens": action_end - start,
                    "observation_tokens": observation_end - action_end,
                    **{n: (None if columns[n] is None else columns[n][b][k]) for n in per_step},
                    "ending": None if batch.ending is None else str(batch.ending[b]),
                    "bootstrap_value": None if k + 1 != columns["num_steps"][b][k] else bootstrap_value[b],
                }
            )
    return records


# ----------------------------------------------------------------------------- dumping


def rows_to_dump(training_step: int, batch_size: int, every_n_steps: int, max_trajectories: int) -> list[int]:
    """Batch rows to dump at this training step: the first ``max_trajectories`` every ``every_n_steps`` steps.

    Deterministic (the first rows, not a random sample), so dumps of a rerun match. Empty when
    this is not a dump step or dumping is off (``every_n_steps <= 0``).
    """
    if every_n_steps <= 0 or training_step % every_n_steps != 0:
        return []
    return list(range(min(batch_size, max(max_trajectories, 0))))


def _records_path(run_dir: str | os.PathLike, training_step: int, suffix: str) -> Path:
    return Path(run_dir) / RECORDS_DIR / f"step_{training_step:06d}{suffix}"


def _replace_atomically(path: Path, write) -> None:
    # A reader (the report) never sees a half-written file; a rerun of the step replaces it.
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def write_step_records(
    records: list[dict], run_dir: str | os.PathLike, training_step: int, jsonl: bool = False
) -> Path:
    """Write one training step's records to ``RUN_DIR/steppo_steps/step_{N:06d}.parquet``.

    Returns:
        The parquet file's path. With ``jsonl`` a ``.jsonl`` copy (one record per line) is
        written next to it.
    """
    path = _records_path(run_dir, training_step, ".parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records, schema=RECORD_SCHEMA)
    _replace_atomically(path, lambda target: pq.write_table(table, target))
    if jsonl:
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        _replace_atomically(path.with_suffix(".jsonl"), lambda target: target.write_text(lines, encoding="utf-8"))
    return path


def read_step_records(run_dir: str | os.PathLike) -> list[dict]:
    """Every record under ``RUN_DIR/steppo_steps/``, in training-step order.

    Raises:
        FileNotFoundError: the run has no step records.
    """
    files = sorted((Path(run_dir) / RECORDS_DIR).glob("step_*.parquet"))
    if not files:
        raise FileNotFoundError(f"no step records in {Path(run_dir) / RECORDS_DIR} (expected step_NNNNNN.parquet)")
    return [record for path in files for record in pq.read_table(path).to_pylist()]


def dump_step_records(
    batch: TrajectoryBatch, tokenizer: Any, training_step: int, config: DumpConfig
) -> Path | None:
    """At a dump step, write the records of the first ``config.max_trajectories`` rows of ``batch``.

    Returns:
        The parquet file written, or None when this training step is not dumped.
    """
    rows = rows_to_dump(training_step, len(batch.uid), config.every_n_steps, config.max_trajectories)
    if not rows:
        return None
    records = step_records(batch.select(rows), tokenizer, training_step, config)
    return write_step_records(records, config.run_dir, training_step, jsonl=config.jsonl)

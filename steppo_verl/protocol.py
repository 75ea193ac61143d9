"""The step-segment protocol: which response tokens belong to which agent step.

One training row holds a whole trajectory (prompt + every action and observation). The
``step_ids`` tensor marks the steps inside it:

    step_ids[b, t] = k   response token t of sample b is a token of action step k (k = 0..K_b-1)
    step_ids[b, t] = -1  anything else: observation / tool / template tokens and padding

Rules (checked by :func:`locate_steps` / :func:`validate_step_ids`; a violation names the
sample and the token):

    R1  ``step_ids`` is a 2-D integer tensor with the shape of ``response_mask``; ids are >= -1.
    R2  ``step_ids >= 0`` exactly where ``response_mask == 1``: action tokens belong to a step,
        nothing else does.
    R3  Steps are numbered 0, 1, 2, ... in order and each step's tokens are contiguous: the n-th
        run of one non-negative id has id n.

Without ``step_ids`` (a stock verl agent loop), steps are the maximal runs of 1s in
``response_mask``.

Every consumer (estimators, losses, metrics, inspection) goes through :func:`locate_steps`
once and then uses the :class:`Steps` helpers below; none re-derives steps. Everything is
vectorised, and per-token work is a handful of light passes over ``[B, L]`` with no ``[B, L]``
temporaries wider than 4 bytes (on CPU a fresh 8-byte ``[B, L]`` buffer costs more in page
faults than the arithmetic done in it): one int32 cumulative count of step starts gives the
start of every step (``searchsorted``) and every token's slot in a per-step table, so per-step
values reach the tokens with one ``index_select``; per-step sums use float64 prefix sums
computed a block of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.nn.functional as F

__all__ = [
    "StepLayoutError",
    "Steps",
    "locate_steps",
    "validate_step_ids",
    "step_ids_from_mask",
    "gather_at_step_starts",
    "scatter_to_step_starts",
    "after_steps",
    "state_value_positions",
    "read_state_values",
    "scatter_to_tokens",
    "step_sums",
    "step_means",
    "step_rewards",
]


class StepLayoutError(ValueError):
    """A ``step_ids`` tensor breaks the step-segment protocol."""


@dataclass(frozen=True)
class Steps:
    """Where the steps of a batch are; computed once by :func:`locate_steps`.

    Attributes:
        action: ``[B, L]`` bool, True on action tokens (tokens that belong to a step).
        starts: ``[B, K]`` int64, token index of the first token of step k (0 where absent);
            K is the largest number of steps in any sample.
        step_mask: ``[B, K]`` bool, True where sample b has a step k.
        num_steps: ``[B]`` int64 number of steps per sample.
        slots: ``[B, L]`` int32 (int64 past 2**31 steps), each token's entry in the table
            ``[fill, v[0, 0], ..., v[0, K-1], v[1, 0], ...]`` of per-step values ``v [B, K]``
            behind one fill value: ``1 + b * K + k`` on the tokens of step k, 0 on every other token.
    """

    action: torch.Tensor
    starts: torch.Tensor
    step_mask: torch.Tensor
    num_steps: torch.Tensor
    slots: torch.Tensor

    @property
    def max_steps(self) -> int:
        return self.starts.shape[1]

    def next_starts(self) -> torch.Tensor:
        """``[B, K]`` first token of step k+1, or L after the last step (end of step k's span)."""
        length = self.action.shape[1]
        shifted_starts = F.pad(self.starts[:, 1:], (0, 1))
        shifted_mask = F.pad(self.step_mask[:, 1:], (0, 1), value=False)
        return torch.where(shifted_mask, shifted_starts, torch.full_like(shifted_starts, length))

    def is_last(self) -> torch.Tensor:
        """``[B, K]`` bool, True at each sample's final step."""
        columns = torch.arange(self.max_steps, device=self.starts.device)
        return columns[None, :] == self.num_steps[:, None] - 1

    def step_ids(self) -> torch.Tensor:
        """``[B, L]`` int64 step ids (-1 off action tokens), materialised from this layout."""
        columns = torch.arange(self.max_steps, device=self.starts.device)
        return scatter_to_tokens(columns.expand_as(self.starts), self, fill=-1)


def _fail(sample: int, token: int, rule: str) -> NoReturn:
    raise StepLayoutError(f"invalid step_ids in sample {sample} at response token {token}: {rule}")


def _check_any(bad: torch.Tensor, rule: str) -> None:
    if bool(bad.any()):
        sample, token = bad.nonzero()[0].tolist()
        _fail(sample, token, rule)


def _check_ids_type_and_shape(step_ids: torch.Tensor, response_mask: torch.Tensor) -> None:
    if step_ids.shape != response_mask.shape:
        raise StepLayoutError(
            f"step_ids has shape {tuple(step_ids.shape)} but response_mask has shape "
            f"{tuple(response_mask.shape)}; both must be [batch, response_length]"
        )
    if step_ids.dtype.is_floating_point or step_ids.dtype.is_complex or step_ids.dtype == torch.bool:
        raise StepLayoutError(f"step_ids must be an integer tensor, got dtype {step_ids.dtype} (R1)")


def _minus_one_exactly_off_actions(step_ids: torch.Tensor, action: torch.Tensor) -> bool:
    """R1 and R2 but for negative ids other than -1 on action tokens, which R3 then catches.

    Such a token's run starts with that negative id instead of its run number (one read of the ids
    instead of two).
    """
    flags = (step_ids == -1).logical_xor_(action)  # True where the token obeys the rule
    # The byte minimum is a vectorised reduction on CPU; bool all() is not (1.5 vs 0.2 ms per 4 M tokens).
    return flags.numel() == 0 or bool(flags.view(torch.uint8).min())


def _first_misnumbered_run(step_ids: torch.Tensor, steps: Steps) -> tuple[int, int] | None:
    """R3 read at ``[B, K]``: (sample, run) of the first run whose id is not its run number, or None."""
    if steps.max_steps == 0:
        return None
    ids_at_starts = torch.gather(step_ids, 1, steps.starts).to(torch.int64)
    expected = torch.arange(steps.max_steps, device=step_ids.device)
    bad = steps.step_mask & (ids_at_starts != expected[None, :])
    return tuple(bad.nonzero()[0].tolist()) if bool(bad.any()) else None


def _raise_first_violation(step_ids: torch.Tensor, action: torch.Tensor) -> NoReturn:
    """Name the first broken rule (R1, R2, then R3) in ``step_ids``, known to be invalid."""
    _check_any(step_ids < -1, "step ids must be >= -1 (R1)")
    has_id = step_ids >= 0
    _check_any(has_id & ~action, "a token with response_mask == 0 carries a step id; "
               "observation, tool and padding tokens must have step id -1 (R2)")
    _check_any(~has_id & action, "an action token (response_mask == 1) has no step id (R2)")
    steps = _steps_from_runs(step_ids, action)
    sample, run = _first_misnumbered_run(step_ids, steps)
    ids_at_starts = torch.gather(step_ids[sample], 0, steps.starts[sample, : run + 1]).tolist()
    step, seen = ids_at_starts[run], max(ids_at_starts[:run], default=-1)
    problem = (
        f"step {step} appears again after step {seen} (steps must be contiguous and increasing)"
        if step <= seen
        else f"step {step} follows step {seen} (step ids must not skip numbers; the first step is 0)"
    )
    _fail(sample, int(steps.starts[sample, run]), problem + " (R3)")


def _steps_from_runs(labels: torch.Tensor, action: torch.Tensor) -> Steps:
    """:class:`Steps` made of the maximal runs of action tokens with one label (n-th run = step n).

    Args:
        labels: ``[B, L]`` any dtype; a step starts where the label changes on an action token. The
            label of an action token must differ from that of a non-action token: the mask itself
            and step ids with -1 exactly off action tokens qualify.
        action: ``[B, L]`` bool action tokens.
    """
    batch_size, length = action.shape
    device = action.device
    is_start = torch.empty_like(action)
    is_start[:, :1] = True
    torch.ne(labels[:, 1:], labels[:, :-1], out=is_start[:, 1:])
    is_start &= action
    # int32 counts: fewer than 2**31 steps per row, and 4-byte passes are the cheap ones on CPU. Read off
    # the last column, they are the step counts too (no separate sum over [B, L]).
    slots = torch.cumsum(is_start, dim=1, dtype=torch.int32)  # steps begun at or before each token
    del is_start
    num_steps = slots[:, -1].to(torch.int64) if length else torch.zeros(batch_size, dtype=torch.int64, device=device)
    max_steps = int(num_steps.max()) if batch_size else 0
    if batch_size * max_steps >= 2**31 - 1:
        slots = slots.to(torch.int64)
    offsets = torch.arange(batch_size, dtype=slots.dtype, device=device)[:, None] * max_steps  # [B, 1]
    slots += offsets  # b * K + the count: each token's table index in Steps.slots, still rising along a row
    wanted = offsets + torch.arange(1, max_steps + 1, device=device, dtype=slots.dtype)  # [B, K]
    starts = torch.searchsorted(slots, wanted)  # first token where the count reaches k + 1
    step_mask = torch.arange(max_steps, device=device)[None, :] < num_steps[:, None]
    starts = torch.where(step_mask, starts, torch.zeros_like(starts))
    slots.mul_(action)  # off-step tokens read the fill value (a product: cheaper than a select on CPU)
    return Steps(action, starts, step_mask, num_steps, slots)


def locate_steps(response_mask: torch.Tensor, step_ids: torch.Tensor | None = None) -> Steps:
    """Validate explicit ``step_ids`` (or recover steps from ``response_mask`` runs) and locate them.

    Args:
        response_mask: ``[B, L]`` 1 (or True) on action tokens.
        step_ids: ``[B, L]`` integer step ids from a step-aware agent loop, or ``None``.

    Returns:
        The batch's :class:`Steps`.

    Raises:
        StepLayoutError: ``step_ids`` breaks a protocol rule; the message names sample and token.
    """
    if response_mask.dim() != 2:
        raise StepLayoutError(f"response_mask must be 2-D [batch, response_length], got {response_mask.dim()}-D")
    action = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    if step_ids is None:
        return _steps_from_runs(action, action)

    _check_ids_type_and_shape(step_ids, response_mask)
    if _minus_one_exactly_off_actions(step_ids, action):
        steps = _steps_from_runs(step_ids, action)
        if _first_misnumbered_run(step_ids, steps) is None:
            return steps
    _raise_first_violation(step_ids, action)

def validate_step_ids(step_ids: torch.Tensor, response_mask: torch.Tensor) -> None:
    """Raise :class:`StepLayoutError` naming the first offending sample if a rule is broken."""
    locate_steps(response_mask, step_ids)


def step_ids_from_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` int64 step ids with one step per maximal run of 1s in ``response_mask``.

    Exact for agent loops that put at least one non-action token (observation, tool response,
    chat template) between consecutive actions, which verl's tool agent loop always does.
    """
    return locate_steps(response_mask).step_ids()


def gather_at_step_starts(x: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``[B, K]`` a per-token tensor ``x [B, L]`` read at each step's first token (0 where absent).

    With verl's critic alignment (``values[:, t]`` = V before token t) this is V(s_k).
    """
    if steps.max_steps == 0:
        return x.new_zeros(steps.starts.shape)
    values = torch.gather(x, 1, steps.starts)
    return torch.where(steps.step_mask, values, torch.zeros_like(values))


def _check_per_step_shape(step_values: torch.Tensor, steps: Steps) -> None:
    if step_values.shape != steps.starts.shape:
        raise ValueError(
            f"per-step values have shape {tuple(step_values.shape)}, expected [batch, steps] = "
            f"{tuple(steps.starts.shape)}"
        )


def scatter_to_step_starts(
    x: torch.Tensor, step_values: torch.Tensor, steps: Steps, where: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, L]`` a copy of ``x [B, L]`` with per-step values ``[B, K]`` written at each step's first token.

    The twin of :func:`gather_at_step_starts`, which reads them back. ``where`` (``[B, K]`` bool) writes only
    the steps where it is True; every other token keeps ``x``'s value. Values are cast to ``x``'s dtype.
    """
    _check_per_step_shape(step_values, steps)
    written = steps.step_mask if where is None else where & steps.step_mask
    rows = torch.arange(steps.starts.shape[0], device=steps.starts.device)[:, None].expand_as(steps.starts)
    out = x.clone()
    out[rows[written], steps.starts[written]] = step_values[written].to(x.dtype)
    return out


def after_steps(steps: Steps) -> torch.Tensor:
    """``[B, K]`` the token after each step's last token (one past its span of action tokens; 0 where absent)."""
    ends = steps.starts + step_sums(steps.action, steps)
    return torch.where(steps.step_mask, ends, torch.zeros_like(ends))


def state_value_positions(steps: Steps, offset: int) -> torch.Tensor:
    """``[B, K]`` where V(s_k) is read: ``offset`` tokens before step k's first token (0 where absent).

    Never before the token after step k-1's last token (nor before 0): the value there reads everything up to
    and including step k-1, so the state s_k at most lacks its observation, never a step. With verl's critic
    alignment the value at a position reads the hidden state of the token before it; an ``offset`` of the chat
    template's fixed tokens between an observation and the next step (Qwen2.5: ``<|im_end|>\n<|im_start|>
    assistant\n``, 5 tokens) reads it at the observation's last token instead (``algorithm.steppo.value_offset``).
    """
    if offset == 0:
        return steps.starts
    return _step_start_sources(steps, _state_floors(steps), offset)


def _state_floors(steps: Steps) -> torch.Tensor:
    """``[B, K + 1]`` the earliest position a value of state s_k may be read from: the token after step k-1's last
    (0 for k = 0). Column ``num_steps[b]`` is that of s_K, the state after row b's final step."""
    return F.pad(after_steps(steps), (1, 0))


def _step_start_sources(steps: Steps, floors: torch.Tensor, offset: int) -> torch.Tensor:
    """``[B, K]`` the step starts moved ``offset`` tokens back within ``floors`` (:func:`_state_floors`)."""
    return _moved_back(steps.starts, floors[:, :-1], offset, steps.step_mask)


def _moved_back(positions: torch.Tensor, floors: torch.Tensor, offset: int, keep: torch.Tensor) -> torch.Tensor:
    """``positions`` moved ``offset`` tokens earlier but not before ``floors``; 0 where ``keep`` is False."""
    moved = torch.maximum(positions - offset, floors)
    return torch.where(keep, moved, torch.zeros_like(moved))


def read_state_values(
    values: torch.Tensor, steps: Steps, offset: int, bootstrap_index: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, L]`` ``values`` with each step start holding the value at :func:`state_value_positions`.

    Every reader of V(s_k) (estimators, metrics, records, the step-start value loss) reads step starts; this moves
    the value there once, so none of them needs to know the offset. ``bootstrap_index`` ``[B]`` (the position of
    V(s_K) after a cut-off episode's final step, -1 where none) moves that value the same way, never before the
    token after the final step. ``offset`` 0 returns ``values`` itself.
    """
    if offset == 0 or steps.max_steps == 0:
        return values
    floors = _state_floors(steps)  # one pass over [B, L] serves the step starts and V(s_K)
    moved = scatter_to_step_starts(values, torch.gather(values, 1, _step_start_sources(steps, floors, offset)), steps)
    if bootstrap_index is None:
        return moved
    index = bootstrap_index.to(values.device)[:, None]  # [B, 1]
    final_floor = floors.gather(1, steps.num_steps[:, None])
    source = _moved_back(index, final_floor, offset, index >= 0)
    target = index.clamp(min=0)  # rows without V(s_K) write their own value back at 0
    return moved.scatter(1, target, torch.where(index >= 0, values.gather(1, source), moved.gather(1, target)))


def scatter_to_tokens(step_values: torch.Tensor, steps: Steps, fill: float = 0.0) -> torch.Tensor:
    """Broadcast per-step values ``[B, K]`` to the tokens of each step; ``fill`` elsewhere.

    Returns ``[B, L]`` in the dtype of ``step_values``, each value copied exactly (one
    ``index_select`` through :attr:`Steps.slots`; no arithmetic, so int64 keys stay exact too).
    """
    _check_per_step_shape(step_values, steps)
    table = torch.cat([step_values.new_full((1,), fill), step_values.reshape(-1)])  # [1 + B * K]
    return table.index_select(0, steps.slots.view(-1)).view(steps.slots.shape)


# Rows per block of the float64 prefix sums in _span_sums: blocks of about 2**18 tokens (2 MiB of
# float64) stay in cache and bound the memory, where a float64 copy of the whole batch would cost
# 8 bytes per token (on CPU a fresh, page-faulted allocation that takes longer than the sums).
_PREFIX_BLOCK_TOKENS = 2**18


def _span_sums(
    x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, steps: Steps, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, K]`` sums of ``x`` over token spans ``[lower, upper)`` via float64 prefix sums.

    ``keep`` (``[B, L]`` bool) leaves out the tokens where it is False. In ``torch.sum``'s dtype:
    ``x``'s own, int64 for bool and narrower integers (a sum of bools counts).
    """
    out_dtype = torch.promote_types(x.dtype, torch.int64)
    batch_size, length = x.shape
    # The prefix sum before position p is inclusive[p - 1] (0 for p = 0): read both ends in one gather.
    ends = torch.cat([lower, upper], dim=1)  # [B, 2K]
    before = torch.zeros(ends.shape, dtype=torch.float64, device=x.device)
    read_at = (ends - 1).clamp(min=0)
    rows_per_block = max(1, _PREFIX_BLOCK_TOKENS // max(1, length))
    for first in range(0, batch_size if steps.max_steps else 0, rows_per_block):
        rows = slice(first, first + rows_per_block)
        block = x[rows] if keep is None else x[rows].masked_fill(~keep[rows], 0)
        inclusive = torch.cumsum(block, dim=1, dtype=torch.float64)  # inclusive[t] = sum_{<=t}
        torch.gather(inclusive, 1, read_at[rows], out=before[rows])
    before = torch.where(ends > 0, before, 0.0)
    sums = before[:, steps.max_steps :] - before[:, : steps.max_steps]
    return torch.where(steps.step_mask, sums, 0.0).to(out_dtype)

def step_sums(x: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``[B, K]`` sum of a per-token tensor ``x [B, L]`` over each step's own tokens."""
    return _span_sums(x, steps.starts, steps.next_starts(), steps, keep=steps.action)

def step_means(x: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``[B, K]`` mean of a per-token tensor over each step's own tokens (0 where absent)."""
    counts = step_sums(steps.action.to(x.dtype), steps)
    return step_sums(x, steps) / counts.clamp(min=1)


def step_rewards(token_level_rewards: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``[B, K]`` per-step reward r_k: rewards on step k's tokens and on the non-action tokens after it.

    verl places the outcome score on the last response token, which after a truncation can be an
    observation token; it belongs to the step that led there. A reward that precedes the first
    step is credited to step 0. A sample without steps has no decision to credit.
    """
    lower = steps.starts.clone()
    lower[:, :1] = 0
    return _span_sums(token_level_rewards, lower, steps.next_starts(), steps)

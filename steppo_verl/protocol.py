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
vectorised; per-token work is a handful of passes over ``[B, L]`` with no ``[B, L]`` int64
temporaries (step starts are found with a cumulative count and ``searchsorted``, per-step sums
with prefix sums, per-step values are broadcast with a cumulative sum of jumps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "StepLayoutError",
    "Steps",
    "locate_steps",
    "validate_step_ids",
    "step_ids_from_mask",
    "gather_at_step_starts",
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
    """

    action: torch.Tensor
    starts: torch.Tensor
    step_mask: torch.Tensor
    num_steps: torch.Tensor

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
        columns = torch.arange(self.max_steps, device=self.starts.device, dtype=torch.float64)
        ids = scatter_to_tokens(columns.expand_as(self.starts), self, fill=-1.0)
        return ids.to(torch.int64)


def _fail(sample: int, token: int, rule: str) -> None:
    raise StepLayoutError(f"invalid step_ids in sample {sample} at response token {token}: {rule}")


def _check_any(bad: torch.Tensor, rule: str) -> None:
    if bool(bad.any()):
        sample, token = bad.nonzero()[0].tolist()
        _fail(sample, token, rule)


def _check_ids_agree_with_mask(step_ids: torch.Tensor, response_mask: torch.Tensor, action: torch.Tensor) -> None:
    if step_ids.shape != response_mask.shape:
        raise StepLayoutError(
            f"step_ids has shape {tuple(step_ids.shape)} but response_mask has shape "
            f"{tuple(response_mask.shape)}; both must be [batch, response_length]"
        )
    if step_ids.dtype.is_floating_point or step_ids.dtype.is_complex or step_ids.dtype == torch.bool:
        raise StepLayoutError(f"step_ids must be an integer tensor, got dtype {step_ids.dtype} (R1)")
    _check_any(step_ids < -1, "step ids must be >= -1 (R1)")
    has_id = step_ids >= 0
    if bool((has_id != action).any()):
        _check_any(has_id & ~action, "a token with response_mask == 0 carries a step id; "
                   "observation, tool and padding tokens must have step id -1 (R2)")
        _check_any(~has_id & action, "an action token (response_mask == 1) has no step id (R2)")


def _starts_from_flags(is_start: torch.Tensor, action: torch.Tensor) -> Steps:
    """Turn ``[B, L]`` step-start flags into :class:`Steps` (n-th flag of a row starts step n)."""
    batch_size, length = is_start.shape
    device = is_start.device
    if length == 0:
        empty = torch.zeros(batch_size, 0, dtype=torch.int64, device=device)
        return Steps(action, empty, empty.bool(), torch.zeros(batch_size, dtype=torch.int64, device=device))
    # float32 counts are exact below 2**24 tokens per row, and float cumsum is the fastest scan here.
    started = torch.cumsum(is_start.to(torch.float32), dim=1)
    num_steps = started[:, -1].to(torch.int64)
    max_steps = int(num_steps.max()) if batch_size else 0
    wanted = torch.arange(1, max_steps + 1, device=device, dtype=torch.float32).expand(batch_size, -1).contiguous()
    starts = torch.searchsorted(started, wanted)  # first token where the count reaches k + 1
    step_mask = torch.arange(max_steps, device=device)[None, :] < num_steps[:, None]
    starts = torch.where(step_mask, starts, torch.zeros_like(starts))
    return Steps(action, starts, step_mask, num_steps)


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
    # A step starts on an action token whose predecessor is not of the same step.
    is_start = action.clone()
    if step_ids is None:
        is_start[:, 1:] &= ~action[:, :-1]
        return _starts_from_flags(is_start, action)

    _check_ids_agree_with_mask(step_ids, response_mask, action)
    is_start[:, 1:] &= step_ids[:, 1:] != step_ids[:, :-1]
    steps = _starts_from_flags(is_start, action)
    if steps.max_steps:
        ids_at_starts = torch.gather(step_ids, 1, steps.starts).to(torch.int64)
        expected = torch.arange(steps.max_steps, device=step_ids.device)
        bad = steps.step_mask & (ids_at_starts != expected[None, :])
        if bool(bad.any()):
            sample, run = bad.nonzero()[0].tolist()
            step = int(ids_at_starts[sample, run])
            seen = int(ids_at_starts[sample, :run].max()) if run else -1
            problem = (
                f"step {step} appears again after step {seen} (steps must be contiguous and increasing)"
                if step <= seen
                else f"step {step} follows step {seen} (step ids must not skip numbers; the first step is 0)"
            )
            _fail(sample, int(steps.starts[sample, run]), problem + " (R3)")
    return steps


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


def scatter_to_tokens(step_values: torch.Tensor, steps: Steps, fill: float = 0.0) -> torch.Tensor:
    """Broadcast per-step values ``[B, K]`` to the tokens of each step; ``fill`` elsewhere.

    Returns ``[B, L]`` in the dtype of ``step_values``.
    """
    batch_size, length = steps.action.shape
    out_dtype = step_values.dtype
    if steps.max_steps == 0 or length == 0:
        return torch.full((batch_size, length), fill, dtype=out_dtype, device=step_values.device)
    # Put each step's jump (v_k - v_{k-1}) at its first token and integrate: every token then holds
    # the value of the latest step started at or before it. float64 keeps this exact for float32
    # values (differences and partial sums of float32 numbers are exact in float64).
    values = torch.where(steps.step_mask, step_values.to(torch.float64), 0.0)
    jumps = torch.where(steps.step_mask, values - F.pad(values[:, :-1], (1, 0)), 0.0)
    dense = torch.zeros(batch_size, length, dtype=torch.float64, device=step_values.device)
    dense.scatter_add_(1, steps.starts, jumps)  # absent steps add 0 at token 0
    per_token = dense.cumsum_(dim=1).to(out_dtype)
    return per_token.masked_fill_(~steps.action, fill)


def _span_sums(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``[B, K]`` sums of ``x`` over token spans ``[lower, upper)`` via float64 prefix sums.

    In ``torch.sum``'s dtype: ``x``'s own, int64 for bool and narrower integers (a sum of bools counts).
    """
    out_dtype = torch.promote_types(x.dtype, torch.int64)
    if steps.max_steps == 0:
        return torch.zeros(steps.starts.shape, dtype=out_dtype, device=x.device)
    inclusive = torch.cumsum(x, dim=1, dtype=torch.float64)  # inclusive[t] = sum_{<=t}

    def before(position: torch.Tensor) -> torch.Tensor:  # sum_{<position}
        read = torch.gather(inclusive, 1, (position - 1).clamp(min=0))
        return torch.where(position > 0, read, 0.0)

    sums = before(upper) - before(lower)
    return torch.where(steps.step_mask, sums, 0.0).to(out_dtype)


def step_sums(x: torch.Tensor, steps: Steps) -> torch.Tensor:
    """``[B, K]`` sum of a per-token tensor ``x [B, L]`` over each step's own tokens."""
    return _span_sums(torch.where(steps.action, x, torch.zeros_like(x)), steps.starts, steps.next_starts(), steps)


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

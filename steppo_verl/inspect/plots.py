"""Summary plots of a run's step records as inline SVG strings (no plotting library, no assets).

Only numbers and fixed labels reach the SVG; model text never does. NaN/inf numbers (a diverged
run) are left out of the plots; the trajectory view shows them as text.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from steppo_verl.metrics import critic_state_metrics, explained_variance

__all__ = ["advantage_by_step", "critic_state_error_by_training_step", "explained_variance_by_training_step",
           "steps_histogram"]

_WIDTH, _HEIGHT = 380, 230
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 28, 40
_MAX_POINTS = 3000  # scatter points beyond this are thinned evenly; the means use every step
_TICKS = 5


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _tick_step(low: float, high: float, integer: bool = False) -> float:
    """A 1/2/2.5/5 x 10^n spacing giving about :data:`_TICKS` ticks over ``[low, high]``."""
    raw = max(high - low, 1e-12) / (_TICKS - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    return float(max(1, math.ceil(step))) if integer else step


def _ticks(low: float, high: float, integer: bool = False) -> list[float]:
    step = _tick_step(low, high, integer)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


@dataclass(frozen=True)
class _Axes:
    """Maps data coordinates into the plot area and draws the frame around it."""

    x_min: float
    x_max: float
    y_min: float
    y_max: float

    @classmethod
    def around(cls, xs: list[float], ys: list[float], x_pad: float = 0.0) -> _Axes:
        y_min, y_max = min(ys + [0.0]), max(ys + [0.0])
        if y_max == y_min:
            y_max = y_min + 1.0
        step = _tick_step(y_min, y_max)  # round the y range out to whole ticks
        y_min, y_max = math.floor(y_min / step + 1e-9) * step, math.ceil(y_max / step - 1e-9) * step
        return cls(min(xs) - x_pad, max(xs) + x_pad if max(xs) > min(xs) else min(xs) + 1.0, y_min, y_max)

    def x(self, value: float) -> float:
        return _LEFT + (value - self.x_min) / (self.x_max - self.x_min) * (_WIDTH - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        return _HEIGHT - _BOTTOM - (value - self.y_min) / (self.y_max - self.y_min) * (_HEIGHT - _TOP - _BOTTOM)

    def frame(self, x_ticks: list[float], x_label: str, y_label: str) -> list[str]:
        bottom, right, middle = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT, (_TOP + _HEIGHT - _BOTTOM) / 2
        parts = [_line("axis", _LEFT, bottom, right, bottom), _line("axis", _LEFT, _TOP, _LEFT, bottom)]
        if self.y_min < 0 < self.y_max:
            parts.append(_line("zero", _LEFT, self.y(0), right, self.y(0)))
        y_ticks = _ticks(self.y_min, self.y_max)
        parts += [_text("tick", _LEFT - 4, self.y(v) + 3, _fmt(v), anchor="end") for v in y_ticks]
        parts += [_text("tick", self.x(v), bottom + 14, _fmt(v)) for v in x_ticks]
        parts.append(_text("label", (_LEFT + right) / 2, _HEIGHT - 6, x_label))
        parts.append(_text("label", 12, middle, y_label, extra=f' transform="rotate(-90 12 {middle:.1f})"'))
        return parts


def _line(css: str, x1: float, y1: float, x2: float, y2: float) -> str:
    return f'<line class="{css}" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"/>'


def _text(css: str, x: float, y: float, content: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text class="{css}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{content}</text>'


def _svg(title: str, body: list[str]) -> str:
    return (
        f'<svg class="plot" viewBox="0 0 {_WIDTH} {_HEIGHT}" width="{_WIDTH}" height="{_HEIGHT}" '
        f'role="img" aria-label="{title}">' + _text("title", _WIDTH / 2, 16, title) + "".join(body) + "</svg>"
    )


def _empty(title: str, reason: str) -> str:
    return _svg(title, [_text("label", _WIDTH / 2, _HEIGHT / 2, reason)])


def _polyline(axes: _Axes, xs: list[float], ys: list[float], css: str) -> str:
    points = " ".join(f"{axes.x(x):.1f},{axes.y(y):.1f}" for x, y in zip(xs, ys))
    dots = "".join(f'<circle class="{css}" cx="{axes.x(x):.1f}" cy="{axes.y(y):.1f}" r="3"/>' for x, y in zip(xs, ys))
    return f'<polyline class="{css}" fill="none" points="{points}"/>' + dots


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def advantage_by_step(records: list[dict]) -> str:
    """Every step's finite advantage against its step index k, with the mean per k."""
    title = "Advantage by step index"
    records = [r for r in records if _finite(r["advantage"])]
    if not records:
        return _empty(title, "no steps with a finite advantage")
    by_step: dict[int, list[float]] = defaultdict(list)
    for record in records:
        by_step[record["step"]].append(record["advantage"])
    ks = sorted(by_step)
    all_advantages = [a for k in ks for a in by_step[k]]
    axes = _Axes.around([float(k) for k in ks], all_advantages, x_pad=0.5)
    stride = max(1, math.ceil(len(records) / _MAX_POINTS))
    # Spread the points of one k sideways (deterministically) so that equal values stay visible.
    dots = [
        f'<circle class="point" cx="{axes.x(r["step"] + ((i * 0.618) % 1 - 0.5) * 0.5):.1f}" '
        f'cy="{axes.y(r["advantage"]):.1f}" r="1.8"/>'
        for i, r in enumerate(records[::stride])
    ]
    means = [sum(by_step[k]) / len(by_step[k]) for k in ks]
    body = axes.frame(_ticks(ks[0], ks[-1], integer=True), "step index k", "advantage A_k") + dots
    return _svg(title, body + [_polyline(axes, [float(k) for k in ks], means, "mean")])


def explained_variance_by_training_step(records: list[dict]) -> str:
    """Explained variance of the step returns by V(s_k), per training step (each step counted once)."""
    title = "Value explained variance"
    by_training_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        if _finite(record["value"]) and _finite(record["return"]):
            by_training_step[record["training_step"]].append((record["value"], record["return"]))
    points = {}
    for training_step, pairs in sorted(by_training_step.items()):
        values, returns = torch.tensor(pairs, dtype=torch.float64).unbind(dim=1)
        variance = explained_variance(values, returns)
        if math.isfinite(variance):
            points[float(training_step)] = variance
    if not points:
        return _empty(title, "no critic values (or returns without variance)")
    xs, ys = list(points), list(points.values())
    axes = _Axes.around(xs, ys + [1.0], x_pad=0.5)
    ticks = _ticks(xs[0], xs[-1], integer=True)
    return _svg(title, axes.frame(ticks, "training step", "explained variance") + [_polyline(axes, xs, ys, "mean")])


def critic_state_error_by_training_step(records: list[dict]) -> str:
    """The critic's visit-weighted |mean V - mean outcome| at repeated states, per training step
    (:func:`steppo_verl.metrics.critic_state_metrics` over the dumped trajectories' step starts), with the floor
    (dashed) that a critic knowing the true values would show on the same few returns per state."""
    title = "Critic error at repeated states"
    by_training_step: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for record in records:
        value, outcome, key = record.get("value"), record.get("outcome"), record.get("state_key")
        if key is not None and _finite(value) and _finite(outcome):
            by_training_step[record["training_step"]].append((value, outcome, key))
    points, floors = {}, {}
    for training_step, rows in sorted(by_training_step.items()):
        values = torch.tensor([[v] for v, _, _ in rows], dtype=torch.float64)
        outcomes = torch.tensor([[o] for _, o, _ in rows], dtype=torch.float64)
        keys = torch.tensor([[k] for _, _, k in rows], dtype=torch.int64)
        metrics = critic_state_metrics(values, outcomes, keys, torch.ones_like(keys, dtype=torch.bool))
        if "steppo/critic/state_abs_error" in metrics:
            points[float(training_step)] = metrics["steppo/critic/state_abs_error"]
            floors[float(training_step)] = metrics["steppo/critic/state_abs_error_floor"]
    if not points:
        return _empty(title, "no critic values at repeated states")
    xs, ys, floor = list(points), list(points.values()), list(floors.values())
    axes = _Axes.around(xs, ys + floor, x_pad=0.5)
    ticks = _ticks(xs[0], xs[-1], integer=True)
    lines = [_polyline(axes, xs, floor, "floor"), _polyline(axes, xs, ys, "mean")]
    return _svg(title, axes.frame(ticks, "training step", "|V - outcome|") + lines)


def steps_histogram(num_steps: list[int]) -> str:
    """How many trajectories took how many steps."""
    title = "Steps per trajectory"
    if not num_steps:
        return _empty(title, "no trajectories")
    counts: dict[int, int] = defaultdict(int)
    for n in num_steps:
        counts[n] += 1
    low, high = min(counts), max(counts)
    most = max(counts.values())
    step = _tick_step(0, most, integer=True)
    axes = _Axes(low - 0.5, high + 0.5, 0.0, math.ceil(most / step) * step)
    half_width = 0.4 * (axes.x(1) - axes.x(0))
    bars = [
        f'<rect class="bar" x="{axes.x(n) - half_width:.1f}" y="{axes.y(c):.1f}" '
        f'width="{2 * half_width:.1f}" height="{axes.y(0) - axes.y(c):.1f}"><title>{n} steps: {c}</title></rect>'
        for n, c in sorted(counts.items())
    ]
    return _svg(title, axes.frame(_ticks(low, high, integer=True), "steps", "trajectories") + bars)

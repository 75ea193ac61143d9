"""A pure-Python toy environment for tests and examples: a corridor with a key, a locked door and a pit.

Cells ``0 .. length-1``; cell 0 is a pit, the last cell has a locked door, the key lies in cell
``key_at``; the player starts in cell ``start``. Actions (case and surrounding spaces ignored):
``left``, ``right``, ``take key``, ``open door``. Opening the door with the key wins (reward 1,
terminated); stepping into the pit loses (reward 0, terminated); anything else costs nothing. With
``max_steps`` the environment cuts the episode itself after that many actions (``truncated``), as
TextWorld's step limit does. The state is known exactly: its key hashes the layout, the position and
whether the key is held, so the same state of the same corridor has the same key in every trajectory.
"""

from __future__ import annotations

from typing import Any

from steppo_verl.envs.actions import invalid_action_text
from steppo_verl.envs.base import Environment, StepResult, register_env
from steppo_verl.state_keys import state_key

__all__ = ["CorridorEnv"]

ACTIONS = ("left", "right", "take key", "open door")
_DEFAULT_TASK = {"length": 5, "key_at": 2, "start": 1}


@register_env("corridor")
class CorridorEnv(Environment):
    """The corridor game; ``max_steps`` (None: no limit) is the environment's own step budget."""

    def __init__(self, max_steps: int | None = None):
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"CorridorEnv max_steps must be a positive int or None, got {max_steps!r}")
        self.max_steps = max_steps
        self._layout: tuple[int, int] | None = None  # (length, key_at)
        self._position = 0
        self._has_key = False
        self._steps = 0
        self._over = True

    def reset(self, task: dict[str, Any]) -> StepResult:
        """Start a corridor; ``task`` may set ``length`` (>= 3), ``key_at`` and ``start`` (cells 1 .. length-1)."""
        layout = _checked_task(task)
        self._layout = (layout["length"], layout["key_at"])
        self._position, self._has_key, self._steps, self._over = layout["start"], False, 0, False
        return self._result(self._describe())

    def step(self, action: str) -> StepResult:
        if self._over:
            raise RuntimeError("CorridorEnv.step after the episode ended (or before reset); call reset first")
        self._steps += 1
        command = " ".join(action.lower().split())
        if command not in ACTIONS:
            return self._result(invalid_action_text(f"{action!r}; valid actions: {', '.join(ACTIONS)}"))
        return getattr(self, "_" + command.replace(" ", "_"))()

    def _left(self) -> StepResult:
        self._position -= 1
        if self._position == 0:
            return self._result("You fall into the pit. You lost.", terminated=True)
        return self._result(self._describe())

    def _right(self) -> StepResult:
        length, _ = self._layout
        if self._position == length - 1:
            return self._result("A wall blocks the way. " + self._describe())
        self._position += 1
        return self._result(self._describe())

    def _take_key(self) -> StepResult:
        _, key_at = self._layout
        if self._has_key or self._position != key_at:
            return self._result("There is no key here. " + self._describe())
        self._has_key = True
        return self._result("You take the key. " + self._describe())

    def _open_door(self) -> StepResult:
        length, _ = self._layout
        if self._position != length - 1:
            return self._result("There is no door here. " + self._describe())
        if not self._has_key:
            return self._result("The door is locked. " + self._describe())
        return self._result("The door opens. You won!", reward=1.0, terminated=True)

    def _describe(self) -> str:
        length, key_at = self._layout
        sights = []
        if self._position == key_at and not self._has_key:
            sights.append("a key")
        if self._position == length - 1:
            sights.append("a locked door")
        seen = f" You see {' and '.join(sights)}." if sights else ""
        held = " You hold the key." if self._has_key else ""
        return f"You are in cell {self._position} of a corridor of {length} cells; cell 0 is a pit.{seen}{held}"

    def _result(self, observation: str, reward: float = 0.0, terminated: bool = False) -> StepResult:
        truncated = not terminated and self.max_steps is not None and self._steps >= self.max_steps
        self._over = terminated or truncated
        won = terminated and reward > 0
        return StepResult(
            observation=observation,
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            state_key=state_key(["corridor", *self._layout, self._position, self._has_key]),
            info={"won": won, "lost": terminated and not won, "steps": self._steps},
        )


def _checked_task(task: dict[str, Any]) -> dict[str, int]:
    """The corridor ``task`` asks for, over the defaults; ValueError naming a field that is wrong."""
    unknown = set(task) - set(_DEFAULT_TASK)
    if unknown:
        raise ValueError(f"corridor task: unknown fields {sorted(unknown)}; valid fields: {sorted(_DEFAULT_TASK)}")
    layout = {**_DEFAULT_TASK, **task}
    for name, value in layout.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"corridor task: {name} must be an int, got {value!r}")
    if layout["length"] < 3:
        raise ValueError(f"corridor task: length must be at least 3, got {layout['length']}")
    for name in ("key_at", "start"):
        if not 1 <= layout[name] < layout["length"]:
            raise ValueError(f"corridor task: {name} must be in 1 .. {layout['length'] - 1}, got {layout[name]}")
    return layout

"""The environment interface the environment agent loop drives (DESIGN.md section 9), and its registry.

An :class:`Environment` is synchronous and holds one episode: the loop builds one instance per trajectory
(:func:`make_env`), calls :meth:`Environment.reset` with the sample's task, then :meth:`Environment.step`
with each action text, each call in a worker thread so a slow environment never blocks the event loop,
and :meth:`Environment.close` when the trajectory ends, however it ends.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from steppo_verl.dotted_path import load_dotted
from steppo_verl.state_keys import KEY_BITS, state_key

__all__ = ["ENVIRONMENTS", "Environment", "StepResult", "make_env", "register_env"]


@dataclass(frozen=True)
class StepResult:
    """What the environment answers to a reset or an action.

    Attributes:
        observation: the text the policy sees next.
        reward: the environment's reward for this action (0 for a reset).
        terminated: the episode is over (won, lost): nothing follows to bootstrap from.
        truncated: the environment cut the episode for its own reasons (its step budget); the state is
            not terminal, so the return may bootstrap from the critic (``env_truncated`` ending).
        state_key: the key of the state the environment is now in: exact where the environment knows its
            state (hash it with :func:`steppo_verl.state_keys.state_key`), else left None and filled with
            the key of ``observation``. A 48-bit non-negative int.
        info: anything else (won, score, admissible commands); the loop records the last one.
    """

    observation: str
    reward: float = 0.0
    terminated: bool = False
    truncated: bool = False
    state_key: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.observation, str):
            raise TypeError(f"StepResult.observation must be a str, got {type(self.observation).__name__}")
        if not isinstance(self.reward, (int, float)) or not math.isfinite(self.reward):
            raise ValueError(f"StepResult.reward must be a finite number, got {self.reward!r}")
        if self.state_key is None:
            object.__setattr__(self, "state_key", state_key(self.observation))
        elif not isinstance(self.state_key, int) or not 0 <= self.state_key < 2**KEY_BITS:
            raise ValueError(
                f"StepResult.state_key must be an int in [0, 2**{KEY_BITS}) (exact through the step protocol), "
                f"got {self.state_key!r}; hash an exact state with steppo_verl.state_keys.state_key"
            )
        object.__setattr__(self, "reward", float(self.reward))


class Environment(ABC):
    """One episode of a text environment: free-text actions in, :class:`StepResult` out."""

    @abstractmethod
    def reset(self, task: dict[str, Any]) -> StepResult:
        """Start the episode ``task`` describes (the sample's ``extra_info["env_task"]``); its first observation."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Apply ``action`` (the parsed action text). An action the environment does not understand is
        answered with an ``"invalid action: ..."`` observation, not an exception: an exception means the
        environment itself failed."""

    def close(self) -> None:  # noqa: B027  (optional hook: most environments hold nothing to release)
        """Release what the episode holds (processes, files); called once, however the trajectory ended."""


ENVIRONMENTS: dict[str, type[Environment]] = {}


def register_env(name: str) -> Callable[[type[Environment]], type[Environment]]:
    """Class decorator: make an environment constructible by ``{"name": name, ...}`` in :func:`make_env`."""

    def decorator(cls: type[Environment]) -> type[Environment]:
        if name in ENVIRONMENTS and ENVIRONMENTS[name] is not cls:
            raise ValueError(f"environment name {name!r} is already registered to {ENVIRONMENTS[name].__qualname__}")
        ENVIRONMENTS[name] = cls
        return cls

    return decorator


def make_env(spec: Mapping[str, Any]) -> Environment:
    """A new environment from ``spec``: ``{"name": <registered name>, **kwargs}`` or
    ``{"class": "package.module.Class", **kwargs}``; the other keys are the constructor's arguments.

    (``class``, not hydra's ``_target_``: hydra would build the environment when it builds the agent loop.)

    Raises ValueError for a spec naming no class, both ways, or an unknown name; TypeError when the class
    is not an :class:`Environment`.
    """
    kwargs = dict(spec)
    name, path = kwargs.pop("name", None), kwargs.pop("class", None)
    if (name is None) == (path is None):
        raise ValueError(f"an environment spec needs exactly one of 'name' or 'class', got {dict(spec)!r}")
    cls = _registered(name) if name is not None else _imported(path)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise TypeError(f"environment {name or path!r} is {cls!r}, not a subclass of steppo_verl.envs.Environment")
    return cls(**kwargs)


def _registered(name: str) -> type[Environment]:
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; registered: {sorted(ENVIRONMENTS)} (or give 'class')")
    return ENVIRONMENTS[name]


def _imported(path: str) -> Any:
    try:
        return load_dotted(path)
    except ValueError:
        raise ValueError(f"environment 'class' must be 'package.module.Class', got {path!r}") from None

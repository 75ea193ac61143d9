"""Text environments for the environment agent loop (``steppo_env_agent``, :mod:`steppo_verl.env_loop`).

- :class:`Environment`: ``reset(task) -> StepResult``, ``step(action_text) -> StepResult``, ``close()``.
- :class:`StepResult`: observation text, the action's reward, ``terminated``, ``truncated``, the state key,
  ``info``.
- :func:`make_env`: one instance per trajectory from ``{"name": ..., **kwargs}`` (:func:`register_env`) or
  ``{"class": "package.module.Class", **kwargs}``.
- :func:`parse_action`: the action in an assistant turn (``<action>...</action>`` or the whole turn).
- ``corridor`` (:class:`CorridorEnv`): a pure-Python toy with exact state keys, for tests.

The modules here need neither verl nor torch.
"""

from steppo_verl.envs.actions import InvalidAction, action_text, check_action_tag, invalid_action_text, parse_action
from steppo_verl.envs.base import ENVIRONMENTS, Environment, StepResult, make_env, register_env
from steppo_verl.envs.corridor import CorridorEnv

__all__ = [
    "ENVIRONMENTS",
    "CorridorEnv",
    "Environment",
    "InvalidAction",
    "StepResult",
    "action_text",
    "check_action_tag",
    "invalid_action_text",
    "make_env",
    "parse_action",
    "register_env",
]

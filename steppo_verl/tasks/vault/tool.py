"""The ``open_door`` tool of the vault task (:mod:`steppo_verl.tasks.vault.prepare`): an adapter over the
vault environment (:class:`steppo_verl.tasks.vault.env.VaultEnv`), whose observations it returns unchanged.

In each room the model opens one door, ``{"door": "red"}``. The path (rooms, right doors, code) comes with each
dataset row as the tool's ``create_kwargs``; verl creates and releases a tool instance around every single call,
so each trajectory's environment is kept keyed by verl's ``AgentData`` (weakly: the entry goes with the
trajectory; a branch of a branching rollout gets a copy of its parent's, ``on_branch``). The environment agent
loop needs no such key: it holds one :class:`VaultEnv` per trajectory.

``execute`` never raises: arguments it cannot use come back as an observation saying what is wrong, and
the position does not change. Every call's reward is 0; the outcome reward is the QA reward on the code.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from steppo_verl.tasks.vault.env import VaultEnv


def schema_doors(tool_schema: OpenAIFunctionToolSchema) -> tuple[str, ...]:
    """The doors the tool yaml declares (the ``enum`` of the ``door`` parameter): written once, there."""
    door = tool_schema.function.parameters.properties.get("door")
    if door is None or not door.enum:
        raise ValueError("vault tool: the tool_schema must declare a `door` parameter with an enum of doors")
    return tuple(door.enum)


def parse_door(parameters: Any, doors: tuple[str, ...]) -> str:
    """The door named in the model's arguments; raises ValueError with the message the model is shown."""
    door = parameters.get("door") if isinstance(parameters, dict) else None
    if door not in doors:
        raise ValueError(f"Invalid arguments: give {{\"door\": ...}} with one of {', '.join(doors)}.")
    return door


class VaultTool(BaseTool):
    """verl ``BaseTool`` for ``open_door``; declared by ``steppo_verl/tasks/vault/vault_tool.yaml``."""

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None) -> None:
        if tool_schema is None:
            raise ValueError("vault tool: the tool yaml must give a tool_schema (see steppo_verl/config)")
        super().__init__(config, tool_schema)
        self.doors = schema_doors(tool_schema)
        self._create_kwargs: dict[str, dict[str, Any]] = {}
        self._envs: weakref.WeakKeyDictionary[Any, VaultEnv] = weakref.WeakKeyDictionary()

    async def create(self, instance_id: str | None = None, **kwargs: Any) -> tuple[str, ToolResponse]:
        instance_id, response = await super().create(instance_id)
        self._create_kwargs[instance_id] = kwargs.get("create_kwargs") or {}
        return instance_id, response

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs: Any
    ) -> tuple[ToolResponse, float, dict[str, Any]]:
        """Open the door in ``parameters`` on this trajectory's path; returns ``(observation, 0.0, metrics)``."""
        agent_data = kwargs.get("agent_data")
        if agent_data is None:
            return ToolResponse(text="The vault tool runs inside verl's tool agent loop only."), 0.0, {}
        try:
            env = self._envs.get(agent_data)
            if env is None:
                env = self._start(agent_data, instance_id)
            result = env.step(parse_door(parameters, self.doors))
        except ValueError as problem:
            return ToolResponse(text=str(problem)), 0.0, {"invalid": True}
        metrics = {"invalid": False, "position": env.path.position, "state": env.path.state}
        return ToolResponse(text=result.observation), 0.0, metrics

    def _start(self, agent_data: Any, instance_id: str) -> VaultEnv:
        """The trajectory's environment in its first room (the prompt shows that room: its text is not needed)."""
        env = VaultEnv(self.doors)
        env.reset(self._create_kwargs.get(instance_id, {}))
        self._envs[agent_data] = env
        return env

    def on_branch(self, parent_agent_data: Any, child_agent_data: Any) -> None:
        """A branch of steppo_agent's branching rollouts continues from a copy of its parent's position."""
        env = self._envs.get(parent_agent_data)
        if env is not None:
            self._envs[child_agent_data] = copy.deepcopy(env)

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._create_kwargs.pop(instance_id, None)


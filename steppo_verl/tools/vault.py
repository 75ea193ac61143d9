"""The ``open_door`` tool of the vault task (:mod:`steppo_verl.data.vault`): a small stateful environment.

An episode walks a path of rooms. In each room the model opens one door, ``{"door": "red"}``: the right
door leads to the next room (or, from the last room, opens the vault and shows its code); any other door
leads to a dead end that no later door leaves. The path (rooms, right doors, code) comes with each dataset
row as the tool's ``create_kwargs``; verl creates and releases a tool instance around every single call,
so the position along the path is kept per trajectory, keyed by verl's ``AgentData`` (weakly: the entry
goes with the trajectory).

``execute`` never raises: arguments it cannot use come back as an observation saying what is wrong, and
the position does not change. Every call's reward is 0; the outcome reward is the QA reward on the code.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

DEAD_END = -1


@dataclass
class VaultPath:
    """One episode's path: ``rooms[i]``'s right door is ``doors[i]``; past the last room is the vault."""

    rooms: list[str]
    doors: list[str]
    code: str
    position: int = 0  # index into rooms; len(rooms) once the vault is open; DEAD_END after a wrong door

    def __post_init__(self) -> None:
        if not self.rooms or len(self.rooms) != len(self.doors):
            raise ValueError(f"vault path: need one right door per room, got {self.rooms} and {self.doors}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> VaultPath:
        """The path from a row's ``create_kwargs`` (parquet may hand lists back as arrays)."""
        try:
            return cls(rooms=[str(r) for r in kwargs["rooms"]], doors=[str(d) for d in kwargs["doors"]],
                       code=str(kwargs["code"]))
        except KeyError as missing:
            raise ValueError(f"vault path: create_kwargs lacks {missing}; it needs rooms, doors and code") from None

    def open(self, door: str) -> str:
        """Open ``door`` where the episode stands; returns the observation."""
        if self.position == len(self.rooms):
            return vault_observation(self.code)
        if self.position == DEAD_END or door != self.doors[self.position]:
            self.position = DEAD_END
            return "Dead end."
        self.position += 1
        if self.position == len(self.rooms):
            return vault_observation(self.code)
        return f"You are in room {self.rooms[self.position]}."


def vault_observation(code: str) -> str:
    """What the open vault shows: its code, the proof of opening that the reward looks for."""
    return f"Vault open. Code: {code}."



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
    """verl ``BaseTool`` for ``open_door``; declared by ``steppo_verl/config/vault_tool.yaml``."""

    def __init__(self, config: dict[str, Any], tool_schema: OpenAIFunctionToolSchema | None) -> None:
        if tool_schema is None:
            raise ValueError("vault tool: the tool yaml must give a tool_schema (see steppo_verl/config)")
        super().__init__(config, tool_schema)
        self.doors = schema_doors(tool_schema)
        self._create_kwargs: dict[str, dict[str, Any]] = {}
        self._paths: weakref.WeakKeyDictionary[Any, VaultPath] = weakref.WeakKeyDictionary()

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
            path = self._paths.get(agent_data)
            if path is None:
                path = self._paths[agent_data] = VaultPath.from_kwargs(self._create_kwargs.get(instance_id, {}))
            observation = path.open(parse_door(parameters, self.doors))
        except ValueError as problem:
            return ToolResponse(text=str(problem)), 0.0, {"invalid": True}
        return ToolResponse(text=observation), 0.0, {"invalid": False, "position": path.position}

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        self._create_kwargs.pop(instance_id, None)


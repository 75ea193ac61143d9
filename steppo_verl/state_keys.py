"""Keys of the states steps are taken from (``step_keys``), shared by the agent loops and the environments.

A key names a state for GiGPO's anchor groups and the critic diagnostic: two steps with equal keys were
taken from the same state. Keys are 48-bit non-negative integers so that they stay exact through the
float64 scatter and gather of the step protocol. Pure Python: environments import it without verl or torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["KEY_BITS", "state_key", "tool_states_key"]

KEY_BITS = 48  # keys stay exact through float64 scatter/gather


def state_key(content: Any) -> int:
    """A stable 48-bit key of ``content`` (an observation, or an exact state: any JSON-serialisable value)."""
    digest = hashlib.blake2b(json.dumps(content, sort_keys=True, default=str).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - KEY_BITS)


def tool_states_key(states: list[Any]) -> int:
    """The key of the state a step's tool calls reached, from the exact states their tools report
    (``metrics["state"]``): parallel calls finish in any order, so it keys the set of them."""
    return state_key({"tool_states": sorted(states, key=repr)})

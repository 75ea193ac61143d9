"""How an episode ended, and what that means for the critic: the one endings policy (DESIGN.md section 7).

Agent loops report *why* an episode ended (:class:`Ending`); :class:`EndingPolicy` alone decides whether
that ending is terminal (the value after the last step is 0) or a cut-off that bootstraps from the
critic's V(s_K). Trainer and estimators only consume the decision (the ``truncated`` step field) and
never re-derive it.

Defaults (``bootstrap_endings`` = ``timeout``, ``env_truncated``):

============== ========= ==========================================================================
ending         terminal  why
============== ========= ==========================================================================
answer         yes       the model ended the episode (answered, or stopped without a tool call)
env_done       yes       the environment says the episode is over (won, lost)
turn_limit     yes       the limit is part of the task the policy sees: bootstrapping it lets a
                         policy that loops until the limit keep the critic's guess as its outcome
length_limit   yes       likewise; a runaway response then earns the reward it got (usually 0), so
                         its step advantage is negative instead of ~0 (measured on the vault task:
                         bootstrapped runaways went unpunished and entropy blew up)
timeout        no        wall-clock time ran out for reasons outside the policy
env_truncated  no        the environment cut the episode for its own reasons (its step budget)
============== ========= ==========================================================================

A task overrides the set in its agent-loop yaml (``bootstrap_endings: [...]``). Where the state after
the last step is incomplete (a length cut: the observation or the step itself did not fit), a
bootstrapping ending has no V(s_K) position and the trainer reads the value before the row's last token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = ["DEFAULT_BOOTSTRAP_ENDINGS", "Ending", "EndingPolicy"]


class Ending(str, Enum):
    """Why an episode ended, as an agent loop observed it."""

    ANSWER = "answer"
    ENV_DONE = "env_done"
    TURN_LIMIT = "turn_limit"
    LENGTH_LIMIT = "length_limit"
    TIMEOUT = "timeout"
    ENV_TRUNCATED = "env_truncated"

    @property
    def code(self) -> int:
        """A stable small integer for tensor fields (the member's position in this enum)."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Ending:
        return _MEMBERS[int(code)]


_MEMBERS = tuple(Ending)
_CODES = {ending: code for code, ending in enumerate(_MEMBERS)}

DEFAULT_BOOTSTRAP_ENDINGS = (Ending.TIMEOUT, Ending.ENV_TRUNCATED)
# Endings after which the state s_K is complete (the last observation was appended), so an agent loop can
# leave a position whose critic value is V(s_K).
_COMPLETE_STATE = frozenset({Ending.TURN_LIMIT, Ending.TIMEOUT, Ending.ENV_TRUNCATED})
# The policy itself ended these: nothing remains to bootstrap, whatever a config says.
_ALWAYS_TERMINAL = frozenset({Ending.ANSWER, Ending.ENV_DONE})


@dataclass(frozen=True)
class EndingPolicy:
    """Which endings bootstrap V(s_K); every other ending is terminal (V after the last step = 0)."""

    bootstrap_endings: frozenset[Ending] = frozenset(DEFAULT_BOOTSTRAP_ENDINGS)

    @classmethod
    def from_names(cls, names: Iterable[str] | None) -> EndingPolicy:
        """The policy from a config list of ending names; ``None`` gives the defaults.

        Raises ValueError for an unknown name, a bare string instead of a list, or an ending that cannot
        bootstrap (``answer``, ``env_done``: the episode is over).
        """
        if names is None:
            return cls()
        if isinstance(names, str):
            raise ValueError(f"bootstrap_endings must be a list of ending names, got the string {names!r}")
        valid = [e.value for e in Ending]
        endings = set()
        for name in names:
            if name not in valid:
                raise ValueError(f"bootstrap_endings: unknown ending {name!r}; valid endings: {valid}")
            ending = Ending(name)
            if ending in _ALWAYS_TERMINAL:
                raise ValueError(
                    f"bootstrap_endings: {name!r} ends the episode (nothing follows it to bootstrap from); "
                    f"choose among {[e.value for e in Ending if e not in _ALWAYS_TERMINAL]}"
                )
            endings.add(ending)
        return cls(frozenset(endings))

    def bootstraps(self, ending: Ending) -> bool:
        """True: the episode was cut off and its return continues with V(s_K); False: terminal."""
        return ending in self.bootstrap_endings

    def has_bootstrap_position(self, ending: Ending) -> bool:
        """True where the loop should leave a V(s_K) position: a bootstrapping ending with a complete state."""
        return self.bootstraps(ending) and ending in _COMPLETE_STATE

"""From an assistant turn to the action an environment receives.

With an action tag (default ``action``) the action is the text inside the turn's last
``<action>...</action>``, so the model may reason before it acts; without one (``action_tag: null``) it is
the whole turn, stripped. A turn with no action is not sent to the environment: the loop answers it with
:func:`invalid_action_text` and the state stays where it was. So is an action that is not one line of text: a
control character (a byte token such as NUL decodes to one) or a line break inside it, or an unpaired surrogate.
Why: the text goes to programs that read it as a command line. TextWorld's interpreter (Jericho's frotz) crashes
the whole process on a NUL, and would run the part after a line break as the next command.
"""

from __future__ import annotations

import re

__all__ = ["InvalidAction", "action_text", "check_action_tag", "invalid_action_text", "parse_action"]


# C0 controls but the tab (line breaks included), DEL, C1 controls, and surrogates (not encodable as UTF-8).
_UNSENDABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


class InvalidAction(ValueError):
    """The assistant turn holds no usable action; the message says why, for the model to read."""


def check_action_tag(action_tag: str | None) -> str | None:
    """``action_tag`` if it can name a tag (letters, digits, ``_``, ``-``) or is None; else ValueError."""
    if action_tag is not None and not (isinstance(action_tag, str) and re.fullmatch(r"[\w-]+", action_tag)):
        raise ValueError(f"action_tag must be a tag name such as 'action' (null: the whole turn), got {action_tag!r}")
    return action_tag


def parse_action(text: str, action_tag: str | None = "action") -> str:
    """The action in assistant turn ``text``.

    Args:
        text: the decoded assistant turn (special tokens removed).
        action_tag: the tag around the action; None takes the whole turn.

    Raises:
        InvalidAction: no complete ``<tag>...</tag>`` in the turn, or an empty action.
    """
    if action_tag is None:
        action = text.strip()
    else:
        tagged = re.findall(rf"<{re.escape(action_tag)}>(.*?)</{re.escape(action_tag)}>", text, flags=re.DOTALL)
        if not tagged:
            raise InvalidAction(f"write your action inside <{action_tag}>...</{action_tag}>")
        action = tagged[-1].strip()
    if not action:
        raise InvalidAction("the action is empty")
    unsendable = _UNSENDABLE.search(action)
    if unsendable:
        raise InvalidAction(
            f"the action must be one line of text without control characters; it has U+{ord(unsendable.group()):04X} "
            f"at character {unsendable.start()}"
        )
    return action


def action_text(action: str, action_tag: str = "action") -> str:
    """An assistant turn that :func:`parse_action` reads as ``action`` (e.g. a demonstration's turn)."""
    return f"<{action_tag}>{action}</{action_tag}>"


def invalid_action_text(reason: str) -> str:
    """The observation for an action the environment cannot take (the parser's or the environment's)."""
    return f"invalid action: {reason}"

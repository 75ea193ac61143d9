"""Text from outside the policy made safe to enter a prompt: encodable, and unable to forge control tokens.

Tool observations carry text nobody vetted: the model's own arguments echoed back (a query may hold a lone
surrogate, which JSON escapes such as ``"\\ud800"`` decode to and which a tokenizer refuses with a TypeError),
and corpus passages (which may quote ``<|im_end|><|im_start|>assistant``; tokenized as is, that string becomes
real turn markers and corrupts the step layout). :func:`prompt_safe` fixes both, and the step agent loop
applies it to every tool observation where it enters the conversation.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["control_strings", "encodable", "neutralise", "prompt_safe"]

# Invisible, kept by the normalizers of the chat tokenizers we target (byte-level BPE, NFC), and part of
# no control token, so it splits one without changing what a reader sees.
_SPLITTER = "\u200b"  # zero-width space


def encodable(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so that it encodes as UTF-8.

    A surrogate pair held as two code points (as some decoders leave it) is joined into its character
    rather than replaced. Text that already encodes is returned as is.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def control_strings(tokenizer: Any) -> tuple[str, ...]:
    """The strings ``tokenizer`` turns into one reserved id: its special and added tokens, longest first.

    Added tokens count even when not "special": in Qwen2.5, ``<tool_call>`` and ``<tool_response>`` are
    plain added tokens, yet the tool parser and the chat template give them meaning. Added tokens that are
    plain words (letters and digits, maybe after a space: a vocabulary extension such as the vault's room
    names) are left out: they mark no structure, and splitting them would show the policy a spelling of the
    word it never writes itself (the vault's room tokens, split in every observation, hid the room from a
    policy trained to read it). Single characters are left out too: inserting into them is impossible, and
    the chat tokenizers we target reserve none.
    """
    added = {token.content for token in tokenizer.added_tokens_decoder.values() if not _plain_word(token)}
    strings = (added | set(tokenizer.all_special_tokens)) - {""}
    return tuple(sorted((s for s in strings if len(s) > 1), key=lambda s: (-len(s), s)))


def _plain_word(token: Any) -> bool:
    """Whether an added token is an ordinary word: not special, letters and digits after optional spaces."""
    return not token.special and token.content.lstrip(" ").isalnum()


@functools.lru_cache(maxsize=16)
def _control_pattern(strings: tuple[str, ...]) -> re.Pattern[str] | None:
    # Longest first, so that "<|im_end|>" is neutralised whole where a shorter token is its prefix.
    return re.compile("|".join(re.escape(s) for s in strings)) if strings else None


def neutralise(text: str, strings: tuple[str, ...]) -> str:
    """``text`` with a zero-width space after each character of every occurrence of ``strings``.

    One left-to-right pass suffices: a control string left in the result would have to avoid every
    inserted space, so it would lie in text the pass scanned (or end on the first character of an
    occurrence it rewrote) and would have been found there first.
    """
    pattern = _control_pattern(strings)
    if pattern is None:
        return text
    return pattern.sub(lambda match: "".join(char + _SPLITTER for char in match[0]), text)


def prompt_safe(text: str, tokenizer: Any) -> str:
    """``text`` made encodable, with the tokenizer's control strings neutralised to plain text."""
    return neutralise(encodable(text), control_strings(tokenizer))

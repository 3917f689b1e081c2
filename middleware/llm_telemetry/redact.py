"""Redaction and size capping for prompt and completion text recorded on spans (content capture is opt-in).

A redactor is any ``Callable[[str], str]``. The default, :func:`redact`, masks the things most often pasted
into prompts by accident: e-mail addresses, API keys and tokens, and card-like digit runs. It is a safety net,
not a guarantee; pass your own function (``LLMTelemetryMiddleware(app, redact=my_redactor)``) for stricter rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from .labels import SECRET_KEYS, valid_text

Redactor = Callable[[str], str]

#: What a masked value is replaced with; the bracketed word says what kind of value was there.
EMAIL_MASK: Final = "[email]"
KEY_MASK: Final = "[key]"
CARD_MASK: Final = "[card]"
#: Appended to content cut at the size cap. ASCII: one character beyond Latin-1 makes CPython store the whole
#: message's JSON text at two bytes a character, and a span queued for export holds several such messages.
TRUNCATION_MARK: Final = "...[truncated]"

# An e-mail address. Searched for as is, a long run of these characters with no "@" after it (a token, a hex or
# base64 string) is scanned to its end from each of its characters: quadratic in its length (40,000 letters took
# 1.6 s; a prompt of a few hundred KB, minutes of the event loop). See _mask_emails.
_EMAIL: Final = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# The same, starting only where a run of local-part characters starts.
_EMAIL_AT_RUN: Final = re.compile(r"(?<![A-Za-z0-9._%+-])" + _EMAIL.pattern)
# Provider-style secret keys (labels.SECRET_KEYS) and "Bearer <token>" credentials (the scheme in any case, as HTTP
# has it). A key follows no ASCII letter, digit or underscore (a word in another script may run into it:
# "API密钥sk-..."), or follows a JSON escape: a tool result holding a file is JSON text, where "KEY\tsk-..." has a
# "t" before it, and JSON written with escaped non-ASCII characters (Python's json.dumps) has "\uff1ask-..." for a
# full-width colon before it.
_KEY: Final = re.compile(
    r"(?:(?<![A-Za-z0-9_])|(?<=\\[nrtbf])|(?<=\\u[0-9A-Fa-f]{4}))"
    + SECRET_KEYS
    + r"|(?i:(?<=bearer ))[A-Za-z0-9._~+/-]{16,}=*"
)
# 13 to 19 digits, optionally grouped by single spaces or dashes: the shape of a payment card number.
_CARD: Final = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


def redact(text: str) -> str:
    """The default redactor: masks e-mail addresses, API keys/bearer tokens and card-like numbers.

    >>> redact("mail bob@example.com, key sk-abcdefghijklmnopqrstuv, card 4111 1111 1111 1111")
    'mail [email], key [key], card [card]'
    """
    text = _KEY.sub(KEY_MASK, text)
    text = _mask_emails(text)
    return _CARD.sub(CARD_MASK, text)


def _mask_emails(text: str) -> str:
    """``_EMAIL.sub(EMAIL_MASK, text)`` in time linear in the text's length. Where the next address starts, that
    search tries every character; if an address starts inside a run, so does one at the run's start, or else at the
    previous address's end (one can end inside a run: ``a@b.cd1@e.fg``). So the run starts are searched (in one
    pass), and the previous end is tried by itself."""
    if "@" not in text:
        return text
    pieces: list[str] = []
    end = 0
    while True:
        found = (_EMAIL.match(text, end) if end else None) or _EMAIL_AT_RUN.search(text, end)
        if found is None:
            break
        pieces += (text[end : found.start()], EMAIL_MASK)
        end = found.end()
    pieces.append(text[end:])
    return "".join(pieces)


def cap(text: str, max_chars: int) -> str:
    """Cut ``text`` to ``max_chars`` characters, marking the cut; ``max_chars == 0`` keeps nothing. The result
    is always valid UTF-8 (lone surrogates, which JSON allows, become U+FFFD), so exporters can encode it."""
    if len(text) <= max_chars:
        return valid_text(text)
    return valid_text(text[:max_chars]) + TRUNCATION_MARK

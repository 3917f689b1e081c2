"""Redaction and size capping for prompt and completion text recorded on spans (content capture is opt-in).

A redactor is any ``Callable[[str], str]``. The default, :func:`redact`, masks the things most often pasted
into prompts by accident: e-mail addresses, API keys and tokens, and card-like digit runs. It is a safety net,
not a guarantee; pass your own function (``LLMTelemetryMiddleware(app, redact=my_redactor)``) for stricter rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from .labels import valid_text

Redactor = Callable[[str], str]

#: What a masked value is replaced with; the bracketed word says what kind of value was there.
EMAIL_MASK: Final = "[email]"
KEY_MASK: Final = "[key]"
CARD_MASK: Final = "[card]"
#: Appended to content cut at the size cap.
TRUNCATION_MARK: Final = "…[truncated]"

_EMAIL: Final = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Provider-style secret keys (OpenAI sk-/sk-proj-, Anthropic sk-ant-, GitHub ghp_/github_pat_, AWS AKIA,
# Google AIza, Slack xox?-) and "Bearer <token>" credentials.
_KEY: Final = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|(?:ghp|gho|ghs|ghu)_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,}|xox[abprs]-[A-Za-z0-9-]{10,})"
    r"|(?<=Bearer )[A-Za-z0-9._~+/-]{16,}=*"
)
# 13 to 19 digits, optionally grouped by single spaces or dashes: the shape of a payment card number.
_CARD: Final = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")


def redact(text: str) -> str:
    """The default redactor: masks e-mail addresses, API keys/bearer tokens and card-like numbers.

    >>> redact("mail bob@example.com, key sk-abcdefghijklmnopqrstuv, card 4111 1111 1111 1111")
    'mail [email], key [key], card [card]'
    """
    text = _KEY.sub(KEY_MASK, text)
    text = _EMAIL.sub(EMAIL_MASK, text)
    return _CARD.sub(CARD_MASK, text)


def cap(text: str, max_chars: int) -> str:
    """Cut ``text`` to ``max_chars`` characters, marking the cut; ``max_chars == 0`` keeps nothing. The result
    is always valid UTF-8 (lone surrogates, which JSON allows, become U+FFFD), so exporters can encode it."""
    if len(text) <= max_chars:
        return valid_text(text)
    return valid_text(text[:max_chars]) + TRUNCATION_MARK

"""The one place client-controlled text is made safe to become a label value, a log field or a span attribute.

The bounds, in order (see "Bounds" in ``docs/metrics.md``):

* valid UTF-8: JSON lets a client send lone surrogates (``"\\ud800"``), which cannot be encoded; each one
  becomes U+FFFD, the Unicode replacement character;
* length: a label value longer than :data:`MAX_LABEL_CHARS` characters is not a name anyone chose to read on a
  dashboard; it becomes ``other``, like a value past the count bound (a cut prefix could pass for a real name);
* control characters: nor is one with a line break, NUL or other control character in it (or an invisible
  format character, a right-to-left override say), which would also reach the span named after it and the request
  log line's message, where a viewer prints it raw; it becomes ``other``;
* secrets and identities: nor is one holding what looks like a provider's secret key, or a user's identity or a
  bearer token (an e-mail address, an IP address, a phone number, a JSON Web Token); it becomes ``other``;
* count: each label keeps at most N distinct values, then folds the rest into ``other``. Under several workers
  the admitted values are shared through a :class:`LabelStore`, so the bound holds for the whole deployment of
  workers, across worker restarts, not per process lifetime.
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from typing import Final, Protocol

from .instruments import OTHER

#: Shortest time between two looks at the shared label values for a value a refused request names.
PEEK_SECONDS: Final = 1.0
#: Longest label value kept; a longer one is recorded as ``other``.
MAX_LABEL_CHARS: Final = 256
#: Longest free-text field (request id, path) kept on a log line or span; longer ones are cut to this.
MAX_FIELD_CHARS: Final = 1024

_SURROGATE: Final = re.compile("[\ud800-\udfff]")


#: The characters beyond ASCII that show nothing, or change how the text around them shows, which a raw log line
#: or a label value should not carry: the C1 controls (NEL ends a line), the Unicode line and paragraph separators,
#: and every format character (category Cf) of the interpreter's Unicode database: the soft hyphen, zero-width
#: ones, Arabic and other prepended marks, bidirectional marks, overrides and isolates (U+202E shows what follows
#: backwards), word joiners, the byte order mark, the tag characters. (A test derives it from ``unicodedata``.)
INVISIBLE: Final = re.compile(
    "[\x80-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
#: C0 controls and DEL, and the invisible characters beyond ASCII.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f" + INVISIBLE.pattern[1:])
#: The same within ASCII: most label values are ASCII, and a class of a few ASCII ranges is searched several times
#: faster than one reaching the tag characters.
_ASCII_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")

#: Provider-style secret keys (OpenAI sk-/sk-proj-, Anthropic sk-ant-, GitHub ghp_/github_pat_, AWS AKIA, Google
#: AIza, Slack xox?-), as the redactor masks them in captured text (see ``redact``).
_OTHER_KEYS: Final = (
    r"(?:ghp|gho|ghs|ghu)_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{30,}|xox[abprs]-[A-Za-z0-9-]{10,}"
)
SECRET_KEYS: Final = r"(?:sk-[A-Za-z0-9_-]{16,}|" + _OTHER_KEYS + ")"
#: A secret key as a label value holds one: a client that swapped its key and model settings, against a server that
#: answers whatever the model. Stricter than the redactor, whose false positives cost only masked prose: the key
#: starts the value or follows a separator other than a hyphen, and an OpenAI or Anthropic one is 32 characters
#: long at least after its ``sk-`` (model names such as ``opus-mt-sk-en`` or ``sk-learn-classifier`` stay).
_KEY_IN_LABEL: Final = re.compile(r"(?<![A-Za-z0-9_-])(?:sk-[A-Za-z0-9_-]{32,}|" + _OTHER_KEYS + ")")


#: The shapes of a user's identity or a bearer token, which no label value may hold (see ``label_value``): an
#: e-mail address (a local part's character, ``@``, a domain with a dot, its top-level name starting with a letter:
#: Vertex AI's ``claude-3-5-sonnet-v2@20241022`` and Cloudflare's ``@cf/meta/...`` stay), an IPv4 address (four
#: numbers up to 255 joined by dots, not part of a longer run of digits, letters and dots: a version ``v1.2.3.4``
#: stays), an IPv6 address as the whole value, a phone number written the international way (``+`` and 8 to 15
#: digits, at most two spaces, dots, hyphens or brackets between two) or the North American way (``(415) 555-0100``,
#: ``415-555-0100``, ``415.555.0100``), and a JSON Web Token (base64url parts, the first two starting ``eyJ`` as a
#: JSON object's does). Dates (``gpt-4o-2024-08-06``) and bare numbers (a customer number) are none of these shapes,
#: and stay.
#: An e-mail address's domain, matched right after its ``@``. What follows it does not matter: an address a
#: hyphen or an underscore follows (``alice@example.com-``, ``alice@example.com_/chat``) is as much an identity.
_EMAIL_DOMAIN: Final = re.compile(r"[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)*\.[^\W\d_][\w-]*[^\W_]")
#: The characters of an e-mail address's local part (RFC 5322's ``atext`` and the dot, and letters of any script).
_EMAIL_LOCAL: Final = frozenset("!#$%&'*+/=?^`{|}~.-_")
_IPV4: Final = re.compile(
    r"(?<![0-9A-Za-z.])(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?![0-9A-Za-z.])"
)
_PHONE_INTERNATIONAL: Final = re.compile(r"(?<![0-9A-Za-z+])\+[0-9](?:[ .()-]{0,2}[0-9]){7,14}(?![0-9])")
#: A run of digits shaped as a North American number, found first: ``\d`` is searched for about half the cost of
#: ``[0-9]``, and the exact shape is then checked where it was found.
_NORTH_AMERICAN_RUN: Final = re.compile(r"\d\d\d[ .-]\d\d\d\d")
_PHONE_NORTH_AMERICAN: Final = re.compile(
    r"[0-9](?<![0-9A-Za-z][0-9])[0-9]{2}[ .-][0-9]{3}[ .-][0-9]{4}(?![0-9A-Za-z])"
    r"|\([0-9]{3}\) ?[0-9]{3}[ .-][0-9]{4}(?![0-9A-Za-z])"
)
_JWT: Final = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.")
#: A whole value that may be an IPv6 address (``2001:db8::1``, bracketed, with a zone or a port): checked by
#: ``ipaddress``, so an Ollama tag (``llama3:8b``) or a time of day (``12:30:45``) stays. Each part's characters
#: differ from those of the part after it, so a value that is not one fails in one pass: a pattern of two runs of
#: the address's characters around a colon (``[...:.]*:[...:.]*``) tried every split of a run of colons, 4 ms for
#: 256 of them, on each request (the request log line's message asks about its model whatever the label's count).
_IPV6_SHAPE: Final = re.compile(r"\[?([0-9A-Fa-f:.]+)(?:%[0-9A-Za-z_.-]+)?(?:\](?::[0-9]{1,5})?)?")


def _personal(value: str) -> bool:
    """Whether ``value`` holds one of the shapes above. Each search runs only where a character or a run its shape
    needs is in the value (a test in C, a few hundred machine instructions), so most model names pay for one search
    of a run of digits alone."""
    return bool(
        ("@" in value and _email(value))
        or ("+" in value and _PHONE_INTERNATIONAL.search(value))
        or (value.count(".") >= 3 and _IPV4.search(value))
        or ("eyJ" in value and _JWT.search(value))
        or (":" in value and _ipv6(value))
        or (_NORTH_AMERICAN_RUN.search(value) and _PHONE_NORTH_AMERICAN.search(value))
    )


def _email(value: str) -> bool:
    """Whether ``value`` holds an e-mail address: an ``@`` after a local part's character and before a domain."""
    at = value.find("@", 1)
    while at > 0:
        before = value[at - 1]
        if (before.isalnum() or before in _EMAIL_LOCAL) and _EMAIL_DOMAIN.match(value, at + 1):
            return True
        at = value.find("@", at + 1)
    return False


def _ipv6(value: str) -> bool:
    """Whether ``value`` is an IPv6 address, as a whole (a client's address, which is as personal as an e-mail)."""
    shape = _IPV6_SHAPE.fullmatch(value)
    if shape is None or ":" not in shape[1]:
        return False
    try:
        ipaddress.IPv6Address(shape[1])
    except ValueError:
        return False
    return True


#: What a secret key in a model name is shown as.
_KEY_MASK: Final = "[key]"
#: The characters every key ``_KEY_IN_LABEL`` masks is made of (a key starts where a run of them starts).
_KEY_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


def mask_keys(text: str | None) -> str | None:
    """``text`` with every secret key a label value may not hold (see ``label_value``) shown as ``[key]``."""
    return _KEY_IN_LABEL.sub(_KEY_MASK, text) if text else text


def name_text(value: str, max_chars: int = MAX_FIELD_CHARS) -> str:
    """A model name or a path as it may appear on a log line or span: ``field_text``, except that a secret key the
    cut goes through is masked whole. (``mask_keys``, which masks a name holding a key before the span and the log
    line show it, sees only the cut text, where the part of a key that is kept may be too short for a key's shape.)
    A name so masked is longer than any label value: as a label it is ``other`` (see ``label_value``)."""
    if len(value) <= max_chars or value[max_chars] not in _KEY_CHARS:
        return field_text(value, max_chars)  # (no run of a key's characters goes on past the cut)
    start = len(value[:max_chars].rstrip(_KEY_CHARS))  # where the run the cut goes through starts
    # A key starts a run; one that needs more characters than the run has before the cut is matched within as many
    # after it as the longest shape's least length, so a run of any length is read that far only.
    if start == max_chars or _KEY_IN_LABEL.match(value, start, max_chars + 64) is None:
        return field_text(value, max_chars)
    return valid_text(value[: min(start, max_chars - len(_KEY_MASK))]) + _KEY_MASK


def valid_text(value: str) -> str:
    """``value`` with every lone surrogate replaced by U+FFFD, so it always encodes as UTF-8."""
    if value.isascii():
        return value
    # json.loads already joins a valid surrogate pair into one code point: any surrogate left is lone.
    return _SURROGATE.sub("\ufffd", value)


def field_text(value: str, max_chars: int = MAX_FIELD_CHARS) -> str:
    """A client-sent string as it may appear on a log line or span: valid UTF-8, at most ``max_chars`` long."""
    return valid_text(value[:max_chars])


#: The label values of the last strings :func:`label_value` was asked about, so a value asked about on every request
#: (a folded one, such as a tenant header holding an e-mail address; the model of each request log line's message)
#: costs a dict lookup, not the searches. At most this many, of at most MAX_LABEL_CHARS characters: emptied when full.
_MEMO_SIZE: Final = 1024
_memo: dict[str, str] = {}


def label_value(value: str) -> str:
    """A client-sent string as it may become a label value: valid UTF-8, or ``other`` when too long, when it holds
    a control character, when it holds what looks like a provider's secret key (or ``[key]``, one masked), or when
    it holds what looks like a user's identity or a bearer token: an e-mail address, an IP address, a phone number,
    a JSON Web Token (see ``_personal``)."""
    if len(value) > MAX_LABEL_CHARS:
        return OTHER
    shown = _memo.get(value)
    if shown is None:
        shown = _label_value(value)
        if len(_memo) >= _MEMO_SIZE:
            _memo.clear()
        _memo[value] = shown
    return shown


def _label_value(value: str) -> str:
    if _KEY_IN_LABEL.search(value) or _KEY_MASK in value or _personal(value):
        return OTHER  # (the mask: a name cut through a key, see name_text, was longer than any label)
    if value.isascii():
        return OTHER if _ASCII_CONTROL.search(value) else value
    return OTHER if _CONTROL.search(value) else valid_text(value)


class LabelStore(Protocol):
    """Shared memory of admitted label values (one per deployment of workers, see ``multiproc.SharedState``)."""

    def admit(self, label: str, value: str, max_values: int) -> set[str]:
        """Add ``value`` to ``label``'s values unless ``max_values`` are already taken; return all of them (with
        ``max_values`` 0, only read them)."""
        ...


class LabelLimiter:
    """Makes every label value safe (see :func:`label_value`) and remembers the first ``max_values`` per label.

    Args:
        max_values: distinct values kept per label; later new values become ``"other"``.

    Example::

        limit = LabelLimiter(2)
        limit("model", "a"), limit("model", "b"), limit("model", "c")   # ('a', 'b', 'other')
    """

    def __init__(self, max_values: int) -> None:
        self.max_values = max_values
        self._seen: dict[str, set[str]] = {}
        #: Labels whose values are all taken: every new value is ``other`` without asking the store.
        self._full: set[str] = set()
        self._store: LabelStore | None = None
        #: When :meth:`known` last looked a label's values up in the store (time.monotonic()).
        self._looked_up: dict[str, float] = {}
        self._lock = threading.Lock()

    def share(self, store: LabelStore) -> None:
        """Count values together with the other workers of this deployment, through ``store``."""
        with self._lock:
            self._store = store
            self._seen = {}
            self._full = set()

    def known(self, label: str, value: str) -> str:
        """``value`` if it is admitted for ``label`` already, else ``other``; admits nothing. For values a refused
        request names: junk sent with a bad key cannot take the slots of real ones. Under several workers, a value
        this worker has not seen yet is looked up in the shared memory, at most once a second per label (a flood of
        junk costs no more), so a worker new to a model another one admitted keeps its name on its refusals."""
        seen = self._seen.get(label)
        if seen is not None and value in seen:
            return value
        store = self._store
        if store is None or label in self._full or len(value) > MAX_LABEL_CHARS:
            return OTHER
        now = time.monotonic()
        if now - self._looked_up.get(label, -PEEK_SECONDS) < PEEK_SECONDS:
            return OTHER
        self._looked_up[label] = now
        try:
            admitted = store.admit(label, value, 0)  # a bound of 0 admits nothing: it only reads
        except OSError:
            return OTHER
        with self._lock:
            self._seen[label] = set(admitted) | self._seen.get(label, set())
        return value if value in admitted else OTHER

    def __call__(self, label: str, value: str) -> str:
        seen = self._seen.get(label)
        if seen is not None and value in seen:
            return value
        if label in self._full:
            return OTHER
        value = label_value(value)
        if value == OTHER:
            return OTHER
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if value in seen:
                return value
            store = self._store
            if store is None:
                if len(seen) >= self.max_values:
                    self._full.add(label)
                    return OTHER
                seen.add(value)
                return value
            # New to this worker: the shared memory decides, and tells us what the others admitted meanwhile.
            # At most max_values values per label are ever admitted, so this runs a bounded number of times.
            try:
                admitted = store.admit(label, value, self.max_values)
            except OSError:
                return OTHER  # the shared memory is unreadable: stay within the bound rather than guess
            self._seen[label] = set(admitted)
            if len(admitted) >= self.max_values:
                self._full.add(label)
            return value if value in admitted else OTHER

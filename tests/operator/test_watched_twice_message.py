"""The WatchedTwice event's words fit in an event message whatever the peering names' lengths (up to 253
characters, a ClusterKopfPeering's name): a name too long to quote whole is cut with a marker, and the message
keeps its last sentence, where kopf would cut a longer one in its middle and the operator cut it at its end."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llm_telemetry_operator.config import Timers
from llm_telemetry_operator.errors import MAX_MESSAGE_CHARS
from llm_telemetry_operator.handlers import NAME_IN_MESSAGE_CHARS, watched_twice_message

#: The operator's grace before it takes over from an operator with no replica running: 5 minutes.
GRACE = Timers().takeover_grace_seconds
label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
#: A DNS subdomain (a ClusterKopfPeering's name), of up to 253 characters.
subdomain = st.lists(label, min_size=1, max_size=8).map(".".join).filter(lambda name: len(name) <= 253)
long_subdomain = st.lists(st.just("a" * 63), min_size=4, max_size=4).map(".".join).map(lambda name: name[:253])


@given(st.one_of(subdomain, long_subdomain), st.one_of(subdomain, long_subdomain), label, st.booleans())
def test_the_message_fits_and_ends_with_its_last_sentence(holder: str, own: str, namespace: str, idle: bool) -> None:
    message = watched_twice_message(holder, own, namespace, idle, GRACE)
    assert len(message) <= MAX_MESSAGE_CHARS
    assert message.endswith("taken over at its next resync")
    assert namespace in message or idle
    for name in (holder, own):
        if len(name) <= NAME_IN_MESSAGE_CHARS:
            assert f"'{name}'" in message
        else:
            assert f"'{name[: NAME_IN_MESSAGE_CHARS - 1]}…'" in message
    assert ("Two releases" in message) is not idle


def test_the_longest_names_are_cut_with_a_marker() -> None:
    holder, own = "h" * 253, "o" * 253
    for idle in (False, True):
        message = watched_twice_message(holder, own, "n" * 63, idle, GRACE)
        assert len(message) <= MAX_MESSAGE_CHARS
        assert holder not in message and "h" * (NAME_IN_MESSAGE_CHARS - 1) + "…'" in message
        assert "o" * (NAME_IN_MESSAGE_CHARS - 1) + "…'" in message

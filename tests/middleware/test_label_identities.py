"""A user's identity never becomes a label value (docs/metrics.md, "Bounds"): an e-mail address, an IP address, a
phone number or a JSON Web Token sent as an attribution header's value, a model name or a tool name is ``other``,
and takes none of the label's places; the model names real providers use stay as sent."""

from __future__ import annotations

import ipaddress
import time
import tracemalloc
import uuid

import httpx
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_telemetry.demo.app import create_app
from llm_telemetry.labels import MAX_LABEL_CHARS, label_value
from support import Metrics, free_port, scrape, scrape_text, serve, whole_after

#: Values a client sent that name a person or carry their token, each in a header, a model name or a tool name.
IDENTITIES = [
    "alice@example.com",
    "Bob.Smith+llm@mail.example.co.uk",
    "carol@example.com-",  # an address a separator follows, the value's last character
    "dave_@vip.163.com_/chat",  # a separator and then a path after it; a label of digits inside the domain
    "erin@mail-gw.my-company.xn--p1ai",  # hyphens inside the domain's labels, its top-level name in punycode
    "+1 415 555 0100",
    "(415) 555-0100",
    "203.0.113.7",
    "2001:db8::7",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSJ9.c2lnbmF0dXJl",
]

#: Model names real providers and servers use, some alike in part (an ``@``, colons, dates, dotted versions).
REAL_NAMES = [
    "claude-3-5-sonnet-v2@20241022",  # Anthropic on Vertex AI
    "@cf/meta/llama-3-8b-instruct",  # Cloudflare Workers AI
    "gpt-4o-2024-08-06",
    "claude-opus-4-5-20251101",
    "claude-3-5-sonnet-20241022",
    "text-embedding-3-large",
    "acme-prod",  # (a tenant's name, as an attribution header sends it)
    "ft:gpt-4o-mini-2024-07-18:acme::9abcDEF1",
    "llama3.1:8b",  # Ollama
    "qwen2.5:7b-instruct-q4_K_M",
    "meta-llama/Llama-3.1-8B-Instruct",
    "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc123",
    "/models/blobs/sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa",  # llama.cpp's file
    "mistral-large-2407",
    "v1.2.3.4",
    "12:30:45",
    "v1.2.3+20241022",  # a version's build metadata: digits after a "+", as a phone number's are
    "my-finetune@1.2.0",  # a version pinned after an "@": no e-mail address's domain ends in a number
    "my-finetune@1.2.10-rc_1",  # nor starts its top-level name with one
    "team-2024-100-2000",  # three runs of digits, the first longer than an area code
]


def _settled(metrics_port: int, requests: int) -> Metrics:
    deadline = time.monotonic() + 10
    while scrape(metrics_port).value("llm_requests_total") < requests and time.monotonic() < deadline:
        time.sleep(0.02)
    return whole_after(metrics_port)


def test_identities_sent_by_a_client_are_other_in_every_label_and_take_no_place() -> None:
    """Through the official SDK against real uvicorn: each identity as the tenant header's value, as the model and
    as the name of the tool the model calls; with one place per label, the real values sent after them keep it."""
    metrics_port = free_port()
    app = create_app(
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
        attribution_headers={"x-tenant-id": "tenant"},
        max_label_values=1,
    )
    with serve(app) as base:
        oai = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)

        def chat(model: str, tenant: str, tool: str | None = None) -> None:
            tools: list[dict[str, object]] | openai.NotGiven = openai.NOT_GIVEN
            if tool is not None:
                tools = [{"type": "function", "function": {"name": tool, "parameters": {"type": "object"}}}]
            oai.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "hi"}],
                tools=tools,  # type: ignore[arg-type]
                extra_headers={"x-tenant-id": tenant},
            )

        for identity in IDENTITIES:
            chat("gpt-4o", identity)
            chat(identity, "acme")
            chat("gpt-4o", "acme", tool=identity)
        chat("gpt-4o", "acme", tool="get_weather")
        sent = 3 * len(IDENTITIES) + 1
        metrics = _settled(metrics_port, sent)
        openmetrics = scrape_text(metrics_port, "/metrics?fresh", "application/openmetrics-text; version=1.0.0")
    app.telemetry.shutdown()

    assert metrics.value("llm_requests_total") == sent
    assert metrics.label_values("llm_requests_total", "llm_metadata_tenant") == {"other", "acme"}
    assert metrics.value("llm_requests_total", llm_metadata_tenant="other") == len(IDENTITIES)
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"other", "gpt-4o"}
    assert metrics.value("llm_requests_total", gen_ai_request_model="other") == len(IDENTITIES)
    assert metrics.label_values("llm_requests_total", "gen_ai_response_model") == {"other", "gpt-4o"}
    assert metrics.label_values("llm_tool_calls_total", "gen_ai_tool_name") == {"other", "get_weather"}
    for identity in IDENTITIES:
        assert identity not in metrics.text and identity not in openmetrics


def test_a_header_carrying_a_new_id_per_request_fills_the_places_and_folds_every_later_value() -> None:
    """What docs/metrics.md says of a per-request id in an attribution header, through httpx: a UUID is not folded
    by its shape (a tenant's id may be one), so the first ``max_label_values`` requests' ids take the places, and
    every value after them, a real tenant's included, is ``other``."""
    metrics_port = free_port()
    app = create_app(
        metrics_port=metrics_port,
        metrics_host="127.0.0.1",
        attribution_headers={"x-tenant-id": "tenant"},
        max_label_values=3,
    )
    ids = [str(uuid.uuid4()) for _ in range(5)]
    with serve(app) as base:
        for tenant in [*ids, "acme"]:
            response = httpx.post(
                base + "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-tenant-id": tenant},
            )
            assert response.status_code == 200
        metrics = _settled(metrics_port, len(ids) + 1)
    app.telemetry.shutdown()
    assert metrics.label_values("llm_requests_total", "llm_metadata_tenant") == {*ids[:3], "other"}
    assert metrics.value("llm_requests_total", llm_metadata_tenant="other") == 3


#: Text around an identity inside a label value: nothing, or a word and a separator.
_AROUND = st.sampled_from(["", "tenant-", "team/", "user:", "id=", "x "])
_PHONES = st.builds(
    lambda country, digits, sep: f"+{country}{sep}" + sep.join(digits[i : i + 3] for i in range(0, len(digits), 3)),
    st.integers(1, 999),
    st.text("0123456789", min_size=7, max_size=11),
    st.sampled_from(["", " ", "-", "."]),
)
_IDENTITY = st.one_of(
    st.emails(),
    st.ip_addresses(v=4).map(str),
    _PHONES,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(before=_AROUND, identity=_IDENTITY, after=st.sampled_from(["", "-prod", "/a", " ", "-", "_", "_/a", "- x"]))
def test_a_value_holding_an_email_ipv4_or_phone_is_other(before: str, identity: str, after: str) -> None:
    assert label_value(before + identity + after) == "other"


#: Values at the edges of the shapes of a phone number, an IP address and a JSON Web Token, and whether each is
#: folded (docs/metrics.md, "Bounds": ``+`` and 8 to 15 digits, at most two separators between two;
#: ``415-555-0100``, ``415.555.0100``, ``(415) 555-0100``, not inside a longer run of digits and letters; four
#: numbers up to 255 joined by dots, not inside a longer run of digits, letters and dots; an IPv6 address as the
#: whole value, bracketed, with a zone or a port too).
EDGES = [
    ("+44 (20) 7946 0958", True),  # a space and a bracket between two digits (and no North American shape)
    ("+12345678", True),
    ("+1234567", False),
    ("+123456789012345", True),
    ("+1234567890123456", False),
    ("RELEASE+20241022", False),  # digits after a "+" that follows a letter, a digit or a "+" are no phone number
    ("release+20241022", False),
    ("c++20241022", False),
    ("model-1.2.3.4.5", False),
    ("V1.2.3.4", False),
    ("1.2.3.4rc1", False),
    ("1.2.3.4RC1", False),
    ("model-1.2.3.456", False),
    ("model-301.2.3.4", False),
    *((f"415{a}555{b}0100", True) for a, b in (" -", ". ", "- ", "..", "--", "  ")),  # the North American way
    *((f"(415){gap}555{sep}0100", True) for gap in ("", " ") for sep in " .-"),
    ("tenant-415-555-0100", True),
    *(
        (f"{before}415-555-0100{after}", False)
        for before, after in (("v", ""), ("V", ""), ("", "1"), ("", "a"), ("", "A"))
    ),
    *((f"(415) 555-0100{after}", False) for after in "1aA"),
    ("eyJaB3_-xY9.eyJaB3_-xY9.c2ln", True),  # a JSON Web Token's parts at their least length, 8 after "eyJ"
    ("eyJaB3_-xY.eyJaB3_-xY9.c2ln", False),
    ("eyJaB3_-xY9.eyJaB3_-xY.c2ln", False),
    ("2001:DB8::7", True),  # an IPv6 address in capitals, bracketed with no port, or with a port of 1 to 5 digits
    ("[2001:db8::7]", True),
    ("[2001:db8::7]:8", True),
    ("[2001:db8::7]:65535", True),
    ("fe80::1%Wi-Fi_2.0", True),  # with a zone of letters, digits, "-", "_" and "."
    ("[2001:db8::7]:655350", False),
    ("[2001:db8::7]:", False),
]


def test_the_phone_ipv4_and_jwt_shapes_hold_at_their_edges() -> None:
    assert [(value, label_value(value) == "other") for value, _ in EDGES] == EDGES


def test_an_address_whose_local_part_ends_in_any_character_it_may_hold_is_other() -> None:
    """The character before the ``@`` is what tells an address from a name pinned to a version: each character an
    address's local part may hold (RFC 5322's ``atext``, the dot, letters of any script and digits) may be it."""
    for last in "!#$%&'*+/=?^`{|}~.-_" + "aZ9é中":
        address = f"user{last}@example.com"
        assert label_value(address) == "other", address


@given(st.ip_addresses(v=6))
def test_an_ipv6_address_as_the_whole_value_is_other(address: ipaddress.IPv6Address) -> None:
    for shown in (str(address), address.exploded, f"[{address}]:443"):
        assert label_value(shown) == "other"


#: Parts of the names providers give their models, joined as they join them.
_NAME_PART = st.sampled_from(
    ["gpt", "claude", "llama", "qwen2.5", "mistral", "4o", "mini", "3.1", "8b", "instruct", "sonnet", "v2", "q4_K_M"]
)
_DATE = st.sampled_from(["", "-2024-08-06", "-20241022", "@20241022", "-0125", "-2407"])


@given(
    parts=st.lists(_NAME_PART, min_size=1, max_size=5),
    joins=st.lists(st.sampled_from("-/:_"), min_size=4, max_size=4),  # (four dotted numbers are an IPv4 address)
    date=_DATE,
)
def test_model_names_shaped_as_providers_shape_them_stay(parts: list[str], joins: list[str], date: str) -> None:
    name = parts[0] + "".join(join + part for join, part in zip(joins, parts[1:], strict=False)) + date
    assert len(name) <= MAX_LABEL_CHARS
    assert label_value(name) == name


def test_real_model_names_alike_in_part_stay() -> None:
    assert [label_value(name) for name in REAL_NAMES] == REAL_NAMES


def test_the_answers_remembered_take_bounded_memory() -> None:
    """label_value remembers its last answers (docs/metrics.md, "Bounds"): a client sending a new value on every
    request, as many as a long-running server meets, leaves at most that many strings behind, not all of them."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            label_value(f"tenant-{i:06d}-" + "x" * 200)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 2 << 20, f"{kept:,} bytes kept after 20,000 values of 215 characters"

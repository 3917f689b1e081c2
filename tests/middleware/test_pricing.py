"""Pricing tables: files and dicts, prefix matching of dated model names, cached tokens, clear errors."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.config import ConfigurationError
from llm_telemetry.pricing import DEFAULT_PRICING, PricingTable
from llm_telemetry.record import LLMCall


def call(model: str, **tokens: int) -> LLMCall:
    c = LLMCall("chat", "openai", start=0.0, request_model=model)
    for key, value in tokens.items():
        setattr(c, key, value)
    return c


def test_pricing_yaml_file_prefix_match_and_cached_tokens(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  acme-large:\n    input: 4\n    output: 16\n    cache_read: 1\n")
    table = PricingTable(str(path))
    assert table.price("acme-large-2025-01-01") == table.price("acme-large")
    assert table.price("acme-largest") is None  # a prefix must end at a '-'
    cost = table.cost(call("acme-large-2025-01-01", input_tokens=1000, cache_read_tokens=400, output_tokens=10))
    assert cost == pytest.approx((600 * 4 + 400 * 1 + 10 * 16) / 1e6)


def test_pricing_json_file_and_mapping_without_wrapper(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"m": {"input": 1, "output": 2}}}))
    assert PricingTable(str(path)).cost(call("m", input_tokens=1_000_000)) == pytest.approx(1.0)
    assert PricingTable({"m": {"input": 1, "output": 2}}).cost(call("m", output_tokens=500_000)) == pytest.approx(1.0)


def test_unpriced_model_has_no_cost() -> None:
    assert PricingTable().cost(call("my-private-model", input_tokens=10)) is None


def test_default_table_prices_the_common_models() -> None:
    table = PricingTable()
    assert len(table) == len(DEFAULT_PRICING)
    assert table.price("gpt-4o-mini-2024-07-18") == table.price("gpt-4o-mini")  # not gpt-4o: longest prefix wins
    assert table.price("claude-sonnet-4-20250514") is not None


#: The embedded table's prices as the providers' lists relate them: output per input, and the cache prices per input
#: (OpenAI bills cached input at a tenth, a quarter or a half of it by family and has no cache-write price; Anthropic
#: bills output at five times the input, cache reads at a tenth, five-minute writes at 1.25 and one-hour ones at 2).
PUBLISHED_RATIOS = {
    **dict.fromkeys(["gpt-5", "gpt-5-mini", "gpt-5-nano"], (8, 0.1, None, None)),
    **dict.fromkeys(["gpt-4o", "gpt-4o-mini", "o3-mini"], (4, 0.5, None, None)),
    **dict.fromkeys(["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini"], (4, 0.25, None, None)),
    **dict.fromkeys(["gpt-4o-2024-05-13"], (3, None, None, None)),
    **dict.fromkeys(["o3-pro"], (4, None, None, None)),
    **dict.fromkeys(
        ["claude-opus-4", "claude-opus-4-1", "claude-sonnet-4", "claude-sonnet-4-5", "claude-haiku-4-5",
         "claude-3-5-haiku"],
        (5, 0.1, 1.25, 2),
    ),
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(DEFAULT_PRICING))
def test_the_embedded_prices_keep_the_ratios_the_providers_publish(model: str) -> None:
    """A mistyped digit in the embedded table changes every dollar counted for that model: each entry is held to how
    its provider's list relates its prices (and an entry added without its ratios fails here until they are)."""
    prices = DEFAULT_PRICING[model]
    if model.startswith("text-embedding-"):
        assert prices["output"] == 0 and set(prices) == {"input", "output"}
        return
    output, cache_read, cache_creation, cache_creation_1h = PUBLISHED_RATIOS[model]
    assert prices["output"] == pytest.approx(output * prices["input"])
    for kind, ratio in (("cache_read", cache_read), ("cache_creation", cache_creation),
                        ("cache_creation_1h", cache_creation_1h)):  # fmt: skip
        assert prices.get(kind) == (None if ratio is None else pytest.approx(ratio * prices["input"])), kind


@pytest.mark.parametrize(
    ("model", "priced_as"),
    [
        ("o3-2025-04-16", "o3"),
        ("o3-mini", "o3-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),  # not o3: longest prefix, then a snapshot
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-0", "claude-sonnet-4"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("o3-pro-2025-06-10", "o3-pro"),  # a model of the family with a price of its own, in the table
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        # A snapshot priced apart from its family: its own entry wins over the family's.
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        # Other models of a family, with prices of their own: unpriced, never priced as the family's first.
        ("o3-deep-research", None),
        ("gpt-4o-audio-preview", None),
        ("claude-opus-4-5", None),
        ("claude-opus-4-5-20251101", None),
    ],
)
def test_the_embedded_table_prices_a_models_snapshots_not_its_familys_other_models(
    model: str, priced_as: str | None
) -> None:
    table = PricingTable()
    assert priced_as is None or priced_as in DEFAULT_PRICING
    assert table.price(model) == (table.price(priced_as) if priced_as else None)
    # A table of the user's own keeps the documented rule: any name after the entry's and a '-'.
    assert PricingTable({"o3": {"input": 2, "output": 8}}).price("o3-pro") is not None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("models:\n  m: {input: 1}\n", "input and output prices are required"),
        ("models:\n  m: {input: -1, output: 1}\n", "input must be a non-negative number"),
        ("models:\n  m: {input: 1, output: 1, cached: 1}\n", "unknown keys \\['cached'\\]"),
        ("models: [1, 2]\n", "'models' must map model names to prices"),
        ("models:\n  m: {input: 1\n", "is not valid YAML"),
    ],
)
def test_bad_pricing_files_fail_at_startup_with_a_clear_message(tmp_path: Path, content: str, message: str) -> None:
    """The server's lifespan startup fails with the message (the server reports it and exits); the middleware's
    ``telemetry`` raises it too. (tests/middleware/test_config.py runs this under uvicorn.)"""
    path = tmp_path / "prices.yaml"
    path.write_text(content)
    middleware = LLMTelemetryMiddleware(lambda *a: None, pricing=str(path))  # type: ignore[arg-type]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    (failed,) = sent
    assert failed["type"] == "lifespan.startup.failed"
    assert re.search(message, failed["message"]), failed
    with pytest.raises(ConfigurationError, match=message):
        middleware.telemetry  # noqa: B018


def test_a_wrong_price_built_of_aliases_is_shown_in_a_few_members(tmp_path: Path) -> None:
    """A price made of YAML aliases, six levels of ten: a million members in a 0.4 kB file. Its whole repr() in the
    message took megabytes (at nine levels the constructor ran out of memory instead of naming the file)."""
    anchors = ['  l0: &l0 ["aaaaaaaaaa", "aaaaaaaaaa", "aaaaaaaaaa", "aaaaaaaaaa", "aaaaaaaaaa"]']
    anchors += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 6)]
    path = tmp_path / "prices.yaml"
    path.write_text("anchors:\n" + "\n".join(anchors) + "\nmodels:\n  m: {input: *l5, output: 1}\n")
    with pytest.raises(ConfigurationError, match="input must be a non-negative number, got \\[\\[") as raised:
        PricingTable(path)
    assert f"pricing file {str(path)!r}" in str(raised.value)
    assert len(str(raised.value)) < 500


def test_missing_pricing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"nope\.yaml"):
        PricingTable(str(tmp_path / "nope.yaml"))


def test_the_first_gpt_4o_snapshot_keeps_its_own_price() -> None:
    table = PricingTable()
    cost = table.cost(call("gpt-4o-2024-05-13", input_tokens=1000, output_tokens=100))
    assert cost == pytest.approx((1000 * 5 + 100 * 15) / 1e6)  # not gpt-4o's $2.50 and $10


def test_anthropic_one_hour_cache_writes_are_priced_at_their_own_price() -> None:
    """Anthropic bills writes to its one-hour cache at twice the input price, five-minute ones at 1.25 times: the
    usage's ``cache_creation`` breakdown says which, read from the real stream and JSON shapes."""
    from test_apis import read, sse

    usage = {"input_tokens": 50, "cache_read_input_tokens": 10000, "cache_creation_input_tokens": 2500,
             "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 2000}}  # fmt: skip
    start = {"type": "message_start", "message": {"id": "m", "model": "claude-sonnet-4-20250514", "usage": usage}}
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 300}}
    streamed = read("anthropic.messages", sse(start, end, named=True), stream=True)
    body = {"id": "m", "type": "message", "model": "claude-sonnet-4-20250514", "content": [],
            "stop_reason": "end_turn", "usage": {**usage, "output_tokens": 300}}  # fmt: skip
    whole = read("anthropic.messages", json.dumps(body).encode(), stream=False)
    # claude-sonnet-4: $3 input, $0.30 cache reads, $3.75 five-minute writes, $6 one-hour writes, $15 output.
    expected = (50 * 3 + 10000 * 0.30 + 500 * 3.75 + 2000 * 6 + 300 * 15) / 1e6
    for read_call in (streamed, whole):
        assert (read_call.cache_creation_tokens, read_call.cache_creation_1h_tokens) == (2500, 2000)
        assert PricingTable().cost(read_call) == pytest.approx(expected)
    # A table without a one-hour price charges those writes as the others.
    own = PricingTable({"claude-sonnet-4": {"input": 3, "output": 15, "cache_read": 0.3, "cache_creation": 3.75}})
    assert own.cost(whole) == pytest.approx((50 * 3 + 10000 * 0.30 + 2500 * 3.75 + 300 * 15) / 1e6)

"""The cost counter's running sum stays finite. A call whose own cost would overflow was already unpriced, but the
sum of finite costs was not bounded: a table pricing a model at 1.7e308 USD per million tokens (finite, so accepted)
made each of a server's answers with 64 advisor consultations cost 1.1e304 dollars, and after 16,500 of them (50
seconds of a real server) ``llm_cost_usd_total`` reached infinity: the OpenTelemetry SDK logged "Callback returned a
non-finite value inf for instrument llm.cost, ignoring measurement" and the series was gone from every scrape after
it (promtool found nothing wrong: the series was simply absent).

Now a table's price is at most ``MAX_PRICE`` (a dollar a token) and a count read from an answer at most 2**53, so a
call costs at most ``CALL_BOUND`` dollars and the sum stays finite for longer than any server runs. Hypothesis tries
any finite prices and counts; a real server (uvicorn, the official openai SDK) answers with every count at its bound
and the scrape is checked by promtool.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from openai.types.responses import Response
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.apis import MAX_ADVISOR_ENTRIES
from llm_telemetry.config import ConfigurationError
from llm_telemetry.pricing import _KINDS, MAX_PRICE, PricingTable
from llm_telemetry.record import MAX_SVG_ITEMS, LLMCall
from support import Calls, Metrics, free_port, scrape_text, serve, settled, whole_after

#: The largest count a reader takes from an answer (``apis._MAX_COUNT``).
MOST = 2**53
#: The most a call can cost: at most four counts of its own priced (fresh input, cache reads, cache writes, output;
#: the audio, image and one-hour parts are shares of them), as many for each advisor consultation and for the image
#: tool, two (input, output) for each SVG image, each at most MOST tokens at MAX_PRICE.
CALL_BOUND = (4 + 4 * MAX_ADVISOR_ENTRIES + 4 + 2 * MAX_SVG_ITEMS) * MOST * MAX_PRICE / 1e6 * (1 + 1e-12)
#: More calls than any server makes: a billion a second for over 30,000 years.
LIFETIME_CALLS = 10**21


def test_the_bound_leaves_the_sum_finite_over_any_lifetime() -> None:
    assert CALL_BOUND < 7.1e18
    assert math.isfinite(CALL_BOUND * LIFETIME_CALLS) and CALL_BOUND * LIFETIME_CALLS < sys.float_info.max / 1e250


# --- the table's bound -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", _KINDS)
def test_a_price_up_to_a_dollar_a_token_is_taken_and_one_past_it_refused_naming_it(kind: str) -> None:
    entry = {"input": 2.5, "output": 10.0}
    assert getattr(PricingTable({"m": {**entry, kind: MAX_PRICE}}).price("m"), kind) == MAX_PRICE
    past = math.nextafter(MAX_PRICE, math.inf)
    with pytest.raises(
        ConfigurationError, match=rf"pricing for 'm': {kind} is .* at most 1,000,000 \(a dollar a token\)"
    ):
        PricingTable({"m": {**entry, kind: past}})
    with pytest.raises(ConfigurationError, match=rf"{kind} is 1e\+300 USD per million tokens"):
        PricingTable({"m": {**entry, kind: 10**300}})  # (an integer, as a YAML or JSON file may give it)


# --- any prices, any counts -----------------------------------------------------------------------------------------

#: Any finite price, and the bound and the prices around it.
prices = st.floats(0, sys.float_info.max) | st.sampled_from(
    [0.0, 75.0, MAX_PRICE, math.nextafter(MAX_PRICE, math.inf), 1e300, sys.float_info.max]
)
counts = st.integers(0, MOST) | st.just(MOST)
parts = st.tuples(counts, counts)
sub_usage = st.tuples(counts, counts, counts, counts, counts, parts, parts, counts)
svg_usage = st.tuples(counts, counts).map(lambda c: (c[0], 0, 0, 0, c[1], (0, 0), (0, 0), 0))
EVERY_COUNT_AT_ITS_BOUND: dict[str, Any] = dict(
    own=(MOST,) * 9,
    advisors=[(MOST,) * 5] * MAX_ADVISOR_ENTRIES,
    image_tool=(MOST, MOST, MOST, MOST, MOST, (MOST, MOST), (MOST, MOST), MOST),
    svgs=[(MOST, 0, 0, 0, MOST, (0, 0), (0, 0), 0)] * MAX_SVG_ITEMS,
)


@settings(max_examples=400, deadline=None)
@example(entry=dict.fromkeys(_KINDS, MAX_PRICE), **EVERY_COUNT_AT_ITS_BOUND)
@example(entry={**dict.fromkeys(_KINDS, 1.0), "input": 1.7e308}, **EVERY_COUNT_AT_ITS_BOUND)
@given(
    entry=st.fixed_dictionaries({"input": prices, "output": prices}, optional=dict.fromkeys(_KINDS[2:], prices)),
    own=st.tuples(*[counts] * 9),
    advisors=st.lists(st.tuples(*[counts] * 5), max_size=MAX_ADVISOR_ENTRIES),
    image_tool=st.none() | sub_usage,
    svgs=st.lists(svg_usage, max_size=MAX_SVG_ITEMS),
)
def test_no_table_the_middleware_takes_lets_a_call_cost_past_the_bound(
    entry: dict[str, float],
    own: tuple[int, ...],
    advisors: list[tuple[int, int, int, int, int]],
    image_tool: Any,
    svgs: list[Any],
) -> None:
    """Any finite prices: a table with one past MAX_PRICE is refused; any other prices any counts the readers can
    give (each at most 2**53; at most 64 advisor consultations and 256 SVG images) at a finite cost of at most
    CALL_BOUND, so that no number of calls a server can make sums to infinity."""
    models = {"m": entry, "advisor": entry, "image": entry, "svg": entry}
    try:
        table = PricingTable(models)
    except ConfigurationError:
        assert max(entry.values()) > MAX_PRICE
        return
    assert max(entry.values()) <= MAX_PRICE
    fields = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cache_creation_1h_tokens",
              "input_audio_tokens", "input_image_tokens", "output_audio_tokens", "output_image_tokens")  # fmt: skip
    call = LLMCall("chat", "openai", start=0.0, request_model="m", **dict(zip(fields, own, strict=True)))
    call.advisor_usage = [("advisor", c) for c in advisors] or None
    call.image_tool_usage, call.image_tool_model = image_tool, "image"
    call.svg_usage = {n: ("svg", c) for n, c in enumerate(svgs)} or None
    cost = table.cost(call)
    assert cost is not None and math.isfinite(cost) and 0 <= cost <= CALL_BOUND, cost
    assert math.isfinite(cost * LIFETIME_CALLS)


# --- a real server at the bound -------------------------------------------------------------------------------------

#: An answer with every count at its bound: the response's own usage, the image generation tool's, and SVG images
#: past the number kept (each its own ``image_generation_call`` item with its author's ``svg_usage``).
SVG_IMAGES = MAX_SVG_ITEMS + 20


def most_answer(model: str) -> dict[str, Any]:
    svg = {"model": "author", "input_tokens": MOST, "output_tokens": MOST, "reasoning_tokens": 0, "total_tokens": 0}
    images = [
        {"type": "image_generation_call", "id": f"ig_{n}", "status": "completed", "result": "PHN2Zz4=",
         "output_format": "svg", "svg_usage": svg}
        for n in range(SVG_IMAGES)
    ]  # fmt: skip
    body = {
        "id": "resp_most", "object": "response", "created_at": 1, "model": model, "status": "completed",
        "output": images, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": MOST, "output_tokens": MOST, "total_tokens": MOST,
                  "input_tokens_details": {"cached_tokens": MOST, "cache_write_tokens": MOST},
                  "output_tokens_details": {"reasoning_tokens": 0}},
        "tool_usage": {"web_search": {"num_requests": 0}, "image_gen": {
            "input_tokens": MOST, "output_tokens": MOST, "total_tokens": MOST, "cached_tokens": MOST,
            "input_tokens_details": {"image_tokens": MOST, "text_tokens": 0},
            "cached_tokens_details": {"cached_image_tokens": MOST, "cached_text_tokens": 0}}},
    }  # fmt: skip
    return Response.model_validate(body).model_dump(mode="json", exclude_unset=True)


async def answer(request: Request) -> JSONResponse:
    return JSONResponse(most_answer((await request.json())["model"]))


@pytest.fixture(scope="module")
def most_expensive() -> Iterator[tuple[str, int, Calls]]:
    port, calls = free_port(), Calls()
    app = LLMTelemetryMiddleware(
        Starlette(routes=[Route("/v1/responses", answer, methods=["POST"])]),
        metrics_port=port,
        metrics_host="127.0.0.1",
        pricing={name: dict.fromkeys(_KINDS, MAX_PRICE) for name in ("gpt-5", "gpt-image-1", "author")},
        observers=[calls],
    )
    try:
        with serve(app) as base:
            yield base, port, calls
    finally:
        if app._telemetry is not None:
            app._telemetry.shutdown()


def test_an_answer_with_every_count_at_its_bound_costs_a_finite_sum_prometheus_reads(
    most_expensive: tuple[str, int, Calls], tmp_path: Path
) -> None:
    base, port, calls = most_expensive
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
    tool: Any = {"type": "image_generation", "model": "gpt-image-1"}
    for _ in range(2):
        answered = client.responses.create(model="gpt-5", input="Draw", tools=[tool])
    assert len(answered.output) == SVG_IMAGES and answered.usage is not None and answered.usage.input_tokens == MOST

    def both(m: Metrics) -> None:
        assert m.value("llm_requests_total", gen_ai_request_model="gpt-5") == 2 and len(calls.ended) == 2

    settled(port, both)
    m = whole_after(port)
    # Per call: its own cache reads, writes and output; the image tool's cached image input and its image output; the
    # first 256 SVG images' input and output: all at a dollar a token.
    per_call = (3 + 2 + 2 * MAX_SVG_ITEMS) * MOST * MAX_PRICE / 1e6
    assert per_call <= CALL_BOUND
    assert [c.cost_usd for c in calls.ended] == [pytest.approx(per_call, rel=1e-12)] * 2
    assert m.value("llm_cost_usd_total", gen_ai_request_model="gpt-5") == pytest.approx(2 * per_call, rel=1e-12)
    # (The images past the 256 kept are neither priced nor counted as unpriced.)
    assert m.value("llm_cost_unpriced_tokens_total", gen_ai_request_model="gpt-5") == 0
    scraped = tmp_path / "scrape.txt"
    scraped.write_text(scrape_text(port))
    checked = subprocess.run(["promtool", "check", "metrics"], stdin=scraped.open(), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "llm_cost_usd_total{" in scraped.read_text()
    json.dumps(calls.ended[0].cost_usd, allow_nan=False)  # (the request log line's value: finite JSON)

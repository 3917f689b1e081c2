"""The metric contract: a real scrape after varied traffic shows exactly the contract's names, types and labels."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_telemetry import instruments
from llm_telemetry.demo.app import create_app
from llm_telemetry.monitoring import reference
from support import FRESH, Metrics, free_port, scrape_text, serve

TOOLS: list[dict[str, object]] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
]
SCOPE_LABELS = {"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"}


@pytest.fixture(scope="module")
def scraped() -> Iterator[str]:
    port = free_port()
    app = create_app(
        first_token_delay=0.2,
        metrics_port=port,
        metrics_host="127.0.0.1",
        attribution_headers={"x-tenant-id": "tenant"},
    )
    with serve(app) as base:
        oai = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
        claude = anthropic.Anthropic(base_url=base, api_key="sk-test", max_retries=0)
        headers = {"x-tenant-id": "acme"}
        messages: Any = [{"role": "user", "content": "two words"}]
        for _chunk in oai.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        ):
            pass
        oai.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        oai.chat.completions.create(
            model="gpt-4o-mini",
            messages=[*messages, {"role": "tool", "tool_call_id": "call_demo1", "content": "sunny"}],  # type: ignore[list-item]
            tools=TOOLS,  # type: ignore[arg-type]
        )
        with pytest.raises(openai.RateLimitError):
            oai.chat.completions.create(model="gpt-4o", messages=messages, extra_headers={"x-demo-fail": "rate_limit"})
        claude.messages.create(model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
        oai.embeddings.create(model="an-unpriced-embedder", input="three words here")
        # A stream its client gives up on before the first token (llm_server_time_to_abandonment_seconds).
        impatient = oai.with_options(timeout=0.05)
        with pytest.raises(openai.APITimeoutError):
            for _chunk in impatient.chat.completions.create(model="gpt-4o", messages=messages, stream=True):
                pass
        # A call is recorded just after its response went out: wait for the seventh before reading the scrape.
        deadline = time.monotonic() + 10
        while Metrics(scrape_text(port, FRESH)).value("llm_requests_total") < 7 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield scrape_text(port, FRESH)
    app.telemetry.shutdown()


def test_scrape_has_exactly_the_contract_names_types_and_labels(scraped: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scraped)}
    ours = {name: f for name, f in families.items() if name.startswith(("llm", "gen_ai"))}
    # prometheus_client's parser drops the _total suffix from counter family names.
    expected = {spec.prometheus_name.removesuffix("_total"): spec for spec in instruments.CONTRACT}
    # llm_token_details (no cache or reasoning in this traffic), internal errors and bodies left unread for want of
    # room in the inspection budget need other traffic (test_inspection_budget.py counts those).
    assert set(ours) == set(expected) - {
        "llm_token_details",
        "llm_telemetry_internal_errors",
        "llm_telemetry_unread_bodies",
    }
    for name, family in ours.items():
        spec = expected[name]
        assert family.type == spec.prometheus_type, name
        allowed = set(spec.labels) | SCOPE_LABELS | {"le"}
        if spec.attributed:
            allowed.add("llm_metadata_tenant")
        for sample in family.samples:
            present = {k for k, v in sample.labels.items() if v != ""}
            assert present <= allowed, (name, present - allowed)
            assert set(sample.labels) <= allowed, (name, set(sample.labels) - allowed)


def test_token_types_on_the_billable_counter_are_input_and_output_only(scraped: str) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scraped)}
    types = {s.labels["gen_ai_token_type"] for s in families["llm_tokens"].samples}
    assert types == set(instruments.TOKEN_TYPES) == {"input", "output"}


def test_prometheus_names_follow_the_exporter() -> None:
    # The exporter's rules, spelled out for a few: seconds for "s", usd kept, {annotations} dropped, _total.
    assert instruments.REQUEST_DURATION.prometheus_name == "gen_ai_server_request_duration_seconds"
    assert instruments.COST.prometheus_name == "llm_cost_usd_total"
    assert instruments.TOKENS.prometheus_name == "llm_tokens_total"
    assert instruments.TOKEN_DETAILS.prometheus_name == "llm_token_details_total"
    assert instruments.REQUESTS_ACTIVE.prometheus_name == "llm_requests_active"
    assert len(instruments.BY_PROMETHEUS_NAME) == len(instruments.CONTRACT)


def test_select_keeps_declared_keys_with_values_and_attribution_where_it_applies() -> None:
    values = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "m",
              "error.type": None, "gen_ai.tool.name": "t"}  # fmt: skip
    attributed = instruments.select(instruments.REQUESTS, values, {"tenant": "acme"})
    assert attributed == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                          "gen_ai.request.model": "m", "llm.metadata.tenant": "acme"}  # fmt: skip
    assert "llm.metadata.tenant" not in instruments.select(instruments.UNPRICED_TOKENS, values, {"tenant": "acme"})


def test_docs_metric_table_is_the_rendering_of_the_contract() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    start, end = text.index(reference.BEGIN), text.index(reference.END) + len(reference.END) + 1
    assert text[start:end] == reference.render_metric_table(), (
        "regenerate the table with llm_telemetry.monitoring.reference.render_metric_table()"
    )
    for spec in instruments.CONTRACT:
        assert f"| `{spec.name}` |" in text and f"`{spec.prometheus_name}`" in text


def _documented_buckets() -> dict[str, list[float]]:
    """The boundaries table of docs/metrics.md ("### Buckets"), by the first words of its histogram column."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    section = text[text.index("### Buckets") :]
    rows = {}
    for line in section.splitlines()[4:]:
        if not line.startswith("| "):
            break
        _, name, bounds, _ = line.split("|")
        rows[name.strip()] = [float(b.strip(" *")) for b in bounds.split(",")]
    return rows


def test_scraped_histogram_buckets_are_the_documented_boundaries(scraped: str) -> None:
    """What a dashboard's histogram_quantile and the alert rules' le="..." selectors read: each latency
    histogram's le values in a real scrape are the documented boundaries and +Inf, in order, no more and no fewer."""
    documented = _documented_buckets()
    expected = {
        "gen_ai_server_request_duration_seconds": documented["request duration"],
        "gen_ai_server_time_to_first_token_seconds": documented["time to first token (and time to abandonment)"],
        "llm_server_time_to_abandonment_seconds": documented["time to first token (and time to abandonment)"],
        "gen_ai_server_time_per_output_token_seconds": documented["time per output token"],
    }
    families = {f.name: f for f in text_string_to_metric_families(scraped)}
    for name, bounds in expected.items():
        by_series: dict[tuple[tuple[str, str], ...], list[float]] = {}
        for sample in families[name].samples:
            if sample.name == name + "_bucket":
                key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                by_series.setdefault(key, []).append(float(sample.labels["le"]))
        assert by_series, name
        for les in by_series.values():
            assert les == [*bounds, math.inf], name


class _Entered:
    """A lock that counts the times it was taken."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered = 0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.entered += 1

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_a_calls_points_and_their_collection_share_one_lock() -> None:
    """The recorder writes a call's points under ``Instruments.lock``; the sums and histograms must be collected
    under that same lock, or a scrape (in the listener's thread) iterates the totals while the event loop adds a
    series to them. The default instruments share the histograms' lock, and a summed instrument takes the lock it is
    given both to add and to be collected."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from llm_telemetry.config import Settings
    from llm_telemetry.telemetry import Telemetry

    telemetry = Telemetry(Settings.resolve(metrics_port=0, request_logs=False, multiproc_dir="off"))
    try:
        assert telemetry.histograms is not None
        assert telemetry.instruments.lock is telemetry.histograms.lock
    finally:
        telemetry.shutdown()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    lock = _Entered()
    summed = instruments.SummedInstrument(provider.get_meter("t"), "t.sum", "1", "t", lock=lock)  # type: ignore[arg-type]
    summed.add(1, {"k": "v"})
    assert lock.entered == 1
    data = reader.get_metrics_data()
    assert lock.entered == 2
    assert data is not None and data.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0].value == 1
    provider.shutdown()

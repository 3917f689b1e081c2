"""Label combinations past the cardinality limit, in one process and across workers.

Each label keeps at most ``max_label_values`` values, but their combinations multiply: 100 models sent by a client
times 100 tenants is 10,000 series of every metric, each histogram series ~18 lines. Like the OpenTelemetry SDK,
every instrument keeps at most CARDINALITY_LIMIT attribute sets and adds the rest to series marked
``otel_metric_overflow="true"`` (one per combination of the few-valued labels, such as the error type), so totals
stay exact while the scrape and the memory behind it stay bounded: in one process, in each worker's file, and in
the archive that stopped workers are folded into.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from llm_telemetry import multiproc
from llm_telemetry.config import Settings
from llm_telemetry.instruments import CARDINALITY_LIMIT
from llm_telemetry.labels import LabelLimiter
from llm_telemetry.record import LLMCall, ToolResult
from llm_telemetry.telemetry import Telemetry
from otlp_receiver import isolated_env, otlp_receiver, tracing_env
from support import Metrics

#: Distinct models and tenants per run: 60 x 60 = 3,600 combinations, past the limit, within the label caps.
SIDE = 60
SERIES_METRICS = (
    "llm_requests_total",
    "llm_tokens_total",
    "gen_ai_server_request_duration_seconds_count",
    "gen_ai_server_time_to_first_token_seconds_count",
)


def _record(telemetry: Telemetry, models: range, tenants: range) -> int:
    """One streamed call per (model, tenant), as the middleware records it; the number of calls."""
    recorder, limit = telemetry.recorder, telemetry.limit
    count = 0
    for m in models:
        for t in tenants:
            call = LLMCall("chat", "openai", 100.0, request_model=f"model-{m:03d}")
            call.attribution = {"tenant": limit("tenant", f"tenant-{t:03d}")}
            call.stream = True
            call.first_token_at, call.end = 100.05, 100.5
            call.input_tokens, call.output_tokens = 3, 5
            recorder.start(call)
            recorder.end(call)
            count += 1
    return count


def _telemetry(tmp_path: Path, workers: bool) -> Telemetry:
    return Telemetry(
        Settings.resolve(
            metrics_port=0,
            request_logs=False,
            attribution_headers={"x-tenant-id": "tenant"},
            multiproc_dir=str(tmp_path / "state") if workers else "off",
        )
    )


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "worker-file"])
def test_series_stop_at_the_limit_and_the_rest_is_counted_in_overflow(tmp_path: Path, workers: bool) -> None:
    telemetry = _telemetry(tmp_path, workers)
    try:
        assert (telemetry.workers is not None) == workers
        calls = _record(telemetry, range(SIDE), range(SIDE))
        text = generate_latest(telemetry.registry).decode()
    finally:
        telemetry.shutdown()
    # (The metrics checked, without the ~18 bucket lines of each histogram series: parsing them all takes seconds.)
    metrics = Metrics("\n".join(line for line in text.splitlines() if line.startswith(SERIES_METRICS)) + "\n")
    assert calls > CARDINALITY_LIMIT
    for name in SERIES_METRICS:
        series = [s for s in metrics.samples if s.name == name]
        overflow = [s for s in series if s.labels.get("otel_metric_overflow") == "true"]
        # A call makes one series of each metric, two of the tokens (input and output: 8 tokens a call).
        sets, per_call, each = (2, 8, {3, 5}) if name == "llm_tokens_total" else (1, 1, {1})
        kept_calls = CARDINALITY_LIMIT // sets
        # One overflow series per combination of the labels with few values: here the token type alone varies.
        assert len(series) == CARDINALITY_LIMIT + len(overflow) and len(overflow) == sets, name
        assert sum(s.value for s in series) == calls * per_call, name
        assert sum(s.value for s in overflow) == (calls - kept_calls) * per_call, name
        for s in overflow:
            # The many-valued labels are left out (empty in the scrape), the few-valued ones kept.
            assert not s.labels.get("gen_ai_request_model") and not s.labels.get("llm_metadata_tenant"), name
            assert s.labels["gen_ai_operation_name"] == "chat" and s.labels["gen_ai_provider_name"] == "openai"
        if name == "llm_tokens_total":
            by_type = {s.labels["gen_ai_token_type"]: s.value for s in overflow}
            assert by_type == {"input": (calls - kept_calls) * 3, "output": (calls - kept_calls) * 5}
        # The series kept are the first ones recorded, each with its own labels and count.
        first = {
            s.labels["gen_ai_request_model"] for s in series if s.labels.get("llm_metadata_tenant") == "tenant-000"
        }
        assert first == {f"model-{m:03d}" for m in range(SIDE) if m * SIDE < kept_calls}, name
        assert {s.value for s in series if s not in overflow} == each, name


def _fail(telemetry: Telemetry, model: int, tenant: int, error: str) -> None:
    call = LLMCall("chat", "openai", 100.0, request_model=f"model-{model:03d}")
    call.attribution = {"tenant": telemetry.limit("tenant", f"tenant-{tenant:03d}")}
    call.stream = error == "client_disconnect"
    call.status_code = {"client_disconnect": 200, "rate_limit": 429, "server_error": 500}.get(error, 400)
    call.error_type = error
    call.end = 100.5
    telemetry.recorder.start(call)
    telemetry.recorder.end(call)


def _record_errors(telemetry: Telemetry) -> tuple[int, dict[str, int]]:
    """A success and a rate limit for every (model, tenant), then 30 errors of each of three other types, past the
    limit: the successes, and the count of each late error type."""
    successes = _record(telemetry, range(SIDE), range(SIDE))
    for m, t in itertools.product(range(SIDE), range(SIDE)):  # every place of the errors taken, some overflow
        _fail(telemetry, m, t, "rate_limit")
    late = {"context_length": 0, "server_error": 0, "client_disconnect": 0}
    for i in range(90):
        error = list(late)[i % 3]
        late[error] += 1
        _fail(telemetry, i % SIDE, SIDE - 1 - i % SIDE, error)
    return successes, late


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "worker-file"])
def test_errors_past_the_limit_keep_their_error_type(tmp_path: Path, workers: bool) -> None:
    """The errors counted past the series limit keep their error type, the stream flag, operation and provider:
    an availability rule or error ratio that leaves client errors out (error_type!="invalid_request"...) must not
    count them as the service's failures, as it would if the overflow series had no error type at all."""
    telemetry = _telemetry(tmp_path, workers)
    try:
        successes, late = _record_errors(telemetry)
        text = generate_latest(telemetry.registry).decode()
    finally:
        telemetry.shutdown()
    wanted = ("llm_errors_total", "llm_requests_total")
    metrics = Metrics("\n".join(line for line in text.splitlines() if line.startswith(wanted)) + "\n")

    def overflow(name: str) -> dict[tuple[str, str], float]:
        return {
            (s.labels.get("error_type", ""), s.labels["gen_ai_request_stream"]): s.value
            for s in metrics.samples
            if s.name == name and s.labels.get("otel_metric_overflow") == "true"
        }

    fills = SIDE * SIDE
    assert overflow("llm_errors_total") == {
        ("rate_limit", "false"): fills - CARDINALITY_LIMIT,
        ("context_length", "false"): late["context_length"],
        ("server_error", "false"): late["server_error"],
        ("client_disconnect", "true"): late["client_disconnect"],
    }
    assert overflow("llm_requests_total") == {
        ("", "true"): successes - CARDINALITY_LIMIT,
        ("rate_limit", "false"): fills,
        ("context_length", "false"): late["context_length"],
        ("server_error", "false"): late["server_error"],
        ("client_disconnect", "true"): late["client_disconnect"],
    }


@pytest.mark.parametrize(
    ("preference", "workers", "kept"),
    [("cumulative", False, True), ("delta", False, False), ("cumulative", True, False)],
    ids=["one-process", "delta", "worker-file"],
)
def test_errors_past_the_limit_over_otlp(tmp_path: Path, preference: str, workers: bool, kept: bool) -> None:
    """What a real OTLP receiver gets of the errors past the series limit, beside the scrape. One process, pushing
    cumulative sums (the default): the overflow points keep the error type (and the stream flag, operation and
    provider), as the scrape's overflow series do. Where the SDK's own instruments count (an exporter asking for
    delta sums; each worker's push under several workers) its overflow point has ``otel.metric.overflow`` alone:
    every error type in one point with none, which an availability query over the pushed numbers counts as the
    service's failures (metrics.md#bounds says so). The scrape keeps them apart unless the SDK's instruments feed it
    too (delta)."""
    with otlp_receiver() as receiver:
        env = tracing_env(
            receiver,
            LLM_TELEMETRY_METRICS_EXPORTER="prometheus,otlp",
            OTEL_METRIC_EXPORT_INTERVAL="3600000",  # exports only when flushed below
            OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=preference,
        )
        with isolated_env(env):
            telemetry = _telemetry(tmp_path, workers)
        try:
            _, late = _record_errors(telemetry)
            text = generate_latest(telemetry.registry).decode()
            assert telemetry.meter_provider is not None and telemetry.meter_provider.force_flush()
            assert receiver.wait_for(lambda r: r.metric_exports >= 1)
        finally:
            telemetry.shutdown()
    scraped = Metrics("\n".join(line for line in text.splitlines() if line.startswith("llm_errors_total")) + "\n")
    in_scrape = {
        s.labels.get("error_type", ""): s.value
        for s in scraped.samples
        if s.name == "llm_errors_total" and s.labels.get("otel_metric_overflow") == "true"
    }
    pushed = [p for p in receiver.metrics if p.name == "llm.errors" and p.export == 0]
    in_push = {p.attributes.get("error.type", ""): p.value for p in pushed if p.attributes.get("otel.metric.overflow")}
    assert sum(p.value for p in pushed) == SIDE * SIDE + sum(late.values())  # (every total exact either way)
    by_type = {"rate_limit": SIDE * SIDE - CARDINALITY_LIMIT, **late}
    assert in_push == (by_type if kept else {"": sum(by_type.values())})
    assert in_scrape == (by_type if kept or workers else {"": sum(by_type.values())})
    if kept:
        overflow = [p.attributes for p in pushed if p.attributes.get("otel.metric.overflow")]
        assert all(a["gen_ai.operation.name"] == "chat" and "gen_ai.request.model" not in a for a in overflow)


def test_memory_stops_growing_at_the_limit(tmp_path: Path) -> None:
    """Past the limit a new attribute set costs nothing kept: measured with tracemalloc, 10,000 more sets added to
    a counter and recorded in a histogram leave less than 100 KB (each one kept costs more than 1 KB)."""
    telemetry = _telemetry(tmp_path, workers=False)
    counter, histogram = telemetry.instruments.requests, telemetry.instruments.request_duration

    def record(models: range) -> None:
        for m in models:
            attributes = {"gen_ai.request.model": f"model-{m}", "llm.metadata.tenant": "tenant"}
            counter.add(1, attributes)
            histogram.record(0.5, attributes)

    tracemalloc.start()
    try:
        record(range(CARDINALITY_LIMIT + 1))  # the limit reached, the overflow series made
        before = tracemalloc.get_traced_memory()[0]
        record(range(CARDINALITY_LIMIT + 1, CARDINALITY_LIMIT + 10_001))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        telemetry.shutdown()
    assert grown < 100_000


def test_stopped_workers_fold_into_an_archive_bounded_like_a_worker(tmp_path: Path) -> None:
    """Workers that come and go, each with its own CARDINALITY_LIMIT series: the archive of the stopped ones keeps
    the series it has and adds new ones to the overflow series, every field of a series together."""
    directory = str(tmp_path)
    supervisor = multiproc.Supervisor("parent", os.getpid())

    def key(field: str, series: str) -> str:
        return json.dumps(["gen_ai.server.request.duration", field, [["gen_ai.request.model", series]]])

    for worker in range(3):
        state = multiproc.SharedState(directory, supervisor)
        # The first worker's series, then each worker's own: a histogram series is several keys (buckets, sum).
        names = [f"w0-{i}" for i in range(100)] + [f"w{worker}-{i}" for i in range(100, CARDINALITY_LIMIT)]
        for name in names:
            state.add(key("b3", name), 1)
            state.add(key("s", name), 0.25)
        state.close()  # the next merge folds its file into the archive
    mine = multiproc.SharedState(directory, supervisor)
    try:
        merged = mine.merged()
        assert mine.merged() == merged  # each file folded once
    finally:
        mine.close()
    series: dict[str, dict[str, float]] = {}
    for stored, value in merged.items():
        _name, field, attributes = json.loads(stored)
        series.setdefault(json.dumps(attributes), {})[field] = value
    overflow = series.pop(json.dumps([["otel.metric.overflow", True]]))
    assert len(series) == CARDINALITY_LIMIT
    assert all(fields.keys() == {"b3", "s"} for fields in series.values())
    shared = [json.dumps([["gen_ai.request.model", f"w0-{i}"]]) for i in range(100)]
    assert all(series.pop(name) == {"b3": 3, "s": 0.75} for name in shared)
    # The rest are one worker's own series (the first folded), whole; the other two workers' went to overflow.
    owners = {json.loads(name)[0][1].partition("-")[0] for name in series}
    assert len(owners) == 1 and all(fields == {"b3": 1, "s": 0.25} for fields in series.values())
    assert overflow == {"b3": 2 * (CARDINALITY_LIMIT - 100), "s": 0.25 * 2 * (CARDINALITY_LIMIT - 100)}


def test_the_archive_adds_series_past_its_places_to_the_overflow_of_their_few_valued_labels(tmp_path: Path) -> None:
    """Past the archive's places, a stopped worker's series go to the overflow series of their few-valued labels
    (the error type here; the model left out), not to one with no labels at all: an availability rule still tells a
    client's errors from the service's failures."""
    directory = str(tmp_path)
    supervisor = multiproc.Supervisor("parent", os.getpid())

    def key(model: str, error: str) -> str:
        attributes = [["error.type", error], ["gen_ai.request.model", model]]
        return json.dumps(["llm.errors", "c", attributes], separators=(",", ":"))

    mine = multiproc.SharedState(directory, supervisor)
    try:
        filler = multiproc.SharedState(directory, supervisor)
        for i in range(CARDINALITY_LIMIT):
            filler.add(key(f"m{i}", "timeout"), 1)
        filler.close()
        mine.merged()  # the filler's series take every place
        late = multiproc.SharedState(directory, supervisor)
        late.add(key("x1", "invalid_request"), 2)
        late.add(key("x2", "server_error"), 3)
        late.add(key("x3", "server_error"), 4)
        late.close()
        merged = mine.merged()
    finally:
        mine.close()
    overflow = {}
    for stored, value in merged.items():
        attributes = dict(json.loads(stored)[2])
        if attributes.get("otel.metric.overflow"):
            assert "gen_ai.request.model" not in attributes
            overflow[attributes["error.type"]] = value
    assert overflow == {"invalid_request": 2, "server_error": 7}


def test_a_series_once_shown_never_moves_or_goes_down_when_its_worker_dies(tmp_path: Path) -> None:
    """The worker holding the port merges while others record and die. A live series shown before the archive's places
    are taken keeps its own series after its worker dies; one first recorded after they are taken is shown in the
    overflow series from the start. So across every merge, each series shown is still there, never lower (a drop
    is a counter reset to Prometheus, and increase() would count requests that never happened), and the total is
    exact."""
    directory = str(tmp_path)
    supervisor = multiproc.Supervisor("parent", os.getpid())

    def key(series: str) -> str:
        return json.dumps(["llm.requests", "c", [["gen_ai.request.model", series]]], separators=(",", ":"))

    scraper = multiproc.SharedState(directory, supervisor)
    script = (
        "import sys, time\n"
        "from llm_telemetry import multiproc\n"
        f"state = multiproc.SharedState({directory!r}, multiproc.Supervisor('parent', {os.getpid()}))\n"
        "for line in sys.stdin:\n"
        "    key, amount = line.rsplit(' ', 1)\n"
        "    state.add(key, float(amount))\n"
        "    print('ok', flush=True)\n"
    )
    workers: list[subprocess.Popen[str]] = []

    def worker() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        workers.append(process)
        return process

    def add(process: subprocess.Popen[str], series: str, amount: int) -> None:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(f"{key(series)} {amount}\n")
        process.stdin.flush()
        assert process.stdout.readline() == "ok\n"

    def kill(process: subprocess.Popen[str]) -> None:
        process.kill()
        process.wait(timeout=10)

    shown: list[dict[str, float]] = []
    try:
        early, late = worker(), worker()
        add(early, "early", 3)
        shown.append(scraper.merged())  # "early" is shown: it takes a place in the archive
        # Workers that die fill every other place (and one more series than there are places).
        for first in (0, CARDINALITY_LIMIT // 2):
            filler = multiproc.SharedState(directory, supervisor)
            for i in range(first, first + CARDINALITY_LIMIT // 2):
                filler.add(key(f"filler-{i}"), 1)
            filler.close()
            shown.append(scraper.merged())
        add(early, "early", 1)
        add(late, "late", 5)  # recorded once no place is left
        add(late, "filler-0", 2)  # a series with a place, recorded by a live worker
        shown.append(scraper.merged())
        kill(early)
        shown.append(scraper.merged())
        kill(late)
        shown.append(scraper.merged())
        shown.append(scraper.merged())
    finally:
        for process in workers:
            kill(process)
        scraper.close()
    for before, after in itertools.pairwise(shown):
        moved = {k: (v, after.get(k)) for k, v in before.items() if after.get(k, -1.0) < v}
        assert not moved, moved
    final = shown[-1]
    (overflow,) = [k for k in final if json.loads(k)[2] == [["otel.metric.overflow", True]]]
    assert final[key("early")] == 4 and final[key("filler-0")] == 3
    assert key("late") not in final and not any(key("late") in merged for merged in shown)
    assert final[overflow] == 5 + 1  # the late series, and the one filler past the places
    assert sum(final.values()) == 4 + 5 + 2 + CARDINALITY_LIMIT


def test_files_of_dead_workers_go_when_a_worker_joins_without_a_scrape(tmp_path: Path) -> None:
    """Recycled workers (gunicorn --max-requests) with nothing scraping, or no metrics port: each worker joining folds
    the files of those that died, so the directory holds the live workers' files and the archive, not one pair of
    files per worker ever started; and the counts are all there at the next scrape."""
    directory = str(tmp_path)
    supervisor = multiproc.Supervisor("parent", os.getpid())
    counter = json.dumps(["llm.requests", "c", []], separators=(",", ":"))
    script = (
        "from llm_telemetry import multiproc\n"
        f"state = multiproc.SharedState({directory!r}, multiproc.Supervisor('parent', {os.getpid()}))\n"
        f"state.add({counter!r}, 1)\n"
        "print('ok', flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    for _ in range(12):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None and process.stdout.readline() == "ok\n"
            files = [p.name for p in tmp_path.iterdir() if p.name.startswith("w")]
            assert len(files) <= 4, files  # this worker's pair, and the pair of the one before it at most
        finally:
            process.kill()  # recycled as a worker dies: no clean exit
            process.wait(timeout=10)
    scraper = multiproc.SharedState(directory, supervisor)
    try:
        assert scraper.merged() == {counter: 12}
    finally:
        scraper.close()


@contextlib.contextmanager
def _two_workers(tmp_path: Path, places: int) -> Iterator[tuple[LabelLimiter, LabelLimiter]]:
    """The label limiters of two workers of one deployment (``places`` values per label), sharing their values
    through the state in ``tmp_path``: one to serve requests, one to refuse them."""
    supervisor = multiproc.Supervisor("parent", os.getpid())
    first, second = (multiproc.SharedState(str(tmp_path), supervisor) for _ in range(2))
    try:
        served, refusing = LabelLimiter(places), LabelLimiter(places)
        served.share(first)
        refusing.share(second)
        yield served, refusing
    finally:
        first.close()
        second.close()


def test_a_refusal_keeps_the_name_of_a_model_another_worker_admitted(tmp_path: Path) -> None:
    """A refused request admits no new model name; one another worker of the deployment admitted is known all the
    same, on a worker that has not served it (a new or restarted one), and junk still takes no place."""
    with _two_workers(tmp_path, 3) as (served, refusing):
        assert served("model", "gpt-4o") == "gpt-4o"
        assert refusing.known("model", "gpt-4o") == "gpt-4o"
        for i in range(20):
            assert refusing.known("model", f"junk-{i}") == "other"
        assert [served("model", m) for m in ("claude", "mistral", "llama")] == ["claude", "mistral", "other"]


def test_a_refusal_naming_a_model_before_any_is_admitted_takes_no_place(tmp_path: Path) -> None:
    """The first value a deployment hears of may come with a refused request: it is ``other`` and takes none of
    the label's places, which all go to served requests."""
    with _two_workers(tmp_path, 2) as (served, refusing):
        assert refusing.known("model", "junk") == "other"
        assert [served("model", m) for m in ("gpt-4o", "claude", "junk")] == ["gpt-4o", "claude", "other"]
        assert refusing("model", "mistral") == "other"  # served on the other worker, past the places taken


def test_label_values_are_other_while_the_shared_values_cannot_be_read(tmp_path: Path) -> None:
    """When the deployment's shared label values cannot be read (their file is not a file), a worker stays within
    the bound: a new value is ``other``, on a served request and on a refused one, rather than kept unchecked; a
    value it admitted before keeps its name."""
    with _two_workers(tmp_path, 3) as (served, refusing):
        assert served("model", "gpt-4o") == "gpt-4o"
        labels = tmp_path / "labels.json"
        labels.unlink()
        labels.mkdir()  # reading it now fails with an OSError other than "not found"
        assert refusing.known("model", "junk") == "other"
        assert served("model", "claude") == "other"
        assert served("model", "gpt-4o") == "gpt-4o"


def test_the_invisible_characters_are_every_format_and_control_character_beyond_ascii() -> None:
    """What a label value may not hold and a raw log line spells out is, beyond ASCII, exactly the interpreter's
    Unicode categories Cc, Cf, Zl and Zp: no soft hyphen, Arabic letter mark or tag character left out by hand."""
    import sys
    import unicodedata

    from llm_telemetry.labels import INVISIBLE, label_value

    expected = {
        code for code in range(0x80, sys.maxunicode + 1) if unicodedata.category(chr(code)) in ("Cc", "Cf", "Zl", "Zp")
    }
    found = {code for code in range(0x80, sys.maxunicode + 1) if INVISIBLE.fullmatch(chr(code))}
    assert expected <= found
    # Beyond this interpreter's categories, only what its Unicode database has not assigned yet: the class holds the
    # newest Python's (U+13439..U+1343F are format characters from Unicode 15.0, Python 3.12).
    assert all(unicodedata.category(chr(code)) == "Cn" for code in found - expected)
    for char in ("\u00ad", "\u061c", "\u202e", "\U000e0041", "\x85", "\u2028", "\U0001343f"):  # (Unicode 15)
        assert label_value(f"gpt{char}4o") == "other"
    assert label_value("gpt-4o-é") == "gpt-4o-é"


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "worker-file"])
def test_tokens_past_the_limit_keep_their_detail_and_usage_source(tmp_path: Path, workers: bool) -> None:
    """Past the series limit, the token counters keep llm_token_detail and llm_usage_source (labels of few values):
    a cache-hit ratio (sum by llm_token_detail) or the share of estimated tokens stays exact, where an overflow
    series without them would lump cache reads, cache writes and reasoning (or reported and estimated) together."""
    telemetry = _telemetry(tmp_path, workers)
    recorder, limit = telemetry.recorder, telemetry.limit
    calls = {"estimated": 0, "reported": 0}
    try:
        for i, (m, t) in enumerate(itertools.product(range(SIDE), range(SIDE))):
            call = LLMCall("chat", "openai", 100.0, request_model=f"model-{m:03d}")
            call.attribution = {"tenant": limit("tenant", f"tenant-{t:03d}")}
            call.end = 100.5
            call.input_tokens, call.output_tokens = 10, 5
            call.cache_read_tokens, call.cache_creation_tokens, call.reasoning_tokens = 4, 2, 3
            # Output counted by the middleware (no usage reported); input and its parts are the provider's.
            call.usage_source = "estimated" if i % 3 == 0 else "reported"
            calls[call.usage_source] += 1
            recorder.start(call)
            recorder.end(call)
        text = generate_latest(telemetry.registry).decode()
    finally:
        telemetry.shutdown()
    total = sum(calls.values())
    wanted = ("llm_token_details_total", "llm_tokens_total")
    metrics = Metrics("\n".join(line for line in text.splitlines() if line.startswith(wanted)) + "\n")

    def sums(name: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
        series = [s for s in metrics.samples if s.name == name]
        overflow = [s for s in series if s.labels.get("otel_metric_overflow") == "true"]
        assert overflow and len(series) == CARDINALITY_LIMIT + len(overflow), name
        out: dict[tuple[str, ...], float] = {}
        for s in series:
            key = tuple(s.labels[label] for label in labels)
            out[key] = out.get(key, 0) + s.value
        return out

    assert sums("llm_token_details_total", ("llm_token_detail", "gen_ai_token_type", "llm_usage_source")) == {
        ("cache_read", "input", "reported"): 4 * total,
        ("cache_creation", "input", "reported"): 2 * total,
        ("reasoning", "output", "reported"): 3 * total,
    }
    assert sums("llm_tokens_total", ("gen_ai_token_type", "llm_usage_source")) == {
        ("input", "reported"): 10 * total,
        ("output", "reported"): 5 * calls["reported"],
        ("output", "estimated"): 5 * calls["estimated"],
    }


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "worker-file"])
def test_tool_results_past_the_limit_keep_their_status(tmp_path: Path, workers: bool) -> None:
    """With the label cap raised (here to 1,200 values), one provider's tool names times the two statuses pass the
    series limit: the tool results counted past it keep llm_tool_status, so a tool error ratio stays exact."""
    settings = Settings.resolve(
        metrics_port=0,
        request_logs=False,
        max_label_values=1200,
        multiproc_dir=str(tmp_path / "state") if workers else "off",
    )
    telemetry = Telemetry(settings)
    recorder = telemetry.recorder
    tools = 1100  # 2,200 (tool, status) pairs: past CARDINALITY_LIMIT, within the label cap
    try:
        for i in range(tools):
            call = LLMCall("chat", "openai", 100.0, request_model="gpt-4o")
            call.end = 100.5
            # Each tool once with an error, twice with a success, in one request.
            call.tool_results = [ToolResult(f"tool-{i:04d}", is_error) for is_error in (True, False, False)]
            recorder.start(call)
            recorder.end(call)
        text = generate_latest(telemetry.registry).decode()
    finally:
        telemetry.shutdown()
    metrics = Metrics("\n".join(line for line in text.splitlines() if line.startswith("llm_tool_results")) + "\n")
    series = [s for s in metrics.samples if s.name == "llm_tool_results_total"]
    overflow = [s for s in series if s.labels.get("otel_metric_overflow") == "true"]
    assert overflow and len(series) == CARDINALITY_LIMIT + len(overflow)
    assert all(not s.labels.get("gen_ai_tool_name") for s in overflow)
    by_status: dict[str, float] = {}
    for s in series:
        by_status[s.labels["llm_tool_status"]] = by_status.get(s.labels["llm_tool_status"], 0) + s.value
    assert by_status == {"error": tools, "success": 2 * tools}

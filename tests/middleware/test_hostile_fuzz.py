"""Fuzzing the SSE decoder and request parsing: long runs, not part of the default test run.

Two ways to run it:

* ``FUZZ_EXAMPLES=20000 pytest -m fuzz tests/middleware/test_hostile_fuzz.py``: the hypothesis properties of
  test_hostile_properties.py and the decoder's own ones below, with a large example budget per property.
* ``python tests/middleware/test_hostile_fuzz.py [libFuzzer options, e.g. -max_total_time=600]``: a coverage-guided
  atheris target (``pip install atheris``) over the same code: arbitrary bytes become a request body plus a
  response stream cut into arbitrary chunks, plain or under a content coding (compressed, or bytes that are not),
  through the real middleware.

Either way the properties are those of the property suite: the client sees the bare app's bytes, no exception
escapes our code, the decoder's events and the call's numbers do not depend on the chunking, and no internal error
is counted.

Latest long run (2 cores, Python 3.11, ``-max_total_time=600``): 328,634 inputs in 601 s, no failure, and the
scrape valid at the end. An earlier 600 s run, before the numbers were compared with whole-stream ones, took
397,231 inputs.
"""

from __future__ import annotations

import itertools
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_telemetry import LLMTelemetryMiddleware
from llm_telemetry.sse import SSEDecoder

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))

# Long by design: no per-test timeout (pytest-timeout's 300 s would cut the budget short). A run that selects
# markers of its own (``-m "not slow"`` replaces the default ``-m "not fuzz"``) still skips these without a budget.
pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.timeout(0),
    pytest.mark.skipif(EXAMPLES <= 0, reason="a fuzz run: set FUZZ_EXAMPLES (e.g. 20000) and pass -m fuzz"),
]
FUZZ = settings(max_examples=max(EXAMPLES, 1), deadline=None, suppress_health_check=list(HealthCheck))

SSE_ALPHABET = [b"data:", b"data: ", b"event: ", b":", b"\n", b"\r", b"\r\n", b"{", b"}", b"[", b'"', b"\xc3", b"x"]
sse_bytes = st.lists(st.sampled_from(SSE_ALPHABET) | st.binary(max_size=8), max_size=200).map(b"".join)


def decode(chunks: list[bytes], max_event_bytes: int) -> tuple[list[tuple[str, bytes]], int, str, bytes]:
    decoder = SSEDecoder(max_event_bytes)
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.close(), decoder.dropped_events, decoder.dropped_event, decoder.dropped_tail()


@FUZZ
@given(body=sse_bytes, cuts=st.lists(st.integers(0, 2000), max_size=30), limit=st.sampled_from([16, 64, 1 << 20]))
def test_hostile_fuzz_decoder_events_do_not_depend_on_chunking(body: bytes, cuts: list[int], limit: int) -> None:
    edges = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    chunks = [body[a:b] for a, b in itertools.pairwise(edges)]
    whole = decode([body], limit)
    assert decode(chunks, limit) == whole
    events = whole[0]
    assert all(len(data) <= limit for _, data in events)


def test_hostile_fuzz_properties_with_a_large_budget() -> None:
    """The property suite's checks, with the fuzz budget."""
    import test_hostile_properties as p

    calls = p.Calls()
    wrapped = LLMTelemetryMiddleware(
        p.scripted_app,
        metrics_port=0,
        metrics_app_path="/metrics",
        request_logs=False,
        echo_request_id=False,
        max_label_values=p.MAX_VALUES,
        attribution_headers={"x-tenant": "tenant"},
        observers=[calls],
    )
    observed = (wrapped, calls)
    paths = st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/responses"])
    text = p.hostile_text
    try:
        FUZZ(given(stream=p.chunked_streams())(lambda stream: p.check_chunking(observed, stream)))()
        FUZZ(given(stream=p.compressed_streams())(lambda stream: p.check_compressed(observed, stream)))()
        FUZZ(given(body=p.request_bodies, path=paths)(lambda body, path: p.check_request_body(observed, body, path)))()
        FUZZ(
            given(m=text, r=text, t=text, h=p.header_values)(
                lambda m, r, t, h: p.check_label_values(observed, m, r, t, h)
            )
        )()
    finally:
        wrapped.telemetry.shutdown()


# --- atheris ------------------------------------------------------------------------------------------------------


def _atheris_main() -> None:  # pragma: no cover - run by hand
    import atheris
    import test_hostile_properties as properties

    atheris.instrument_all()  # coverage feedback from everything loaded, llm_telemetry included

    calls = properties.Calls()
    wrapped = LLMTelemetryMiddleware(
        properties.scripted_app, metrics_port=0, metrics_app_path="/metrics", request_logs=False,
        echo_request_id=False, max_label_values=properties.MAX_VALUES, observers=[calls],
    )  # fmt: skip
    paths = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/completions", "/v1/embeddings"]
    content_types = [b"text/event-stream", b"application/json", b""]

    runs = 0

    def one_input(data: bytes) -> None:
        nonlocal runs
        runs += 1
        calls.ended.clear()  # the calls of earlier inputs: only memory here
        fdp = atheris.FuzzedDataProvider(data)
        path = paths[fdp.ConsumeIntInRange(0, len(paths) - 1)]
        status = fdp.PickValueInList([200, 200, 200, 400, 429, 500])
        content_type = content_types[fdp.ConsumeIntInRange(0, len(content_types) - 1)]
        request_body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
        stream = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8192))
        sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 64))]
        chunks, at = [], 0
        for size in sizes:
            chunks.append(stream[at : at + size])
            at += size
        chunks.append(stream[at:])
        headers = [(b"content-type", content_type)]
        coding = fdp.PickValueInList(["", "", "gzip", "deflate", "br", "zstd"])
        sent, whole = chunks, [stream]
        if coding:
            headers.append((b"content-encoding", coding.encode()))
            if fdp.ConsumeBool():  # the fuzzed bytes compressed as a stream compressor sends them, else as they are
                sent, whole = properties.compress_as_sent(coding, chunks), properties.compress_as_sent(coding, whole)
        properties.ANSWER.update(status=status, headers=headers, chunks=sent)
        call = properties.through_both((wrapped, calls), path, request_body)
        assert decode(chunks, 1 << 20) == decode([stream], 1 << 20)
        # The numbers are those of the same bytes sent in one piece.
        properties.ANSWER.update(chunks=whole)
        assert properties.numbers(call) == properties.numbers(
            properties.through_both((wrapped, calls), path, request_body)
        )
        if runs % 500 == 0:
            properties.check_scrape(wrapped)

    atheris.Setup(sys.argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        properties.check_scrape(wrapped)
        wrapped.telemetry.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]
    _atheris_main()

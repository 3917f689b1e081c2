"""The bounds of docs/metrics.md ("Bounds"), each at the number the docs give: the value on the bound is kept, the
one past it is not, and what happens past it is what the docs say."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from test_hostile_inputs import exchange, observe

from llm_telemetry.middleware import LLMTelemetryMiddleware, Router
from llm_telemetry.record import LLMCall
from support import Metrics

JSON = [(b"content-type", b"application/json")]


def answering(body: dict[str, Any]) -> Any:
    """An app that reads the whole request, then answers 200 with ``body`` as JSON."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    return app


def completion(**fields: Any) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        **fields,
    }


def calls_of(
    cleanup: list[LLMTelemetryMiddleware], answer: dict[str, Any], requests: list[dict[str, Any]], **options: Any
) -> tuple[list[LLMCall], Metrics]:
    """Send each request body to an app answering ``answer``; the calls recorded and the scrape after them."""
    wrapped, calls = observe(answering(answer), **options)
    cleanup.append(wrapped)

    async def run() -> list[dict[str, Any]]:
        for request in requests:
            headers = request.pop("_headers", None)
            await exchange(wrapped, "/v1/chat/completions", json.dumps(request).encode(), headers=headers)
        return await exchange(wrapped, "/metrics", method="GET")

    scrape = b"".join(m.get("body", b"") for m in asyncio.run(run())[1:])
    return calls.ended, Metrics(scrape.decode())


def test_a_label_value_of_256_characters_is_kept_and_one_of_257_is_other(cleanup: list[LLMTelemetryMiddleware]) -> None:
    kept, past = "m" * 256, "n" * 257
    _, metrics = calls_of(cleanup, completion(), [{"model": kept}, {"model": past}])
    models = {s.labels["gen_ai_request_model"] for s in metrics.samples if s.name == "llm_requests_total"}
    assert models == {kept, "other"}


@pytest.mark.parametrize(
    "control", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u202e", "\u200b", "\ufeff"]
)
def test_a_label_value_with_a_control_character_is_other_and_takes_no_place(
    cleanup: list[LLMTelemetryMiddleware], capsys: pytest.CaptureFixture[str], control: str
) -> None:
    """A line break or other control character in a model name would reach the request log's message, which log
    viewers print raw (a forged line), and the span named after the model."""
    forged = f"gpt-4o{control}level=error msg=forged"
    _, metrics = calls_of(
        cleanup, completion(), [{"model": forged}, {"model": "gpt-4o-mini"}], request_logs=True, max_label_values=1
    )
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"other", "gpt-4o-mini"}
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(line["message"], line["model"]) for line in lines] == [
        ("chat other 200", forged),  # the field keeps the model sent, escaped as JSON
        ("chat gpt-4o-mini 200", "gpt-4o-mini"),
    ]


@pytest.mark.parametrize(
    "model",
    [
        "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",  # a client that swapped its key and model settings
        "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "openai/sk-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "AKIAABCDEFGHIJKLMNOP",
    ],
)
def test_a_label_value_holding_a_secret_key_is_other(
    cleanup: list[LLMTelemetryMiddleware], capsys: pytest.CaptureFixture[str], model: str
) -> None:
    """A server that answers whatever the model (a local one, the demo) would otherwise make a metric label of a key;
    model names that merely look alike stay. The request log line shows the key masked."""
    alike = [
        "claude-3-5-sonnet-v2@20241022",
        "Helsinki-NLP/opus-mt-sk-en-finetuned-legal",
        "ft:gpt-4o-2024-08-06:acme:sk-learn-helper:9abcXYZ",
        "task-abcdefghijklmnopqrstuvwxyz0123456789",
    ]
    calls, metrics = calls_of(
        cleanup, completion(), [{"model": model}, *({"model": m} for m in alike)], request_logs=True
    )
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"other", *alike}
    assert model not in metrics.text
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 1 + len(alike) and "[key]" in lines[0]["model"] and model not in json.dumps(lines)
    assert [call.request_model for call in calls[1:]] == alike  # (the observers see the names that stay as sent)


#: Each shape of secret key docs/metrics.md names, at its least length, made of every kind of character it may hold
#: (upper and lower case, digits, and the "_" or "-" its shape allows), so a key missing any of them is shorter.
KEYS_AT_LEAST_LENGTH = [
    "sk-aB3dE5fG7h_9kL2mN4pQ-rS6tU8vW0xY",  # sk- and 32
    *(f"{prefix}_aB3dE5fG7hJ9kL2mN4pQ" for prefix in ("ghp", "gho", "ghs", "ghu")),  # and 20
    "github_pat_aB3dE5fG7h_9kL2mN4pQ",  # and 20
    "AKIAIOSFODNN7EXAMPLE",  # and 16 (AWS's documented example key id)
    "AIzaaB3dE5fG7h_9kL2mN4pQ-rS6tU8vW0",  # and 30
    *(f"xox{kind}-aB3-dE5fG7" for kind in "abprs"),  # and 10
]


@pytest.mark.parametrize("key", KEYS_AT_LEAST_LENGTH)
def test_each_secret_key_shape_is_other_from_its_least_length_and_a_character_less_is_kept(
    cleanup: list[LLMTelemetryMiddleware], capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """The key as a model name is ``other`` on the metrics and ``[key]`` on the request log line; the same text a
    character short of the shape's least length is a name like any other, kept on both."""
    short = key[:-1]
    _, metrics = calls_of(cleanup, completion(), [{"model": key}, {"model": short}], request_logs=True)
    assert metrics.label_values("llm_requests_total", "gen_ai_request_model") == {"other", short}
    assert key not in metrics.text
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [line["model"] for line in lines] == ["[key]", short]


def test_a_key_an_upstream_names_its_model_with_is_masked_for_the_log_line_too(
    cleanup: list[LLMTelemetryMiddleware],
) -> None:
    """The request names a plain model, the answer a key: the response model label is ``other``, and the call's
    response model, which the span and the observers read, shows the key as ``[key]``."""
    key = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
    (call,), metrics = calls_of(cleanup, completion(model=f"openai/{key}"), [{"model": "gpt-4o"}])
    assert metrics.label_values("llm_requests_total", "gen_ai_response_model") == {"other"}
    assert (call.request_model, call.response_model) == ("gpt-4o", "openai/[key]")
    assert key not in metrics.text


KEY_AT_CUT = "sk-proj-" + "AbCdEfGh12" * 5  # 58 characters


@pytest.mark.parametrize("kept", [0, 2, 20, 34, 57])  # the key's characters before the cut at 1,024
@pytest.mark.parametrize("separator", ["/", ":", " "])
def test_a_key_a_model_names_cut_goes_through_shows_none_of_it(
    cleanup: list[LLMTelemetryMiddleware], capsys: pytest.CaptureFixture[str], kept: int, separator: str
) -> None:
    """A model name over 1,024 characters is cut there for the span and the log line; a key the cut goes through is
    masked whole, though the part of it before the cut is shorter than a key's shape (the mask of a name that holds a
    key saw only that part). The name an upstream answers with is cut the same way."""
    name = "m" * (1023 - kept) + separator + KEY_AT_CUT + "/tail"
    answered = "n" * (1023 - kept) + separator + KEY_AT_CUT
    (call,), _ = calls_of(cleanup, completion(model=answered), [{"model": name}], request_logs=True)
    secret = KEY_AT_CUT[len("sk-") :]
    for shown in (call.request_model, call.response_model):
        assert shown is not None and len(shown) <= 1024
        assert not any(secret[:n] in shown for n in range(4, len(secret))), shown[-60:]
        if kept:
            assert shown.endswith("[key]"), shown[-60:]
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["model"] == call.request_model


@pytest.mark.parametrize("prefix", ["", "team-a/"])
def test_a_name_cut_through_a_key_is_other_as_a_label(cleanup: list[LLMTelemetryMiddleware], prefix: str) -> None:
    """A model name over 1,024 characters is past the label bound (256 characters) however short its cut shows it:
    one that starts with a key is ``[key]`` on the span and the log line, and ``other`` as a label, taking no place."""
    name = prefix + "sk-proj-" + "AbCdEfGh12" * 200
    (call,), metrics = calls_of(cleanup, completion(), [{"model": name}])
    assert call.request_model == prefix + "[key]"
    models = {s.labels["gen_ai_request_model"] for s in metrics.samples if s.name == "llm_requests_total"}
    assert models == {"other"}


def test_a_deployment_name_cut_through_a_key_in_the_path_shows_none_of_it(
    cleanup: list[LLMTelemetryMiddleware],
) -> None:
    """Azure OpenAI names the model in the path (``/openai/deployments/{name}/...``), which is cut at 1,024 characters
    for the span and the log line: a key that cut goes through is masked whole, in the path and in the model name
    taken from it."""
    wrapped, calls = observe(answering(completion()))
    cleanup.append(wrapped)
    head = "/openai/deployments/"
    deployment = "d" * (1024 - len(head) - 1 - 20) + "." + KEY_AT_CUT  # 20 of the key's characters before the cut
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    asyncio.run(exchange(wrapped, f"{head}{deployment}/chat/completions", body))
    (call,) = calls.ended
    secret = KEY_AT_CUT[len("sk-") :]
    for shown in (call.path, call.request_model):
        assert shown is not None and shown.endswith("[key]"), shown
        assert not any(secret[:n] in shown for n in range(4, len(secret))), shown[-60:]


def test_a_name_whose_cut_goes_through_no_key_is_cut_as_any_text() -> None:
    """What is not a key is cut as before: a run of a key's characters too short to be one, a name that only looks
    alike, one whose cut falls between runs."""
    from llm_telemetry.labels import name_text

    for name in (
        "m" * 1000 + "/sk-" + "a" * 20 + "!" + "x" * 50,  # 24 characters after sk-: no key
        "m" * 1000 + "/opus-mt-sk-en-finetuned-legal-and-much-more-text-here",
        "m" * 1024 + "/" + KEY_AT_CUT,  # the key starts after the cut: none of it is kept
        "m" * 1100,
    ):
        assert name_text(name) == name[:1024]
    assert name_text("short/" + KEY_AT_CUT) == "short/" + KEY_AT_CUT  # (mask_keys masks a whole key, later)


@pytest.mark.parametrize(
    ("finishes", "counted"),
    [
        ([(0, "length"), (0, "stop")], {"stop": 1}),  # an early finish, then the choice's final one
        ([(0, "length"), (1, "length"), (0, "stop")], {"length": 1, "stop": 1}),  # the other choice keeps "length"
    ],
)
def test_a_choices_finish_sent_again_with_another_word_counts_its_last(
    cleanup: list[LLMTelemetryMiddleware], finishes: list[tuple[int, str]], counted: dict[str, int]
) -> None:
    """A gateway that sends a choice's finish early, then its final word: the finish-reason metric counts the last,
    as the span and the OpenAI SDK's stream helper read it (a truncation ratio counted the early ``length``)."""

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return b"data: " + json.dumps({"id": "c1", "model": "gpt-4o", "choices": [choice]}).encode() + b"\n\n"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        events = [chunk(0, {"role": "assistant", "content": "Hi"}), chunk(1, {"content": "Yo"})]
        events += [chunk(index, {}, finish) for index, finish in finishes] + [b"data: [DONE]\n\n"]
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    wrapped, _ = observe(app)
    cleanup.append(wrapped)

    async def run() -> list[dict[str, Any]]:
        body = json.dumps({"model": "gpt-4o", "stream": True, "n": 2, "messages": []}).encode()
        await exchange(wrapped, "/v1/chat/completions", body)
        return await exchange(wrapped, "/metrics", method="GET")

    metrics = Metrics(b"".join(m.get("body", b"") for m in asyncio.run(run())[1:]).decode())
    found = {s.labels["llm_finish_reason"]: s.value for s in metrics.samples if s.name == "llm_finish_reasons_total"}
    assert found == counted


def test_16_distinct_finish_reasons_are_kept_per_call_and_later_ones_ignored(
    cleanup: list[LLMTelemetryMiddleware],
) -> None:
    choices = [
        {"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": f"r{i}"} for i in range(20)
    ]
    (call,), _ = calls_of(cleanup, completion(choices=choices), [{"model": "m"}])
    assert call.finish_reasons == [f"r{i}" for i in range(16)]


def test_finish_reasons_become_label_values_within_the_label_bounds(cleanup: list[LLMTelemetryMiddleware]) -> None:
    """An upstream that names its own finish reasons cannot widen the label: past the cap of distinct values, or
    past 256 characters, a reason is counted as ``other``."""
    reasons = [f"r{i}" for i in range(15)] + ["x" * 257]
    choices = [
        {"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": reason}
        for i, reason in enumerate(reasons)
    ]
    _, metrics = calls_of(cleanup, completion(choices=choices), [{"model": "m"}], max_label_values=10)
    counted = {s.labels["llm_finish_reason"]: s.value for s in metrics.samples if s.name == "llm_finish_reasons_total"}
    assert counted == {**{f"r{i}": 1.0 for i in range(10)}, "other": 6.0}


@pytest.mark.parametrize(("count", "kept"), [(2**53, True), (2**53 + 1, False), (-1, False)])
def test_counts_up_to_2_to_the_53_are_taken_and_larger_ones_ignored_as_if_absent(
    cleanup: list[LLMTelemetryMiddleware], count: int, kept: bool
) -> None:
    (given,), _ = calls_of(
        cleanup, completion(usage={"prompt_tokens": count, "completion_tokens": 1}), [{"model": "m"}]
    )
    (absent,), _ = calls_of(cleanup, completion(usage={"completion_tokens": 1}), [{"model": "m"}])
    if kept:
        assert given.input_tokens == count
    else:
        assert (given.input_tokens, given.usage_source) == (absent.input_tokens, absent.usage_source)


def test_log_line_text_is_cut_at_1024_characters_and_a_client_request_id_at_128(
    cleanup: list[LLMTelemetryMiddleware], capsys: pytest.CaptureFixture[str]
) -> None:
    request_id, model = "r" * 300, "é" * 3000
    calls_of(
        cleanup,
        completion(),
        [{"model": model, "_headers": [(b"x-request-id", request_id.encode())]}],
        request_logs=True,
        echo_request_id=False,
    )
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["request_id"] == request_id[:128]
    assert line["model"] == model[:1024]


def test_a_model_name_of_1024_characters_is_on_the_log_line_whole(
    cleanup: list[LLMTelemetryMiddleware], capsys: pytest.CaptureFixture[str]
) -> None:
    model = "m" * 1024
    calls_of(cleanup, completion(), [{"model": model}], request_logs=True)
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["model"] == model


def test_the_route_cache_keeps_at_most_256_paths_of_at_most_256_characters() -> None:
    router = Router()
    short = [f"/t{i}/v1/chat/completions" for i in range(1000)]
    sizes = []
    for path in short:
        router.match(path)
        sizes.append(len(router._cache))
    assert max(sizes) == 256  # used up to the bound, never past it
    router = Router()
    for path in ("/" + "x" * (256 - len("/v1/chat/completions") - 1) + "/v1/chat/completions", "/" + "x" * 300):
        router.match(path)
    assert [len(p) for p in router._cache] == [256]


def test_bytes_past_an_oversized_json_answer_are_never_read_as_an_event_stream() -> None:
    """A JSON answer past MAX_JSON_RESPONSE_BYTES is left unread. A later chunk of it that happens to start like an
    event (``data: ...``) is still part of that body, not the start of a stream: only the body's first bytes say."""
    from llm_telemetry.apis import APIS, MAX_JSON_RESPONSE_BYTES
    from llm_telemetry.record import LLMCall

    api = APIS["openai.chat"]
    call = LLMCall(api.operation, api.provider, start=0.0)
    reader = api.response_reader(call, stream=False, capture=False)
    reader.feed(b'{"pad": "' + b"x" * MAX_JSON_RESPONSE_BYTES, now=1.0)
    event = {"model": "m", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}}
    # (Inside the JSON string its quotes are escaped, as in any valid answer: no usage member is there either.)
    reader.feed(b"data: " + json.dumps(event).replace('"', '\\"').encode() + b'\\n\\n"}', now=2.0)
    reader.finish(now=3.0)
    assert (call.stream, call.output_tokens, call.response_model) == (False, None, None)

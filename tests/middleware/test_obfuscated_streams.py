"""OpenAI's obfuscated streams end to end: the demo service sends every streamed chat event with an
``"obfuscation"`` member of its own value (``x-demo-obfuscation: 1``, as OpenAI does by default), served by real
uvicorn behind the middleware, read by the official openai SDK, the LLM span received by a real OTLP receiver."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from otlp_receiver import demo_server, otlp_receiver, tracing_env, wait_span

WORDS = 64
#: What a stream's LLM span says that a plain stream and an obfuscated one of the same reply must both say.
RECORDED = (
    "gen_ai.response.finish_reasons",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "llm.usage.source",
)


@pytest.mark.parametrize("include_usage", [True, False], ids=["reported", "estimated"])
def test_an_obfuscated_stream_records_what_a_plain_one_records(include_usage: bool) -> None:
    """Tokens (reported, or counted from the text deltas when the stream has no usage), finish reason and first
    token of an obfuscated stream are those of the same stream without the member, the response model is the one
    asked for, and the SDK parses every obfuscated chunk (the member kept as an extra field)."""
    with otlp_receiver() as receiver, demo_server(tracing_env(receiver)) as (_, base):
        client = openai.OpenAI(base_url=base + "/v1", api_key="test", max_retries=0)
        spans: dict[bool, dict[str, Any]] = {}
        for obfuscated in (False, True):
            model = f"gpt-4o-{'obfuscated' if obfuscated else 'plain'}-{'usage' if include_usage else 'none'}"
            headers = {"x-demo-words": str(WORDS), **({"x-demo-obfuscation": "1"} if obfuscated else {})}
            chunks = list(
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "Tell me about latency"}],
                    stream=True,
                    stream_options={"include_usage": include_usage},
                    extra_headers=headers,
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert len(text.split()) == WORDS
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            values = [c.to_dict().get("obfuscation") for c in chunks]
            if obfuscated:
                assert all(isinstance(value, str) and value for value in values)
                assert len(set(values)) > 1  # each event its own value
            else:
                assert values == [None] * len(chunks)
            span = wait_span(receiver, **{"gen_ai.request.model": model})
            assert [name for name, _, _ in span.events].count("gen_ai.first_token") == 1
            assert span.attributes["gen_ai.response.model"] == model  # the demo answers as the model asked for
            spans[obfuscated] = span.attributes
    plain, obfuscated_span = spans[False], spans[True]
    assert {k: obfuscated_span.get(k) for k in RECORDED} == {k: plain.get(k) for k in RECORDED}
    assert plain["gen_ai.usage.output_tokens"] == WORDS
    assert plain.get("llm.usage.source") == (None if include_usage else "estimated")  # only said when estimated
    assert plain["gen_ai.response.finish_reasons"] == ["stop"]

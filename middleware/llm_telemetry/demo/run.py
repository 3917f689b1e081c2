"""``llm-telemetry demo``: serve the demo LLM, drive it with the official ``openai`` SDK, summarise the metrics."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

DEMO_TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative ``(le, count)`` buckets (linear within a bucket)."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] == 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def summarize(text: str) -> dict[str, Any]:
    """The demo's summary figures from a Prometheus text scrape."""
    requests = 0.0
    errors: dict[str, float] = defaultdict(float)
    tokens: dict[str, float] = defaultdict(float)
    cost = 0.0
    ttft: dict[float, float] = defaultdict(float)
    tools: dict[str, float] = defaultdict(float)
    finishes: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "llm_requests_total":
                requests += sample.value
            elif sample.name == "llm_errors_total":
                errors[labels.get("error_type", "?")] += sample.value
            elif sample.name == "llm_tokens_total":
                tokens[f"{labels.get('gen_ai_token_type')} ({labels.get('llm_usage_source')})"] += sample.value
            elif sample.name == "llm_cost_usd_total":
                cost += sample.value
            elif sample.name == "gen_ai_server_time_to_first_token_seconds_bucket":
                ttft[float(labels["le"])] += sample.value
            elif sample.name == "llm_tool_calls_total":
                tools[labels.get("gen_ai_tool_name", "?")] += sample.value
            elif sample.name == "llm_finish_reasons_total":
                finishes[labels.get("llm_finish_reason", "?")] += sample.value
    return {
        "requests": requests,
        "errors": dict(errors),
        "tokens": dict(tokens),
        "cost_usd": cost,
        "ttft_p50": histogram_quantile(0.5, ttft.items()),
        "ttft_p95": histogram_quantile(0.95, ttft.items()),
        "tool_calls": dict(tools),
        "finish_reasons": dict(finishes),
    }


def format_summary(summary: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "n/a" if value is None else f"{value * 1000:.0f} ms"

    lines = [
        f"requests          {summary['requests']:.0f}",
        f"cost              ${summary['cost_usd']:.6f}",
        f"TTFT p50 / p95    {ms(summary['ttft_p50'])} / {ms(summary['ttft_p95'])}",
        "tokens",
        *(f"  {kind:<24}{count:.0f}" for kind, count in sorted(summary["tokens"].items())),
        "tool calls",
        *(f"  {name:<24}{count:.0f}" for name, count in sorted(summary["tool_calls"].items())),
        "finish reasons",
        *(f"  {reason:<24}{count:.0f}" for reason, count in sorted(summary["finish_reasons"].items())),
        "errors by type",
        *(f"  {kind:<24}{count:.0f}" for kind, count in sorted(summary["errors"].items())),
    ]
    return "\n".join(lines)


def scrape(url: str, accept: str | None = None) -> str:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def drive(base_url: str, chats: int) -> int:
    """Send a realistic mix through the openai SDK: streams, non-streams, a tool call, an answer cut at its
    ``max_tokens``, embeddings and errors; return how many LLM requests were sent."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="demo", max_retries=0)
    models = ["gpt-4o-mini", "gpt-4o", "demo-local"]
    messages: Any = [{"role": "user", "content": "How do I know my p95 time to first token?"}]

    def stream(i: int) -> None:
        options = {"include_usage": True} if i % 4 else None
        kwargs: dict[str, Any] = {"stream_options": options} if options else {}
        for _ in client.chat.completions.create(model=models[i % 3], messages=messages, stream=True, **kwargs):
            pass

    def plain(i: int) -> None:
        client.chat.completions.create(model=models[i % 3], messages=messages)

    def failing(kind: str) -> None:
        try:
            client.chat.completions.create(
                model="gpt-4o",
                messages=messages,
                extra_headers={"x-demo-fail": kind},
            )
        except openai.APIStatusError:
            pass

    def tool_round_trip() -> None:
        first = client.chat.completions.create(model="gpt-4o", messages=messages, tools=DEMO_TOOLS)
        call: Any = (first.choices[0].message.tool_calls or [])[0]
        follow_up = [
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'},
        ]
        client.chat.completions.create(model="gpt-4o", messages=follow_up, tools=DEMO_TOOLS)

    jobs: list[Any] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for i in range(chats):
            jobs.append(pool.submit(stream if i % 2 == 0 else plain, i))
        jobs.append(pool.submit(tool_round_trip))
        jobs.append(pool.submit(client.chat.completions.create, model="gpt-4o-mini", messages=messages, max_tokens=4))
        jobs.append(pool.submit(client.embeddings.create, model="text-embedding-3-small", input=["one two three"]))
        for kind in ("rate_limit", "rate_limit", "context_length", "server_error"):
            jobs.append(pool.submit(failing, kind))
        for job in jobs:
            job.result()
    return chats + 2 + 1 + 1 + 4  # the tool call's two turns, the capped answer, the embeddings and the failures


def settled_summary(url: str, requests: int, timeout: float = 10.0) -> dict[str, Any]:
    """The summary once the scrape counts ``requests`` (a call is recorded just after its response went out), or
    as it stands after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        summary = summarize(scrape(url))
        if summary["requests"] >= requests or time.monotonic() > deadline:
            return summary
        time.sleep(0.02)


class DemoError(Exception):
    """The demo cannot run as asked (an address or port it cannot listen on); the message names the option."""


#: The address a client on this host reaches a listener on a wildcard address at.
_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def _check_free(option: str, host: str, port: int) -> None:
    """Fail naming ``option`` when ``host``:``port`` cannot be listened on. The metrics listener would otherwise try
    again every second while the summary scraped whatever holds the port (another process's metrics, or nothing)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise DemoError(f"{option}: cannot listen on {_url_host(host)}:{port}: {exc.strerror or exc}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class DemoServer:
    """The demo service under uvicorn in a background thread."""

    def __init__(self, host: str, port: int, metrics_port: int, **app_options: Any) -> None:
        import uvicorn

        from .app import create_app

        app_options.setdefault("metrics_host", host)  # the metrics as reachable as the service, no more
        app = create_app(first_token_delay=0.05, token_delay=0.005, metrics_port=metrics_port, **app_options)
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    def __enter__(self) -> DemoServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                where = f"{_url_host(self.config.host)}:{self.config.port}"
                raise DemoError(f"the demo service did not start on {where} (--host, --port; see the error above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_demo(host: str, port: int, metrics_port: int, chats: int, serve: bool, logs: bool = False) -> int:
    """Serve the demo on ``host`` (its metrics too), drive it and print the summary; :class:`DemoError` when it
    cannot listen where asked."""
    os.environ.setdefault("OTEL_SERVICE_NAME", "llm-telemetry-demo")
    if port == metrics_port:
        raise DemoError(f"--port and --metrics-port are both {port}: give each its own")
    _check_free("--host/--port", host, port)
    _check_free("--host/--metrics-port", host, metrics_port)
    # Reached as a client would: an IPv6 address in brackets, a wildcard address at the loopback one (the metrics
    # were scraped at 127.0.0.1 whatever --host said, and --host ::1 made a URL the client refused).
    client = _url_host(_LOOPBACK.get(host, host))
    with DemoServer(host, port, metrics_port, request_logs=logs):
        base = f"http://{client}:{port}/v1"
        metrics = f"http://{client}:{metrics_port}/metrics"
        print(f"demo LLM service on {base}, metrics on {metrics}")
        sent = drive(base, chats)
        print(format_summary(settled_summary(metrics, sent)))
        if serve:
            print(f"serving; try: curl -s {metrics} | grep llm_   (Ctrl-C to stop)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0

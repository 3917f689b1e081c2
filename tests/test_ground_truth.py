"""Ground truth: every dashboard query and every recording rule, evaluated by a real Prometheus, equals what
the traffic itself says.

``tests/apps/truth_app.py`` (a scripted upstream wrapped in the middleware) runs under ``uvicorn --workers 2``.
The test sends known traffic: several models, providers and tenants, streams and non-streams, prompt-cache and
reasoning tokens, tool calls and tool results, and every ``error.type``. The Debian ``prometheus`` binary
scrapes the metrics port every second and loads the shipped rule file. It scrapes the port twice, as the
Prometheus Operator labels targets: once as the operator's ServiceMonitor does (``endpoint="metrics"``), and once
more under the same job as a team's own ServiceMonitor of the app's port would (``endpoint="http"``). The
dashboard, opened as the operator opens it, and the rules, scoped as the operator scopes them, must count the
traffic once.

Exact numbers from ``rate()``: the same traffic is sent twice. Between the two passes the test finds the
timestamp ``t0`` of a scrape that saw all of the first pass and none of the second; after the second pass, the
timestamp ``t1`` of a scrape that saw all of it. Every query is evaluated at ``t1`` with every range set to
``t1 - t0``: Prometheus 2's ranges include both ends, so the first and last samples sit exactly on the range's
edges and ``rate()`` extrapolates nothing; it is the second pass's increase divided by the range. Token and
cost totals and ratios are then compared exactly (cost to float rounding); quantiles must lie within the
bucket bounds that the client-side timing of each request allows. The model and tenant variables, set to each of
their values and to two as Grafana sends them, split each panel into the parts its All view adds up to.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
if PROMETHEUS is None:
    pytest.skip("the prometheus server binary is not installed (Debian package prometheus)", allow_module_level=True)
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from llm_telemetry import instruments  # noqa: E402
from llm_telemetry.monitoring.dashboards import build_dashboard  # noqa: E402
from llm_telemetry.monitoring.rules import (  # noqa: E402
    CLIENT_ERROR_TYPES,
    TRUNCATED_FINISH_REASONS,
    AlertThresholds,
    build_rule_groups,
    dump_yaml,
)
from support import free_port, scrape_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "tests" / "apps"
JOB = "llm"
#: The service's OpenTelemetry name, unlike its Prometheus job (as with the operator, whose job is the resource's
#: name), and the namespace its scrape is labelled with (Kubernetes service discovery's label).
SERVICE = "chat-llm"
NAMESPACE = "llm-ns"
#: The endpoint label of the operator's scrape (its ServiceMonitor's port name), and of a second scrape of the
#: same job (a team's ServiceMonitor of the app's port, the app serving the metrics on its own path too).
ENDPOINT, OTHER_ENDPOINT = "llm-metrics", "http"
#: The rules' selector as the operator writes it (``rule_selector``).
SELECTOR = f'job="{JOB}",endpoint="{ENDPOINT}"'
ONE = f'{{endpoint="{ENDPOINT}"}}'
WORKERS = 2
TTFT_OBJECTIVE = 0.25
THRESHOLDS = AlertThresholds(ttft_objective_seconds=TTFT_OBJECTIVE, cost_per_hour_usd=1000)
#: USD per million tokens; UNPRICED is deliberately absent (its tokens are "unpriced"). Its name has characters a
#: regular expression reads as operators, which a variable set to it must match literally.
UNPRICED = "llama-3.1-8b+lora"
PRICES = {
    "gpt-4o": {"input": 2.0, "output": 8.0, "cache_read": 1.0},
    "gpt-4o-mini": {"input": 0.5, "output": 1.5},
    "claude-sonnet-4": {"input": 3.0, "output": 15.0, "cache_read": 0.5, "cache_creation": 4.0},
}
SLOW_TTFT = 0.3  # above the TTFT objective, in the (0.25, 0.5] bucket
SLOW_GAP = 0.12
#: The user prompt of every request: 20 characters, 5 tokens by the estimate of a response without usage.
PROMPT = "What is the weather?"
DISCONNECT_PAUSE = 1.0  # truth_app's pause before the chunk the departed client never reads


# --- the traffic -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    api: str
    model: str
    tenant: str
    stream: bool = False
    usage: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # input, output, cache_read, cache_creation, reasoning
    words: int = 1
    ttft: float = 0.0
    gap: float = 0.0
    tool: str | None = None
    tool_results: tuple[tuple[str, bool], ...] = ()
    fail: str | None = None
    no_usage: bool = False  # a stream without a usage block: output estimated from its content chunks
    finish: str | None = None  # the finish reason the upstream sends instead of its usual one

    # What the middleware should record ----------------------------------------------------------------
    @property
    def error_type(self) -> str | None:
        return self.fail

    @property
    def finish_reason(self) -> str | None:
        if self.fail:
            return None  # an error, a stream the client left or the app abandoned: no choice finished
        if self.finish:
            return self.finish
        if self.tool:
            return "tool_calls" if self.api == "openai" else "tool_use"
        return "stop" if self.api == "openai" else "end_turn"

    @property
    def cut_short(self) -> bool:
        """A stream its upstream cut off: its content chunks came, its end (usage, finish, [DONE]) never did."""
        return self.fail == "incomplete_stream"

    @property
    def truncated(self) -> bool:
        return self.finish_reason in TRUNCATED_FINISH_REASONS

    @property
    def tokens(self) -> dict[str, int]:
        if self.fail and not self.cut_short:
            return {}
        if self.no_usage or self.cut_short:
            # Output from the content chunks; input from the prompt's text at four characters a token.
            return {"output": self.words, "input": math.ceil(len(PROMPT) / 4)}
        return {k: v for k, v in zip(("input", "output"), self.usage[:2], strict=False) if v}

    @property
    def details(self) -> dict[str, int]:
        if self.fail or self.no_usage:
            return {}
        parts = dict(zip(("cache_read", "cache_creation", "reasoning"), self.usage[2:], strict=False))
        if self.api == "openai":
            parts["cache_creation"] = 0  # OpenAI reports no cache writes
        return {k: v for k, v in parts.items() if v}

    @property
    def output_tokens(self) -> int:
        return self.tokens.get("output", 0)

    @property
    def visible_tokens(self) -> int:
        """Output tokens the stream shows: the reasoning is not streamed (OpenAI's reasoning models)."""
        return self.output_tokens - self.details.get("reasoning", 0)

    @property
    def usage_source(self) -> str:
        return "estimated" if self.no_usage or self.cut_short else "reported"

    @property
    def cost(self) -> float | None:
        price = PRICES.get(self.model)
        if price is None or not self.tokens:
            return None
        inp, out = self.tokens.get("input", 0), self.tokens.get("output", 0)
        cache_read, cache_creation = self.details.get("cache_read", 0), self.details.get("cache_creation", 0)
        return (
            max(inp - cache_read - cache_creation, 0) * price["input"]
            + cache_read * price.get("cache_read", price["input"])
            + cache_creation * price.get("cache_creation", price["input"])
            + out * price["output"]
        ) / 1e6

    @property
    def has_ttft(self) -> bool:
        return self.stream and self.fail is None

    @property
    def has_tpot(self) -> bool:
        return self.has_ttft and self.visible_tokens >= 2


#: The error types only a stream can have.
STREAMED_FAILURES = ("client_disconnect", "other", "incomplete_stream")


def _traffic() -> list[Req]:
    reqs: list[Req] = []

    def add(count: int, **kw: Any) -> None:
        reqs.extend(Req(**kw) for _ in range(count))

    # OpenAI: cache-heavy fast streams, slow reasoning streams, non-streams, a tool call round trip, an estimate.
    add(3, api="openai", model="gpt-4o", tenant="acme", stream=True, usage=(120, 4, 100, 0, 0), words=4)
    add(2, api="openai", model="gpt-4o", tenant="globex", stream=True, usage=(50, 5, 0, 0, 2), words=3,
        ttft=SLOW_TTFT, gap=SLOW_GAP)  # fmt: skip
    add(3, api="openai", model="gpt-4o", tenant="acme", usage=(40, 10, 32, 0, 6))
    add(2, api="openai", model="gpt-4o", tenant="globex", usage=(30, 1, 0, 0, 0), tool="get_weather")
    add(1, api="openai", model="gpt-4o", tenant="acme", usage=(20, 2, 0, 0, 0),
        tool_results=(("get_weather", False), ("lookup", True)))  # fmt: skip
    add(1, api="openai", model="gpt-4o-mini", tenant="initech", stream=True, words=5, no_usage=True)
    # Anthropic: cache reads and writes, a slow non-stream, a streamed tool call, a failed tool result.
    add(3, api="anthropic", model="claude-sonnet-4", tenant="acme", stream=True, usage=(1000, 5, 800, 150, 0), words=5)
    add(2, api="anthropic", model="claude-sonnet-4", tenant="initech", usage=(300, 20, 0, 250, 0), ttft=SLOW_TTFT)
    add(1, api="anthropic", model="claude-sonnet-4", tenant="initech", stream=True, usage=(60, 7, 0, 0, 0),
        tool="search")  # fmt: skip
    add(1, api="anthropic", model="claude-sonnet-4", tenant="globex", usage=(25, 3, 0, 0, 0),
        tool_results=(("search", True),))  # fmt: skip
    # Answers cut at their token limit, as each API says it.
    add(2, api="openai", model="gpt-4o-mini", tenant="acme", stream=True, usage=(10, 3, 0, 0, 0), words=3,
        finish="length")  # fmt: skip
    add(1, api="anthropic", model="claude-sonnet-4", tenant="globex", usage=(12, 100, 0, 0, 0), finish="max_tokens")
    # A model missing from the pricing table.
    add(2, api="openai", model=UNPRICED, tenant="globex", usage=(15, 5, 0, 0, 0))
    # Every error type (three of them need a stream), and one more on another provider and model.
    for fail in instruments.ERROR_TYPES:
        add(1, api="openai", model="gpt-4o-mini", tenant="globex", stream=fail in STREAMED_FAILURES,
            fail=fail)  # fmt: skip
    add(1, api="anthropic", model="claude-sonnet-4", tenant="acme", fail="rate_limit")
    return reqs


TRAFFIC = _traffic()


@dataclass
class Sent:
    """One request as sent, with what the client's clock allows the middleware's measurements to be."""

    req: Req
    duration: tuple[float, float]
    ttft: tuple[float, float] | None = None
    tpot: tuple[float, float] | None = None
    pid: str = ""


def _body(req: Req) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": PROMPT}]
    if req.tool_results and req.api == "openai":
        calls = [{"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": "{}"}}
                 for i, (name, _) in enumerate(req.tool_results)]  # fmt: skip
        messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        messages += [{"role": "tool", "tool_call_id": f"call_{i}", "content": "error: down" if failed else "sunny"}
                     for i, (_, failed) in enumerate(req.tool_results)]  # fmt: skip
    elif req.tool_results:
        uses = [{"type": "tool_use", "id": f"tu_{i}", "name": name, "input": {}}
                for i, (name, _) in enumerate(req.tool_results)]  # fmt: skip
        messages.append({"role": "assistant", "content": uses})
        results = [{"type": "tool_result", "tool_use_id": f"tu_{i}", "content": "x", "is_error": failed}
                   for i, (_, failed) in enumerate(req.tool_results)]  # fmt: skip
        messages.append({"role": "user", "content": results})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    if req.tool:
        body["tools"] = [{"type": "function", "function": {"name": req.tool, "parameters": {"type": "object"}}}]
    if req.api == "anthropic":
        body["max_tokens"] = 100
    elif req.stream and not req.no_usage:
        body["stream_options"] = {"include_usage": True}
    return body


_CONTENT = re.compile(rb'"(content":"w|text_delta|tool_calls":\[|tool_use")')


def send(base: str, req: Req) -> Sent:
    script = {"api": req.api, "usage": list(req.usage), "words": req.words, "ttft": req.ttft, "gap": req.gap,
              "tool": req.tool, "fail": req.fail, "no_usage": req.no_usage, "finish": req.finish}  # fmt: skip
    path = "/v1/messages" if req.api == "anthropic" else "/v1/chat/completions"
    headers = {"x-truth": json.dumps(script), "x-tenant-id": req.tenant}
    with httpx.Client(base_url=base, timeout=30) as client:
        start = time.perf_counter()
        if req.fail == "client_disconnect":
            with client.stream("POST", path, json=_body(req), headers=headers) as response:
                next(response.iter_bytes())  # the role chunk; then leave mid-stream
            left = time.perf_counter() - start
            return Sent(req, (0.0, left + DISCONNECT_PAUSE + 0.5), pid=response.headers["x-worker-pid"])
        first: float | None = None
        try:
            with client.stream("POST", path, json=_body(req), headers=headers) as response:
                for chunk in response.iter_bytes():
                    if first is None and _CONTENT.search(chunk):
                        first = time.perf_counter() - start
        except (httpx.RemoteProtocolError, httpx.ReadError):
            assert req.fail == "other", req  # the app gave up mid-response; the server cut the connection
        end = time.perf_counter() - start
    pid = response.headers.get("x-worker-pid", "")
    if req.fail:
        return Sent(req, (0.0, end), pid=pid)
    if not req.stream:
        return Sent(req, (req.ttft, end), pid=pid)
    assert first is not None, f"no content chunk seen for {req}"
    sent = Sent(req, (req.ttft + (req.words - 1) * req.gap, end), (req.ttft, first), pid=pid)
    if req.has_tpot:
        out = req.visible_tokens  # the hidden reasoning came before the first token
        sent.tpot = ((req.words - 1) * req.gap / (out - 1), (end - req.ttft) / (out - 1))
    return sent


def drive(base: str) -> list[Sent]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda r: send(base, r), TRAFFIC))


# --- Prometheus ------------------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=30) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, expr: str, at: float) -> float | None:
        result = self.query(expr, at)
        return float(result[0]["value"][1]) if result else None


def wait_for(what: str, check: Callable[[], Any], seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.25)


#: What a scrape must show once ``passes`` copies of the traffic are recorded (sum over all series).
def _settled_checks(passes: int) -> dict[str, float]:
    return {
        f"sum(llm_requests_total{ONE})": passes * len(TRAFFIC),
        f"sum(llm_tokens_total{ONE})": passes * sum(sum(r.tokens.values()) for r in TRAFFIC),
        f"sum(llm_token_details_total{ONE})": passes * sum(sum(r.details.values()) for r in TRAFFIC),
        f"sum(llm_errors_total{ONE})": passes * sum(1 for r in TRAFFIC if r.fail),
        f"sum(llm_finish_reasons_total{ONE})": passes * sum(1 for r in TRAFFIC if r.finish_reason),
        f"sum(gen_ai_server_request_duration_seconds_count{ONE})": passes * len(TRAFFIC),
        f"sum(gen_ai_server_time_to_first_token_seconds_count{ONE})": passes * sum(1 for r in TRAFFIC if r.has_ttft),
        f"sum(llm_requests_active{ONE})": 0,
    }


def settled_scrape(prom: Prometheus, passes: int) -> int:
    """The timestamp (ms) of a scrape that saw exactly ``passes`` copies of the traffic."""

    last: list[str] = []

    def check() -> int | None:
        # Two seconds back: every scrape up to then is complete and stored (1 s interval, 1 s timeout).
        at = time.time() - 2
        for expr, expected in _settled_checks(passes).items():
            value = prom.scalar(expr, at)
            if value != expected:
                last[:] = [f"{expr} = {value}, expected {expected}"]
                return None
        stamp = prom.scalar(f"max(timestamp(llm_requests_total{ONE}))", at)
        return round(stamp * 1000) if stamp is not None else None

    try:
        result: int = wait_for(f"a scrape showing {passes} pass(es) of the traffic", check)
    except pytest.fail.Exception:
        pytest.fail(f"no scrape showed {passes} pass(es) of the traffic; last: {last}")
    return result


@dataclass
class Run:
    prom: Prometheus
    sent: list[Sent]
    start_ms: int
    end_ms: int
    pids: set[str] = field(default_factory=set)

    @property
    def window(self) -> str:
        return f"{self.end_ms - self.start_ms}ms"

    @property
    def seconds(self) -> float:
        return (self.end_ms - self.start_ms) / 1000

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.prom.query(expr, self.end_ms / 1000)


def _server_env(tmp: Path, metrics_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_TELEMETRY_", "OTEL_", "PROMETHEUS_"))}
    (tmp / "prices.json").write_text(json.dumps({"models": PRICES}))
    (tmp / "tmp").mkdir()
    env.update(
        {
            "LLM_TELEMETRY_METRICS_PORT": str(metrics_port),
            "LLM_TELEMETRY_METRICS_HOST": "127.0.0.1",
            "LLM_TELEMETRY_PRICING": str(tmp / "prices.json"),
            "LLM_TELEMETRY_ATTRIBUTION_HEADERS": "x-tenant-id=tenant",
            "LLM_TELEMETRY_REQUEST_LOGS": "false",
            "OTEL_SERVICE_NAME": SERVICE,
            "TMPDIR": str(tmp / "tmp"),
            "PYTHONPATH": os.pathsep.join([str(REPO / "middleware"), env.get("PYTHONPATH", "")]),
        }
    )
    return env


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("ground-truth")
    port, metrics_port, prom_port = free_port(), free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp / "uvicorn.log").open("wb") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "truth_app:app",
                "--app-dir",
                str(APPS),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(WORKERS),
                "--log-level",
                "warning",
            ],
            env=_server_env(tmp, metrics_port),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    rules = tmp / "rules.yaml"
    rules.write_text(dump_yaml({"groups": build_rule_groups(THRESHOLDS, selector=SELECTOR)}))
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": JOB,
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{metrics_port}"],
                                "labels": {"namespace": NAMESPACE, "endpoint": ENDPOINT},
                            }
                        ],
                    },
                    {
                        # The same job again (a target's own job label wins over the job name).
                        "job_name": f"{JOB}-app-port",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{metrics_port}"],
                                "labels": {"namespace": NAMESPACE, "job": JOB, "endpoint": OTHER_ENDPOINT},
                            }
                        ],
                    },
                ],
            }
        )
    )
    prometheus: subprocess.Popen[bytes] | None = None
    try:

        def up(url: str) -> bool:
            if server.poll() is not None:
                pytest.fail(f"uvicorn exited: {(tmp / 'uvicorn.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for("the app", lambda: up(f"{base}/healthz"))
        wait_for("the metrics port", lambda: scrape_text(metrics_port) is not None)
        with (tmp / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_for("prometheus", lambda: up(f"{prom.base}/-/ready"))
        first = drive(base)
        start_ms = settled_scrape(prom, 1)
        second = drive(base)
        end_ms = settled_scrape(prom, 2)
        yield Run(prom, second, start_ms, end_ms, {s.pid for s in first + second})
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=20)
        _stop(server)


# --- expected values -------------------------------------------------------------------------------------------


def _close(actual: float, expected: float) -> bool:
    return math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12)


def vector(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    out = {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in result}
    assert len(out) == len(result), f"labels {labels} do not tell the series apart: {result}"
    return out


def grouped(key: Callable[[Req], Any], value: Callable[[Req], float], where: Callable[[Req], bool] = lambda r: True
            ) -> dict[Any, float]:  # fmt: skip
    totals: dict[Any, float] = defaultdict(float)
    for req in TRAFFIC:
        if where(req):
            totals[key(req)] += value(req)
    return dict(totals)


def assert_equal(actual: dict[Any, float], expected: dict[Any, float], what: str) -> None:
    assert set(actual) == set(expected), f"{what}: series {sorted(actual)} != {sorted(expected)}"
    wrong = {k: (actual[k], expected[k]) for k in expected if not _close(actual[k], expected[k])}
    assert not wrong, f"{what}: (actual, expected) {wrong}"


def _bucket_of(value: float, bounds: tuple[float, ...]) -> int:
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def quantile_bounds(q: float, intervals: list[tuple[float, float]], bounds: tuple[float, ...]) -> tuple[float, float]:
    """Where histogram_quantile(q) must land, given each observation only to within [low, high]."""

    def bucket(values: list[float]) -> int:
        counts = Counter(_bucket_of(v, bounds) for v in values)
        rank, seen = q * len(values), 0
        for index in range(len(bounds) + 1):
            seen += counts[index]
            if seen >= rank:
                return index
        return len(bounds)

    low_index, high_index = bucket([lo for lo, _ in intervals]), bucket([hi for _, hi in intervals])
    low = 0.0 if low_index == 0 else bounds[min(low_index, len(bounds)) - 1]
    high = bounds[min(high_index, len(bounds) - 1)]  # in +Inf, Prometheus answers the highest finite bound
    return low, high


def measured(run: Run, histogram: str, req_filter: Callable[[Req], bool] = lambda r: True) -> list[Sent]:
    attr = {"duration": "duration", "ttft": "ttft", "tpot": "tpot"}[histogram]
    return [s for s in run.sent if getattr(s, attr) is not None and req_filter(s.req)]


def check_quantiles(run: Run, result: list[dict[str, Any]], q: float, histogram: str, by_model: bool) -> None:
    spec = {"duration": instruments.REQUEST_DURATION, "ttft": instruments.TIME_TO_FIRST_TOKEN,
            "tpot": instruments.TIME_PER_OUTPUT_TOKEN}[histogram]  # fmt: skip
    assert spec.buckets is not None
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sent in measured(run, histogram):
        interval = getattr(sent, histogram)
        groups[sent.req.model if by_model else ""].append(interval)
    if by_model:
        actual = vector(result, "gen_ai_request_model")
    else:
        assert len(result) == 1, result
        actual = {("",): float(result[0]["value"][1])}
    assert {k[0] for k in actual} == set(groups), (histogram, q, actual)
    for model, intervals in groups.items():
        low, high = quantile_bounds(q, intervals, spec.buckets)
        value = actual[(model,)]
        assert low <= value <= high, f"p{q * 100:g} {histogram} of {model or 'all'}: {value} not in [{low}, {high}]"


# --- the checks, one per panel and per recording rule -------------------------------------------------------------

MODEL = "gen_ai_request_model"
TENANT = "llm_metadata_tenant"


def _requests_by_model() -> dict[Any, float]:
    return grouped(lambda r: (r.model,), lambda r: 1)


def _failed(req: Req) -> bool:
    """A failed request, as the error ratios count them: a client leaving is not one."""
    return req.fail is not None and req.fail != "client_disconnect"


def _errors_by_model() -> dict[Any, float]:
    return grouped(lambda r: (r.model,), lambda r: 1, _failed)


def _tokens(key: Callable[[Req, str], tuple[str, ...]], scale: float, run: Run) -> dict[Any, float]:
    totals: dict[Any, float] = defaultdict(float)
    for req in TRAFFIC:
        for token_type, count in req.tokens.items():
            totals[key(req, token_type)] += count * scale / run.seconds
    return dict(totals)


def _details(key: Callable[[Req, str], tuple[str, ...]], scale: float, run: Run) -> dict[Any, float]:
    totals: dict[Any, float] = defaultdict(float)
    for req in TRAFFIC:
        for detail, count in req.details.items():
            totals[key(req, detail)] += count * scale / run.seconds
    return dict(totals)


def _cost_by(key: Callable[[Req], tuple[str, ...]]) -> dict[Any, float]:
    return grouped(key, lambda r: r.cost or 0.0, lambda r: r.cost is not None)


def _ratio(bad: dict[Any, float], total: dict[Any, float]) -> dict[Any, float]:
    return {k: bad.get(k, 0.0) / v for k, v in total.items()}


def _tool_results() -> tuple[dict[Any, float], dict[Any, float]]:
    failed: dict[Any, float] = defaultdict(float)
    total: dict[Any, float] = defaultdict(float)
    for req in TRAFFIC:
        for name, is_error in req.tool_results:
            total[(name,)] += 1
            failed[(name,)] += 1 if is_error else 0
    return dict(failed), dict(total)


def _heatmap(run: Run, result: list[dict[str, Any]], histogram: str) -> None:
    spec = instruments.REQUEST_DURATION if histogram == "duration" else instruments.TIME_TO_FIRST_TOKEN
    assert spec.buckets is not None
    got = {float(k[0]): v * run.seconds for k, v in vector(result, "le").items()}
    sent = measured(run, histogram)
    assert set(got) == {*map(float, spec.buckets), math.inf}
    assert _close(got[math.inf], len(sent))
    for le, count in got.items():
        surely = sum(1 for s in sent if getattr(s, histogram)[1] <= le)
        maybe = sum(1 for s in sent if getattr(s, histogram)[0] <= le)
        assert surely - 1e-6 <= count <= maybe + 1e-6, f"{histogram} bucket le={le}: {count} not in [{surely}, {maybe}]"


def _slow_ttft_share(run: Run) -> tuple[float, float]:
    streams = measured(run, "ttft")
    surely = sum(1 for s in streams if s.ttft and s.ttft[0] > TTFT_OBJECTIVE)
    maybe = sum(1 for s in streams if s.ttft and s.ttft[1] > TTFT_OBJECTIVE)
    return surely / len(streams), maybe / len(streams)


#: Dashboard panel title -> check(run, one result list per target).
PanelCheck = Callable[[Run, list[list[dict[str, Any]]]], None]


def _panel_checks() -> dict[str, PanelCheck]:
    n = len(TRAFFIC)
    errors = sum(1 for r in TRAFFIC if _failed(r))
    failed_tools, all_tools = _tool_results()

    def only(result: list[dict[str, Any]]) -> float:
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def quantiles(histogram: str) -> PanelCheck:
        def check(run: Run, results: list[list[dict[str, Any]]]) -> None:
            for q, result in zip((0.5, 0.95, 0.99), results, strict=False):
                check_quantiles(run, result, q, histogram, by_model=True)

        return check

    return {
        "Requests/s": lambda run, rs: assert_equal({(): only(rs[0])}, {(): n / run.seconds}, "requests/s"),
        "Error ratio": lambda run, rs: assert_equal({(): only(rs[0])}, {(): errors / n}, "error ratio"),
        "p95 request duration": lambda run, rs: check_quantiles(run, rs[0], 0.95, "duration", by_model=False),
        "p95 time to first token": lambda run, rs: check_quantiles(run, rs[0], 0.95, "ttft", by_model=False),
        "Active requests": lambda run, rs: assert_equal({(): only(rs[0])}, {(): 0.0}, "active"),
        "Request duration by model": quantiles("duration"),
        "Time to first token by model": quantiles("ttft"),
        "Time per output token by model": quantiles("tpot"),
        # The client_disconnect stream leaves after its role chunk, before any token.
        "Streams left before the first token/s by model": lambda run, rs: assert_equal(
            vector(rs[0], MODEL),
            grouped(lambda r: (r.model,), lambda r: 1 / run.seconds, lambda r: r.fail == "client_disconnect"),
            "streams left/s",
        ),
        "Request duration distribution": lambda run, rs: _heatmap(run, rs[0], "duration"),
        "Time to first token distribution": lambda run, rs: _heatmap(run, rs[0], "ttft"),
        "Tokens/min by model and type": lambda run, rs: assert_equal(
            vector(rs[0], MODEL, "gen_ai_token_type"), _tokens(lambda r, t: (r.model, t), 60, run), "tokens/min"
        ),
        "Cache and reasoning tokens/min by model": lambda run, rs: assert_equal(
            vector(rs[0], MODEL, "llm_token_detail"), _details(lambda r, d: (r.model, d), 60, run), "details/min"
        ),
        "Cost per hour by model": lambda run, rs: assert_equal(
            vector(rs[0], MODEL),
            {k: v * 3600 / run.seconds for k, v in _cost_by(lambda r: (r.model,)).items()},
            "cost/hour",
        ),
        # Models with no priced request have no cost series, so no line.
        "Cost per request by model": lambda run, rs: assert_equal(
            vector(rs[0], MODEL),
            {k: v / _requests_by_model()[k] for k, v in _cost_by(lambda r: (r.model,)).items()},
            "cost/request",
        ),
        # Every model with input tokens has a line, 0 for one without cache reads.
        "Cache-hit share of input tokens": lambda run, rs: assert_equal(
            vector(rs[0], MODEL),
            {
                k: grouped(lambda r: (r.model,), lambda r: r.details.get("cache_read", 0)).get(k, 0) / v
                for k, v in grouped(lambda r: (r.model,), lambda r: r.tokens.get("input", 0)).items()
                if v
            },
            "cache-hit share",
        ),
        "Estimated vs reported tokens": lambda run, rs: assert_equal(
            vector(rs[0], "llm_usage_source"), _tokens(lambda r, t: (r.usage_source,), 60, run), "usage source"
        ),
        "Unpriced tokens/min by model": lambda run, rs: assert_equal(
            vector(rs[0], MODEL),
            {
                k: v * 60 / run.seconds
                for k, v in grouped(
                    lambda r: (r.model,),
                    lambda r: sum(r.tokens.values()),
                    lambda r: r.model not in PRICES and bool(r.tokens),
                ).items()
            },
            "unpriced",
        ),
        "Errors/s by error type": lambda run, rs: assert_equal(
            vector(rs[0], "error_type"),
            {k: v / run.seconds for k, v in grouped(lambda r: (r.fail,), lambda r: 1, lambda r: bool(r.fail)).items()},
            "errors/s",
        ),
        "Error ratio by model": lambda run, rs: assert_equal(
            vector(rs[0], MODEL), _ratio(_errors_by_model(), _requests_by_model()), "error ratio by model"
        ),
        "Responses/s by finish reason": lambda run, rs: assert_equal(
            vector(rs[0], "llm_finish_reason"),
            grouped(lambda r: (r.finish_reason,), lambda r: 1 / run.seconds, lambda r: r.finish_reason is not None),
            "finish reasons/s",
        ),
        "Truncated response ratio by model": lambda run, rs: assert_equal(
            vector(rs[0], MODEL),
            _ratio(
                grouped(lambda r: (r.model,), lambda r: 1, lambda r: r.truncated),
                grouped(lambda r: (r.model,), lambda r: 1, lambda r: r.finish_reason is not None),
            ),
            "truncated ratio",
        ),
        "Tool calls/s by tool": lambda run, rs: assert_equal(
            vector(rs[0], "gen_ai_tool_name"),
            {k: v / run.seconds for k, v in grouped(lambda r: (r.tool,), lambda r: 1, lambda r: bool(r.tool)).items()},
            "tool calls/s",
        ),
        "Tool failure ratio by tool": lambda run, rs: assert_equal(
            vector(rs[0], "gen_ai_tool_name"), _ratio(failed_tools, all_tools), "tool failure ratio"
        ),
        "Top tenant by tokens": lambda run, rs: assert_equal(
            vector(rs[0], TENANT),
            grouped(lambda r: (r.tenant,), lambda r: sum(r.tokens.values()), lambda r: bool(r.tokens)),
            "tokens by tenant",
        ),
        "Top tenant by cost": lambda run, rs: assert_equal(
            vector(rs[0], TENANT), _cost_by(lambda r: (r.tenant,)), "cost by tenant"
        ),
    }


#: Panels whose queries this test cannot check, and why.
UNCHECKED = {"Error log lines": "a Loki (LogQL) query over request log lines; no Prometheus evaluates it"}


def _as_promql(expr: str, run: Run) -> str:
    """The query as Grafana sends it with the scrape endpoint on the operator's and every other variable on "All",
    its ranges set to the traffic window."""
    expr = expr.replace("$__rate_interval", run.window).replace("$__range", run.window)
    expr = expr.replace("$endpoint", ENDPOINT)
    return re.sub(r"\$[a-zA-Z_]+", ".*", expr)


def test_traffic_reached_both_workers(run: Run) -> None:
    assert len(run.pids - {""}) == WORKERS, run.pids


def test_every_dashboard_panel_matches_the_traffic(run: Run) -> None:
    checks = _panel_checks()
    dashboard = build_dashboard(attribution_labels=("tenant",))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert titles == set(checks) | set(UNCHECKED), "every panel needs a check or a reason"
    failures = []
    for panel in panels:
        if panel["title"] in UNCHECKED:
            continue
        results = [run.query(_as_promql(t["expr"], run)) for t in panel["targets"]]
        try:
            checks[panel["title"]](run, results)
        except AssertionError as exc:
            failures.append(f"{panel['title']}: {exc}")
    assert not failures, "\n".join(failures)


def _rule_checks(run: Run) -> dict[str, Callable[[list[dict[str, Any]]], None]]:
    n = len(TRAFFIC)
    failed_tools, all_tools = _tool_results()
    per_second = 1 / run.seconds

    def scalar(expected: float, what: str) -> Callable[[list[dict[str, Any]]], None]:
        return lambda result: assert_equal(vector(result, "job"), {(JOB,): expected}, what)

    availability_bad = sum(1 for r in TRAFFIC if r.fail and r.fail not in CLIENT_ERROR_TYPES)

    def slo_ttft(result: list[dict[str, Any]]) -> None:
        (value,) = vector(result, "job").values()
        low, high = _slow_ttft_share(run)
        assert low - 1e-9 <= value <= high + 1e-9, f"slow TTFT share {value} not in [{low}, {high}]"

    checks: dict[str, Callable[[list[dict[str, Any]]], None]] = {
        "llm:llm_requests:rate5m": scalar(n * per_second, "requests/s"),
        "llm:llm_errors:rate5m": lambda result: assert_equal(
            vector(result, "error_type"),
            {k: v * per_second for k, v in grouped(lambda r: (r.fail,), lambda r: 1, lambda r: bool(r.fail)).items()},
            "errors/s by type",
        ),
        "llm:llm_errors:ratio_rate5m": scalar(sum(1 for r in TRAFFIC if _failed(r)) / n, "error ratio"),
        "llm:llm_tokens:rate5m": lambda result: assert_equal(
            vector(result, MODEL, "gen_ai_token_type"), _tokens(lambda r, t: (r.model, t), 1, run), "tokens/s"
        ),
        "llm:llm_token_details:rate5m": lambda result: assert_equal(
            vector(result, MODEL, "gen_ai_token_type", "llm_token_detail"),
            _details(lambda r, d: (r.model, dict(instruments.TOKEN_DETAIL_PARTS)[d], d), 1, run),
            "token details/s",
        ),
        "llm:llm_tokens:rate1h": scalar(sum(sum(r.tokens.values()) for r in TRAFFIC) * per_second, "tokens/s"),
        "llm:llm_cost_usd:rate1h": scalar(sum(r.cost or 0.0 for r in TRAFFIC) * per_second, "cost/s"),
        "llm:llm_tool_results:error_ratio_rate5m": lambda result: assert_equal(
            vector(result, "gen_ai_tool_name"), _ratio(failed_tools, all_tools), "tool failure ratio"
        ),
    }
    for histogram, metric in (("duration", instruments.REQUEST_DURATION), ("ttft", instruments.TIME_TO_FIRST_TOKEN),
                              ("tpot", instruments.TIME_PER_OUTPUT_TOKEN)):  # fmt: skip
        for q in (0.5, 0.95, 0.99):
            checks[f"llm:{metric.prometheus_name}:p{round(q * 100)}_5m"] = lambda result, q=q, histogram=histogram: (
                check_quantiles(run, result, q, histogram, by_model=True)
            )
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        checks[f"llm:slo_availability:ratio_rate{window}"] = scalar(availability_bad / n, "availability burn")
        checks[f"llm:slo_ttft:ratio_rate{window}"] = slo_ttft
    return checks


def _grafana_regex(values: list[str]) -> str:
    """The values of a multi-value variable as Grafana's Prometheus data source writes them into a query: each
    escaped for a regular expression inside a PromQL string, several joined into one alternation."""
    escaped = [re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), v.replace("\\", "\\" * 4)) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _series(result: list[dict[str, Any]]) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in result}


def _same(actual: dict[Any, float], expected: dict[Any, float]) -> bool:
    return actual.keys() == expected.keys() and all(_close(actual[k], expected[k]) for k in expected)


def _carries(expr: str, label: str) -> bool:
    """Whether the metrics a query reads have ``label`` (the model, or an attribution label)."""
    names = {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"\b((?:llm|gen_ai)_\w+)\{", expr)}
    specs = [instruments.BY_PROMETHEUS_NAME[name] for name in names]
    assert specs, expr
    return all(label in spec.labels if label == MODEL else spec.attributed for spec in specs)


def test_each_value_of_a_variable_shows_its_part_of_every_panel(run: Run) -> None:
    """The model and tenant variables set to one value, and to two, as Grafana sends them (each value escaped for a
    regular expression: a model named ``llama-3.1-8b+lora`` is in the traffic). A panel by that label shows exactly
    the series of those values that it shows on All; a panel that adds up rates shows the sum over the values of
    what each one shows (the values partition its traffic); a panel whose metric cannot carry the label shows what
    it shows on All."""
    dashboard = build_dashboard(attribution_labels=("tenant",))
    panels = [p for p in dashboard["panels"] if p["type"] != "row" and p["title"] not in UNCHECKED]
    failures = []
    checked = 0  # comparisons of series that the traffic gives values
    for variable, label in (("model", MODEL), (TENANT, TENANT)):
        values = sorted(run.prom.get(f"/api/v1/label/{label}/values", **{"match[]": f"llm_requests_total{ONE}"}))
        assert len(values) >= 3, values
        if variable == "model":
            assert UNPRICED in values
        for panel in panels:
            for target in panel["targets"]:
                every = _series(run.query(_as_promql(target["expr"], run)))

                def chosen(picked: list[str], target: dict[str, Any] = target, variable: str = variable) -> Any:
                    expr = target["expr"].replace(f"${variable}", _grafana_regex(picked))
                    return _series(run.query(_as_promql(expr, run)))

                one = {v: chosen([v]) for v in values}
                pair = values[-2:]
                two = chosen(pair)
                where = f"{panel['title']} ({target['refId']}), {variable}"
                if any(label in dict(key) for key in every):  # a panel by this label
                    for picked, got in [*(([v], one[v]) for v in values), (pair, two)]:
                        part = {k: v for k, v in every.items() if dict(k).get(label) in picked}
                        if not _same(got, part):
                            failures.append(f"{where}={picked}: {got} where All shows {part}")
                        checked += bool(part)
                elif not _carries(target["expr"], label):  # its metric has no such label
                    if not all(_same(got, every) for got in [*one.values(), two]):
                        failures.append(f"{where}: a value changes a panel its metric cannot filter")
                elif f'{label}=~"${variable}"' not in target["expr"]:
                    failures.append(f"{where}: the variable does not filter the panel, whose metric has the label")
                elif "/" not in target["expr"] and "histogram_quantile" not in target["expr"]:  # rates added up
                    total: dict[Any, float] = defaultdict(float)
                    for got in one.values():
                        for key, value in got.items():
                            total[key] += value
                    both: dict[Any, float] = defaultdict(float)
                    for v in pair:
                        for key, value in one[v].items():
                            both[key] += value
                    if not _same(dict(total), every) or not _same(two, dict(both)):
                        failures.append(f"{where}: the values' parts {dict(total)} do not add up to All's {every}")
                    checked += bool(every)
    assert not failures, "\n".join(failures)
    assert checked > 50, checked


def test_every_recording_rule_matches_the_traffic(run: Run) -> None:
    groups = build_rule_groups(THRESHOLDS, selector=SELECTOR)
    records = [r for g in groups for r in g["rules"] if "record" in r]
    checks = _rule_checks(run)
    names = {r["record"] for r in records}
    assert names <= set(checks), f"recording rules without a check: {names - set(checks)}"
    failures = []
    for rule in records:
        # The rule's own expression, its windows set to the traffic window (see the module docstring).
        expr = re.sub(r"\[\d+[smhdw]\]", f"[{run.window}]", rule["expr"])
        try:
            checks[rule["record"]](run.query(expr))
        except AssertionError as exc:
            failures.append(f"{rule['record']}: {exc}")
    assert not failures, "\n".join(failures)


def test_prometheus_loads_and_evaluates_every_shipped_rule(run: Run) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in run.prom.get("/api/v1/rules")["groups"] for rule in group["rules"]]
        return rules if rules and all(rule["health"] != "unknown" for rule in rules) else None

    rules = wait_for("every rule to be evaluated", evaluated)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    shipped = {r.get("record") or r.get("alert") for g in build_rule_groups(THRESHOLDS) for r in g["rules"]}
    assert {r["name"] for r in rules} == shipped


def test_sum_of_tokens_over_every_label_is_the_billable_total(run: Run) -> None:
    # What a user writes without reading the docs must be right: no label combination double counts.
    billable = sum(r.tokens.get("input", 0) + r.tokens.get("output", 0) for r in TRAFFIC)
    value = run.prom.scalar(f"sum(increase(llm_tokens_total{ONE}[{run.window}]))", run.end_ms / 1000)
    assert value is not None and _close(value, billable)
    cached = sum(r.details.get("cache_read", 0) + r.details.get("cache_creation", 0) for r in TRAFFIC)
    assert cached > billable / 2, "the traffic should be cache-heavy enough for double counting to show"


def _metrics_doc_queries() -> list[str]:
    """The PromQL queries docs/metrics.md gives: each query of its ``promql`` blocks, and each one its prose writes
    inline (a backticked expression that applies a function or divides)."""
    text = (REPO / "docs" / "metrics.md").read_text()
    queries = [q.strip() for b in re.findall(r"```promql\n(.*?)```", text, flags=re.S) for q in b.strip().split("\n\n")]
    for span in re.findall(r"`([^`\n]*\b(?:llm|gen_ai)_\w+[^`\n]*)`", text):
        if re.search(r"\s/\s|\b(?:sum|rate|increase|histogram_quantile|topk)\s*\(", span):
            queries.append(span)
    return queries


def test_every_query_the_metrics_doc_gives_answers_with_the_traffic(run: Run) -> None:
    """A query a reader copies from docs/metrics.md returns series, and a cache-hit share the traffic's share: a
    ratio of series whose labels differ matches nothing and returns no value at all, though it parses."""
    queries = _metrics_doc_queries()
    cache_share = sum(r.details.get("cache_read", 0) for r in TRAFFIC) / sum(r.tokens.get("input", 0) for r in TRAFFIC)
    shares = [q for q in queries if 'llm_token_detail="cache_read"' in q and "/" in q]
    assert len(queries) > 8 and len(shares) >= 2, queries
    empty, wrong = [], []
    for query in queries:
        expr = re.sub(r"\[\d+[smhdw]\]", f"[{run.window}]", " ".join(query.split()))
        if not run.query(expr):
            empty.append(query)
        elif query in shares:
            # The share from one of the two scrapes: rate() of the other's series, whose samples sit off the
            # window's edges, extrapolates each series apart, and the ratio is then only near the traffic's.
            expr, scoped = re.subn(r"\b((?:llm|gen_ai)_\w+)\{", rf'\1{{endpoint="{ENDPOINT}",', expr)
            share = float(run.query(expr)[0]["value"][1])
            if scoped != 2 or not _close(share, cache_share):
                wrong.append((query, share, cache_share))
    assert empty == [] and wrong == []


def test_dashboard_variables_list_the_traffic_values(run: Run) -> None:
    """Each variable's query, as Grafana runs it (the label values API, the variables in its selector at All),
    lists what the traffic had. The trace service is the OpenTelemetry service name, which the job is not."""
    dashboard = build_dashboard(attribution_labels=("tenant",))
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
            assert match, variable["definition"]
            selector = re.sub(r"\$\w+", ".*", match.group(1))
            found[variable["name"]] = set(
                run.prom.get(f"/api/v1/label/{match.group(2)}/values", **{"match[]": selector})
            )
    assert found == {
        "namespace": {NAMESPACE},
        "job": {JOB},
        "endpoint": {ENDPOINT, OTHER_ENDPOINT},
        "service": {SERVICE},
        "log_services": {SERVICE},  # (every one: the error log panel's)
        "model": {r.model for r in TRAFFIC},
        TENANT: {r.tenant for r in TRAFFIC},
    }


def test_the_operators_dashboard_opens_on_its_own_service(run: Run) -> None:
    """The dashboard the operator makes for an LLMTelemetry is titled with that resource's service and opens on it:
    its namespace, job and scrape endpoint variables default to values their queries list (the job is the resource's
    name, which its ServiceMonitor sets, and the endpoint its port name; here the first scrape plays it)."""
    resources = pytest.importorskip("llm_telemetry_operator.resources")
    config = pytest.importorskip("llm_telemetry_operator.config")
    spec = pytest.importorskip("llm_telemetry_operator.spec")
    owner = {"metadata": {"namespace": NAMESPACE, "name": JOB, "uid": "u"}}
    parsed = spec.parse_spec(
        {"selector": {"matchLabels": {"app": JOB}}, "attribution": {"headers": {"x-tenant": "tenant"}}}
    )
    configmap = resources.build_dashboard_configmap(owner, parsed, config.OperatorConfig())
    [text] = configmap["data"].values()
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    chosen: dict[str, str] = {}
    for name in ("namespace", "job", "endpoint"):
        default = variables[name]["current"]["value"]
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variables[name]["definition"])
        assert match, variables[name]["definition"]
        selector = re.sub(r"\$(\w+)", lambda m: chosen.get(m.group(1), ".*"), match.group(1))
        options = run.prom.get(f"/api/v1/label/{match.group(2)}/values", **{"match[]": selector})
        assert default == [{"namespace": NAMESPACE, "job": JOB, "endpoint": ENDPOINT}[name]]
        assert set(default) <= set(options), (name, default, options)
        chosen[name] = default[0]
    assert dashboard["title"] == f"LLM: {NAMESPACE}/{JOB}"
    # Every other variable opens on All, as the shipped dashboard's do.
    others = [v for n, v in variables.items() if v.get("includeAll") and n not in chosen]
    assert others and all(v["current"]["value"] == ["$__all"] for v in others)


def test_prometheus_records_every_rule_and_no_alert_claims_the_target_is_down(run: Run) -> None:
    # Prometheus' own evaluations (fixed windows), not just the expressions: every recorded series has values.
    records = {r["record"] for g in build_rule_groups(THRESHOLDS) for r in g["rules"] if "record" in r}
    at = run.end_ms / 1000 + 2  # rule evaluations lag the scrape by up to one interval
    wait_for("Prometheus' rule evaluations to catch up", lambda: time.time() > at + 1)
    empty = sorted(name for name in records if not run.prom.query(f'{name}{{job="{JOB}"}}', at))
    assert empty == []
    # Firing, not pending: one scrape of a loaded machine's target missing its 1 s timeout makes it pending.
    alerts = run.prom.get("/api/v1/alerts")["alerts"]
    assert [a for a in alerts if a["labels"]["alertname"] == "LLMTargetDown" and a["state"] == "firing"] == []

"""LLMTelemetry resources the CRD must admit, and ones it must refuse, shared by the schema tests (no cluster:
tests/operator/test_crd.py) and the real API server's (tests/integration/test_crd_on_server.py), so both judge
the same objects."""

from __future__ import annotations

import copy
from typing import Any

MINIMAL: dict[str, Any] = {
    "apiVersion": "llmtelemetry.dev/v1alpha1",
    "kind": "LLMTelemetry",
    "metadata": {"name": "chat", "namespace": "llm"},
    "spec": {"selector": {"matchLabels": {"app": "chat"}}},
}

#: Selectors that name the workloads they select: a label, or an In or Exists requirement beside anything else.
GOOD_SELECTORS: list[dict[str, Any]] = [
    {"matchLabels": {"app": "chat"}},
    {"matchExpressions": [{"key": "app", "operator": "In", "values": ["chat"]}]},
    {
        "matchExpressions": [
            {"key": "llm", "operator": "Exists"},
            {"key": "app", "operator": "NotIn", "values": ["db"]},
        ]
    },
    {"matchLabels": {"app": "chat"}, "matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]},
]

#: Scrape intervals the rules' 5 minute rates work with (the bounds included).
GOOD_INTERVALS = ["1s", "1000ms", "15s", "1m", "75s"]

#: Spec changes (a key set to None is taken out) the CRD refuses, and why. "(CEL rule)" marks the refusals that
#: come from a validation rule, which a server without them (CEL off) admits.
BAD_SPECS: list[tuple[dict[str, Any], str]] = [
    ({"selector": None}, "selector is required"),
    ({"selector": {}}, "selector without matchLabels or matchExpressions (CEL rule)"),
    ({"selector": {"matchLabels": {}}}, "empty matchLabels: would select every workload (CEL rule)"),
    ({"selector": {"matchExpressions": []}}, "empty matchExpressions: would select every workload (CEL rule)"),
    (
        {"selector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}},
        "NotIn alone: would select every other workload (CEL rule)",
    ),
    (
        {"selector": {"matchExpressions": [{"key": "legacy", "operator": "DoesNotExist"}]}},
        "DoesNotExist alone: would select every other workload (CEL rule)",
    ),
    ({"metrics": {"port": 0}}, "port minimum"),
    ({"metrics": {"interval": "often"}}, "interval pattern"),
    ({"metrics": {"interval": "90s"}}, "interval past 75s: the rules' 5 minute rates need four scrapes (CEL rule)"),
    ({"metrics": {"interval": "0s"}}, "interval of 0 (CEL rule)"),
    ({"metrics": {"interval": "1ms"}}, "interval below 1s: a thousand scrapes a second of the app (CEL rule)"),
    ({"metrics": {"interval": "999ms"}}, "interval just below 1s (CEL rule)"),
    ({"tracing": {"protocol": "thrift"}}, "protocol enum"),
    ({"tracing": {"samplingRatio": 1.5}}, "ratio maximum"),
    ({"logs": {"mode": "syslog"}}, "logs mode enum"),
    ({"alerts": {"availabilityObjective": 1}}, "objective below 1"),
    ({"alerts": {"ttftObjectiveSeconds": 3}}, "TTFT bucket"),
    # Past the histogram's last finite buckets a p95 cannot be told apart: the alert could never fire.
    ({"alerts": {"p95TtftSeconds": 41}}, "p95 TTFT maximum"),
    ({"alerts": {"p95RequestDurationSeconds": 600}}, "p95 duration maximum"),
    ({"attribution": {"headers": {"x-tenant-id": "Tenant-Id"}}}, "label pattern"),
    ({"attribution": {"maxLabelValues": 1_000_000_000}}, "label values maximum: a series each"),
    ({"pricing": {"models": {"gpt-4o": {"input": -1, "output": 1}}}}, "negative price"),
    ({"pricing": {"models": {"gpt-4o": {"input": 1}}}}, "output price is required"),
    (
        {"pricing": {"models": {"gpt-4o": {"input": 1, "output": 2, "cached_input": 0.5}}}},
        "unknown price kind (CEL rule)",
    ),
    ({"pricing": {"models": {"gpt-4o": {"input": 1, "output": "2"}}}}, "price is a number"),
    (
        {"pricing": {"models": {"gpt-4o": {"input": 1, "output": 2}}, "configMapRef": {"name": "prices"}}},
        "models and configMapRef together (CEL rule)",
    ),
    ({"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}, "operator enum"),
    # Grafana's dashboard sidecar joins the folder to its directory: a path would write anywhere it can.
    ({"dashboard": {"folder": "/etc/grafana/provisioning"}}, "folder is an absolute path"),
    ({"dashboard": {"folder": "../other-team"}}, "folder climbs out"),
    ({"dashboard": {"folder": "Team/ML"}}, "folder holds a separator"),
    ({"dashboard": {"folder": ".."}}, "folder is .. (CEL rule)"),
    ({"dashboard": {"folder": "."}}, "folder is . (CEL rule)"),
    ({"dashboard": {"folder": "a\nb"}}, "folder holds a control character"),
    ({"dashboard": {"folder": "x" * 64}}, "folder maxLength"),
    ({"logs": {"tenant": "team a"}}, "tenant pattern"),
    ({"logs": {"tenant": "a|b"}}, "tenant pattern: '|' separates tenants in a query"),
    ({"logs": {"tenant": ".."}}, "tenant is .. (CEL rule)"),
    ({"logs": {"tenant": "t" * 151}}, "tenant maxLength"),
    ({"containers": [f"c{i}" for i in range(33)]}, "containers maxItems"),
    ({"containers": ["app", "c" * 64]}, "container name maxLength: a container name has at most 63 characters"),
]

#: Values the CRD and the operator both take, and both refuse: a dashboard folder is one folder name (Grafana's
#: sidecar joins it to its directory), a Loki tenant is one Loki accepts.
ACCEPTED = [("dashboard", "folder", v) for v in ("LLM", "Team ML", "Équipe IA", "v1.2", "x" * 63)] + [
    ("logs", "tenant", v) for v in ("team-a", "fake", "acme_prod.eu", "a!*'()", "", "t" * 150)
]
REFUSED = (
    [
        ("dashboard", "folder", v)
        for v in ("/etc/grafana/provisioning", "../other-team", "Team/ML", "..", ".", "a\\b", "x" * 64)
    ]
    + [("logs", "tenant", v) for v in ("team a", "a|b", "..", ".", "t" * 151, "a,b", "a=b", "team-a\n")]
    + [
        # A final newline (YAML's `key: |`), which the API server's patterns refuse: Go's `$` is the end of the text.
        ("metrics", "interval", "30s\n"),
    ]
)


def with_spec(patch: dict[str, Any]) -> dict[str, Any]:
    """MINIMAL with ``patch`` over its spec (a key set to None is taken out)."""
    obj = copy.deepcopy(MINIMAL)
    for key, value in patch.items():
        if value is None:
            del obj["spec"][key]
        else:
            obj["spec"][key] = value
    return obj


def with_field(section: str, field: str, value: Any) -> dict[str, Any]:
    return with_spec({section: {field: value}})

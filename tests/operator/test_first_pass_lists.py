"""A resource created while the operator runs has no children yet: its first pass creates them without listing
each kind first (docs/performance.md, "Operator: method"). The claim the operator writes on the resource before
that pass (``status.operator``) is no earlier pass's status, so it must not make the pass list them."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from kopf_testing import (
    DEPLOYMENTS,
    LLMT,
    NAMESPACE,
    deployment,
    get,
    install_default_collectors,
    install_prometheus_operator_crds,
    minimal_llmt,
    ready,
    running_operator,
)

from llm_telemetry_operator import constants as c

#: The kinds of child a pass lists by its owner label once the resource has a status of a pass.
CHILD_KINDS = ("services", "configmaps", "servicemonitors", "prometheusrules")


def child_lists(kmock: Any, owner: str) -> list[str]:
    """The operator's lists of one LLMTelemetry's children (by its owner label, as a pass reads them)."""
    return [
        str(r.url.path)
        for r in list(kmock)
        if r.method.value == "GET"
        and str(r.url.path).rsplit("/", 1)[-1] in CHILD_KINDS
        and f"{c.LABEL_OWNER}={owner}" in r.url.query.get("labelSelector", "")
    ]


async def test_a_new_resources_first_pass_lists_no_children(emulator: Any, monitoring_crds: Any) -> None:
    install_prometheus_operator_crds(emulator, monitoring_crds)
    install_default_collectors(emulator)
    emulator.objects[DEPLOYMENTS, NAMESPACE, "chat"] = deployment()
    async with running_operator():
        # Created through the API while the operator watches, as `kubectl apply` does.
        url = f"{str(emulator.url).rstrip('/')}/apis/llmtelemetry.dev/v1alpha1/namespaces/{NAMESPACE}/llmtelemetries"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=json.dumps(minimal_llmt()), headers={"X-Test-Hand": "1"}) as rsp:
                assert rsp.status < 400, await rsp.text()
        await ready(emulator)
    body = get(emulator, LLMT, "chat")
    assert body is not None and (body.get("status") or {}).get("operator"), "the resource was not claimed"
    assert child_lists(emulator, "chat") == []

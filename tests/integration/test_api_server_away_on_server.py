"""A real API server the operator cannot reach for half a minute (a restart, an upgrade, a network cut), while
resources are created, edited and deleted and a child is deleted: the operator stays up, says so once per watch
rather than at every retry, and once it reaches the API server again catches up without a restart.

Each of the operator's own watches of the workloads and children logged a WARNING at every retry of an API server
that gave no answer (after 1, 2, 4, 8, 16 and then every 30 s, each watch): a 180 s outage of a real API server left
43 such lines from eight watches (six, and two of collector Services), six watches more per watched namespace in
namespaced mode."""

from __future__ import annotations

import collections
import contextlib
import pathlib
import re
import time
from typing import Any

import pytest
from clusterkit import (
    ApiProxy,
    api_server,
    deployment,
    install,
    start_chart_operator,
    stop,
    telemetry,
    uninstall,
    unique,
    wait_for,
)

from llm_telemetry_operator import constants as c

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = c.GROUP, c.VERSION, c.PLURAL
#: Half a minute: each watch fails and retries several times meanwhile (the operator's own after 1, 2, 4 and 8 s,
#: kopf's after 1, 1, 2, 3, 5 and 8 s), and the server is back just before their next retries (at about 31 and 33 s
#: into the outage). A few seconds longer only leaves the catch-up to the retries after those (at about 61 and 54 s).
AWAY_SECONDS = 30
#: A watch's line for a failure of the API server away: the watch is told by its URL (the version it resumes from
#: aside), as two watches of one kind differ by their selector (the collectors' Services, each by its name).
FAILED = re.compile(
    r"\[WARNING *\] watching \S+ failed \(0 Unreachable: GET (\S+?)(?:&resourceVersion=\d+)?: no answer"
)


def _port(apps_api: Any, namespace: str, name: str) -> str | None:
    template = apps_api.read_namespaced_deployment(name, namespace).spec.template.spec
    env = template.containers[0].env or []
    return next((e.value for e in env if e.name == "LLM_TELEMETRY_METRICS_PORT"), None)


def _ready(custom: Any, namespace: str, name: str) -> bool:
    body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    status = body.get("status") or {}
    conditions = {x["type"]: x["status"] for x in status.get("conditions") or []}
    return (
        conditions.get(c.CONDITION_READY) == "True"
        and status.get("observedGeneration") == body["metadata"]["generation"]
    )


def test_after_half_a_minute_without_an_api_server_the_operator_catches_up_having_said_so_once_per_watch(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    from kubernetes import client

    core, apps_api = client.CoreV1Api(api), client.AppsV1Api(api)
    custom = client.CustomObjectsApi(api)
    system, apps = unique("llmt-away-system"), unique("llmt-away")
    docs = install(api, system)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=apps)))
    for name in ("edited", "deleted", "kept", "created"):
        apps_api.create_namespaced_deployment(apps, deployment(name, name))
    for name in ("edited", "deleted", "kept"):
        custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, telemetry(name, name))
    server, ca = api_server(kubeconfig)
    try:
        with ApiProxy(server, ca) as proxy:
            process, log, _, _ = start_chart_operator(
                api, kubeconfig, docs, system, tmp_path, "--resync-seconds", "600",
                server=f"http://127.0.0.1:{proxy.port}",
            )  # fmt: skip
            try:
                wait_for(
                    lambda: all(_ready(custom, apps, name) for name in ("edited", "deleted", "kept")),
                    "every resource ready",
                    timeout=120,
                )
                proxy.off()
                cut = time.monotonic()
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, apps, PLURAL, "edited", {"spec": {"metrics": {"port": 9500}}}
                )
                custom.delete_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, "deleted")
                custom.create_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, telemetry("created", "created"))
                selector = f"{c.LABEL_OWNER}=kept"
                (service,) = core.list_namespaced_service(apps, label_selector=selector).items
                core.delete_namespaced_service(service.metadata.name, apps)
                time.sleep(max(0.0, AWAY_SECONDS - (time.monotonic() - cut)))
                assert process.poll() is None, log.read_text()[-4000:]
                proxy.on()

                def caught_up() -> bool:
                    return (
                        _ready(custom, apps, "edited")
                        and _port(apps_api, apps, "edited") == "9500"
                        and _ready(custom, apps, "created")
                        and _port(apps_api, apps, "created") == "9464"
                        and not custom.list_namespaced_custom_object(
                            GROUP, VERSION, apps, PLURAL, field_selector="metadata.name=deleted"
                        )["items"]
                        and _port(apps_api, apps, "deleted") is None
                        and len(core.list_namespaced_service(apps, label_selector=selector).items) == 1
                    )

                wait_for(caught_up, "every change of the outage handled", timeout=120, interval=1)
                assert process.poll() is None, log.read_text()[-4000:]
                services = collections.Counter(
                    (s.metadata.labels or {}).get(c.LABEL_OWNER)
                    for s in core.list_namespaced_service(apps, label_selector=c.LABEL_OWNER).items
                )
                assert services == {"edited": 1, "kept": 1, "created": 1}
                # Each watch said it once (kopf's own lines per retry are another matter: see docs/operator.md).
                told = collections.Counter(FAILED.findall(log.read_text()))
                assert told, log.read_text()[-4000:]
                assert {watch: n for watch, n in told.items() if n > 1} == {}, log.read_text()[-6000:]
            finally:
                if not proxy.listening:
                    proxy.on()
                with contextlib.suppress(Exception):
                    for name in ("edited", "kept", "created"):
                        custom.delete_namespaced_custom_object(GROUP, VERSION, apps, PLURAL, name)
                    wait_for(
                        lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, apps, PLURAL)["items"],
                        "deleted",
                    )
                stop(process)
    finally:
        uninstall(api, docs, (apps, system))

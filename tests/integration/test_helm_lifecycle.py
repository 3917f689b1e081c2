"""The chart's whole life on a real API server, each step run as docs/install.md writes it: install, an upgrade
whose CRD changed, uninstall and the clean-up. The documented commands are read from the page itself, so a
command that the API server refuses fails here, not on a user's cluster."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from clusterkit import CHART, REPO_ROOT, let_go, section, sh_blocks, tool_binary, wait_for

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "llmtelemetry.dev", "v1alpha1", "llmtelemetries"
CRD = f"{PLURAL}.{GROUP}"
PEERING_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
EXAMPLE = REPO_ROOT / "examples" / "llmtelemetry-minimal.yaml"
#: The namespaces the documented commands and the example use.
RELEASE_NAMESPACE, APP_NAMESPACE = "llm-telemetry", "llm"
#: The namespace of the second release the upgrade test installs (helm --create-namespace makes it; the clean-up
#: deletes it).
SECOND_NAMESPACE = "llm-telemetry-second"


class Shell:
    """Runs documented commands as a user would from the checkout, with the chart path pointed at a copy."""

    def __init__(self, kubeconfig: pathlib.Path, chart: pathlib.Path, home: pathlib.Path) -> None:
        self.binaries = {"helm": tool_binary("helm"), "kubectl": tool_binary("kubectl")}
        self.chart = chart
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def __call__(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        chart = str(CHART.relative_to(REPO_ROOT))
        argv = [self.binaries.get(argv[0], argv[0])] + [
            str(self.chart) + arg[len(chart) :] if arg.startswith(chart) else arg for arg in argv[1:]
        ]
        result = subprocess.run(
            argv, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=300, check=False
        )
        if check:
            assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout}\n{result.stderr}"
        return result


def _absent(read: Any, *args: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    try:
        read(*args)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def _delete_and_wait(delete: Any, read: Any, *args: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        delete(*args)
    except ApiException as exc:
        if exc.status != 404:
            raise
    wait_for(lambda: _absent(read, *args), f"{args} deleted", timeout=180)


@pytest.fixture
def fresh(api: Any, kubeconfig: pathlib.Path) -> Iterator[None]:
    """No LLMTelemetry CRD, peering object or documented namespaces: a cluster that never had the chart.
    Left the same way afterwards, so that other tests install the CRDs their own way."""
    from kubernetes import client

    extensions = client.ApiextensionsV1Api(api)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)

    def clean() -> None:
        # A release left by a failed run would keep its cluster-wide RBAC.
        subprocess.run(
            [tool_binary("helm"), "uninstall", "llm-telemetry", "-n", RELEASE_NAMESPACE],
            env={**os.environ, "KUBECONFIG": str(kubeconfig)}, capture_output=True, timeout=300, check=False,
        )  # fmt: skip
        for namespace in (APP_NAMESPACE, RELEASE_NAMESPACE, SECOND_NAMESPACE):
            _delete_and_wait(core.delete_namespace, core.read_namespace, namespace)
        if not _absent(extensions.read_custom_resource_definition, PEERING_CRDS[0]):
            _delete_and_wait(
                lambda name: custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name),
                lambda name: custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name),
                "llm-telemetry-operator",
            )
        # Resources another test left held by the finalizer of an operator it stopped would keep the CRD for good.
        let_go(api)
        _delete_and_wait(extensions.delete_custom_resource_definition, extensions.read_custom_resource_definition, CRD)

    clean()
    try:
        yield
    finally:
        clean()


def chart_copy(api: Any, into: pathlib.Path) -> pathlib.Path:
    """The chart as shipped. One exception: an API server built from source without version stamping reports
    v0.0.0-master+..., which no kubeVersion range admits, so only for such a server the copy drops that gate."""
    from kubernetes import client

    chart = into / "llm-telemetry-operator"
    shutil.copytree(CHART, chart)
    if client.VersionApi(api).get_code().git_version.startswith("v0.0.0"):
        meta = chart / "Chart.yaml"
        meta.write_text(re.sub(r"(?m)^kubeVersion:.*\n", "", meta.read_text()))
    return chart


def test_install_crd_upgrade_and_uninstall_as_documented(
    api: Any, kubeconfig: pathlib.Path, tmp_path: pathlib.Path, fresh: None
) -> None:
    from kubernetes import client

    extensions = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    core = client.CoreV1Api(api)
    chart = chart_copy(api, tmp_path)
    run = Shell(kubeconfig, chart, tmp_path / "helm")

    # Install: the first command of "2. Install the chart".
    (install,) = sh_blocks("2. Install the chart")[0]
    assert install[:2] == ["helm", "install"], install
    run(install)
    release = yaml.safe_load_all(run(["helm", "get", "manifest", "llm-telemetry", "-n", RELEASE_NAMESPACE]).stdout)
    objects = [(doc["kind"], doc["metadata"]["name"]) for doc in release if doc]
    kinds = {kind for kind, _ in objects}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"} <= kinds, objects

    def established() -> bool:
        conditions = extensions.read_custom_resource_definition(CRD).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conditions)

    wait_for(established, "the chart's CRD established")
    for name in PEERING_CRDS:
        extensions.read_custom_resource_definition(name)
    peering = ("kopf.dev", "v1", "clusterkopfpeerings", "llm-telemetry-operator")
    # A replica's entry, as kopf keeps it: an upgrade must keep the object and its peers (a standby replica that
    # found it empty would resume work beside the active one).
    alive = {"status": {"llm-telemetry-operator-0": {"priority": 0, "lifetime": 60, "lastseen": "2026-01-01T00:00:00"}}}
    custom.patch_cluster_custom_object(*peering, alive)
    peering_uid = custom.get_cluster_custom_object(*peering)["metadata"]["uid"]

    # A user's resource, plus a field this release's CRD does not know: the API server prunes it.
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=APP_NAMESPACE)))
    run(["kubectl", "apply", "-f", str(EXAMPLE.relative_to(REPO_ROOT))])
    name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
    probe = {"spec": {"upgradeProbe": "kept after the CRD upgrade"}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, APP_NAMESPACE, PLURAL, name, probe)
    spec = custom.get_namespaced_custom_object(GROUP, VERSION, APP_NAMESPACE, PLURAL, name)["spec"]
    assert "upgradeProbe" not in spec and spec["selector"] == {"matchLabels": {"app": "chat"}}

    # The next release's CRD declares that field; "Upgrading and uninstalling" applies it and upgrades.
    crd_file = chart / "crds" / "llmtelemetry.dev_llmtelemetries.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    (served,) = crd["spec"]["versions"]
    served["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["upgradeProbe"] = {"type": "string"}
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))
    upgrade_block, crd_block, cleanup_block = sh_blocks("Upgrading and uninstalling")
    (upgrade,) = upgrade_block
    assert upgrade[:2] == ["helm", "upgrade"], upgrade
    run(upgrade)
    kept = custom.get_cluster_custom_object(*peering)
    assert kept["metadata"]["uid"] == peering_uid and kept["status"] == alive["status"], kept
    # A second cluster-wide release, installed as "Several releases" says (--skip-crds), shares that peering object
    # by default: its install keeps the object and its peers too.
    second = ["-n", SECOND_NAMESPACE]
    run(
        [
            "helm",
            "install",
            "llm-telemetry-second",
            str(CHART.relative_to(REPO_ROOT)),
            *second,
            "--create-namespace",
            "--skip-crds",
        ]
    )
    kept = custom.get_cluster_custom_object(*peering)
    assert kept["metadata"]["uid"] == peering_uid and kept["status"] == alive["status"], kept
    run(["helm", "uninstall", "llm-telemetry-second", *second])
    (apply_crd,) = crd_block
    run(apply_crd)

    def spec_fields() -> set[str]:
        served = api.sanitize_for_serialization(extensions.read_custom_resource_definition(CRD))
        return set(served["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])

    wait_for(lambda: "upgradeProbe" in spec_fields(), "the new CRD schema stored")

    def kept() -> bool:
        custom.patch_namespaced_custom_object(GROUP, VERSION, APP_NAMESPACE, PLURAL, name, probe)
        spec = custom.get_namespaced_custom_object(GROUP, VERSION, APP_NAMESPACE, PLURAL, name)["spec"]
        return bool(spec.get("upgradeProbe") == "kept after the CRD upgrade")

    # The API server prunes by the schema it serves, which follows the stored CRD a moment later (its own watch of
    # it; no condition says when): a patch made at once can still be pruned, so the patch is made until it is kept.
    wait_for(kept, "the field the new CRD declares kept by the API server")
    # Applying the same CRD again, as a later upgrade would, is accepted too.
    run(apply_crd)

    # Uninstall: the operator and its RBAC go; the CRD (with the user's resource), kopf's CRDs and the peering
    # object stay, as the page says.
    (uninstall,) = re.findall(r"`(helm uninstall [^`]+)`", section("Upgrading and uninstalling"))
    run(shlex.split(uninstall))
    rbac = client.RbacAuthorizationV1Api(api)
    apps = client.AppsV1Api(api)
    readers = {
        "Deployment": lambda n: apps.read_namespaced_deployment(n, RELEASE_NAMESPACE),
        "ServiceAccount": lambda n: core.read_namespaced_service_account(n, RELEASE_NAMESPACE),
        "Service": lambda n: core.read_namespaced_service(n, RELEASE_NAMESPACE),
        "ClusterRole": rbac.read_cluster_role,
        "ClusterRoleBinding": rbac.read_cluster_role_binding,
    }
    for kind, object_name in objects:
        if kind in readers:
            assert _absent(readers[kind], object_name), f"{kind} {object_name} survived helm uninstall"
    assert established()
    custom.get_namespaced_custom_object(GROUP, VERSION, APP_NAMESPACE, PLURAL, name)
    for crd_name in PEERING_CRDS:
        extensions.read_custom_resource_definition(crd_name)
    custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "llm-telemetry-operator")

    # The chart installed again, as "Uninstalled before its resources" has a user do, once the CRD was applied with
    # kubectl, from a chart whose CRD differs from that one (this release's, without the field the applied CRD
    # declares): Helm 4 applies the chart's CRD at install, and the API server refuses it, naming kubectl's field
    # manager; the release installs with --skip-crds, as the page says.
    crd_file.write_text((CHART / "crds" / crd_file.name).read_text())
    uninstalled = " ".join(section("Upgrading and uninstalling").split())
    assert "Install the chart again (with `--skip-crds` if the CRD was applied with `kubectl` since" in uninstalled
    assert 'fails with `conflict with "kubectl": .spec.versions` where the chart\'s CRD differs from it' in uninstalled
    if run(["helm", "version", "--short"]).stdout.startswith("v4"):
        refused = run(install, check=False)
        assert refused.returncode != 0, refused.stdout
        assert 'conflict with "kubectl": .spec.versions' in refused.stderr, refused.stderr
    run([*install, "--skip-crds"])
    assert "upgradeProbe" in spec_fields()
    run(shlex.split(uninstall))

    # The clean-up: the resources first, then the documented commands.
    custom.delete_namespaced_custom_object(GROUP, VERSION, APP_NAMESPACE, PLURAL, name)
    for command in cleanup_block:
        run(command)
    wait_for(lambda: _absent(extensions.read_custom_resource_definition, CRD), "the CRD deleted", timeout=120)
    assert _absent(
        lambda: custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "llm-telemetry-operator")
    )

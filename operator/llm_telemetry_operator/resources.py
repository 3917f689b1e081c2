"""Pure ``build_*`` functions: an LLMTelemetry (and the workloads it selects) in, manifests and patches out.

Nothing here talks to the API server, so every manifest is unit-testable and the chart's docs can render
the same objects. The reconcile loop (:mod:`llm_telemetry_operator.reconcile`) decides what to send.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from llm_telemetry import config as mw
from llm_telemetry_operator import constants as c
from llm_telemetry_operator.config import OperatorConfig, grpc_default
from llm_telemetry_operator.errors import SpecError
from llm_telemetry_operator.spec import TelemetrySpec

if TYPE_CHECKING:
    from llm_telemetry.monitoring.rules import AlertThresholds

# Downward-API variables that OTEL_RESOURCE_ATTRIBUTES refers to with $(VAR); they must come first.
ENV_POD_NAMESPACE = "K8S_NAMESPACE_NAME"
ENV_POD_NAME = "K8S_POD_NAME"
ENV_POD_UID = "K8S_POD_UID"

#: Workload kind to the OpenTelemetry resource attribute naming it.
WORKLOAD_ATTRIBUTE = {"Deployment": "k8s.deployment.name", "StatefulSet": "k8s.statefulset.name"}
#: A signal's OTLP headers set to none: an empty list, written ``,`` since the SDK reads an empty variable as unset
#: and then sends that signal the headers of OTEL_EXPORTER_OTLP_HEADERS.
NO_HEADERS = ","


_SERVICE_SUFFIX = "llm-metrics"
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: The end of a base that a cut name ends its readable part with: ``-`` and the 8 hex digits of :func:`_name`'s hash.
_HASH_SHAPED = re.compile(r"-[0-9a-f]{8}")


def _name(base: str, suffix: str) -> str:
    """``<base>-<suffix>``, within the 63 characters a child's name may hold (a DNS label): a longer one is cut and
    told apart by a hash of the whole ``base``, so two names that share their first characters never meet.

    A cut name reads ``<part of base>-<8 hex digits>-<suffix>``; so a base that itself ends in ``-`` and 8 hex digits
    is given its hashed form too, whatever its length: its plain name could be, to the letter, the cut name of a
    longer base (a 49-character ``<40 characters>-<hash>`` beside a 63-character name sharing those 40), and the two
    resources would then claim one child. Plain names (bases without that ending) and cut ones are thus never equal,
    and two cut ones only if both the readable part and the hash of the whole base agree."""
    plain = f"{base}-{suffix}"
    if len(plain) <= 63 and not _HASH_SHAPED.fullmatch(base[-9:]):
        return plain
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    return f"{base[: 63 - len(suffix) - len(digest) - 2].rstrip('-.')}-{digest}-{suffix}"


def service_name(workload_name: str, kind: str = "Deployment") -> str:
    """``<workload>-llm-metrics`` for a Deployment, ``<workload>-llm-metrics-sts`` for a StatefulSet (a Deployment and
    a StatefulSet may share a name, and each gets a Service of its own), when that is a DNS-1035 label, as a
    Service's name must be. A workload's name is a DNS subdomain of up to 253 characters: one with a dot, a leading
    digit or too long gets its Service named from a readable part of it and a hash of all of it, so no two workloads
    share one."""
    suffix = _SERVICE_SUFFIX if kind != "StatefulSet" else f"{_SERVICE_SUFFIX}-sts"
    plain = f"{workload_name}-{suffix}"
    if len(plain) <= 63 and _DNS_1035.fullmatch(plain):
        return plain
    digest = hashlib.sha256(workload_name.encode()).hexdigest()[:8]
    base = workload_name.replace(".", "-")
    if not base[:1].isalpha():
        base = "w" + base
    return f"{base[: 63 - len(suffix) - len(digest) - 2].rstrip('-')}-{digest}-{suffix}"


def service_monitor_name(owner_name: str) -> str:
    return _name(owner_name, "llm-telemetry")


def prometheus_rule_name(owner_name: str) -> str:
    return _name(owner_name, "llm-telemetry")


def dashboard_configmap_name(owner_name: str) -> str:
    return _name(owner_name, "llm-dashboard")


def pricing_configmap_name(owner_name: str) -> str:
    return _name(owner_name, "llm-pricing")


def build_labels(owner_name: str, component: str, name: str | None = None) -> dict[str, str]:
    """The ``app.kubernetes.io/*`` labels on every child, plus the owner label the operator finds them by."""
    return {
        c.LABEL_NAME: name or owner_name,
        c.LABEL_INSTANCE: owner_name,
        c.LABEL_COMPONENT: component,
        c.LABEL_PART_OF: "llm-telemetry",
        c.LABEL_MANAGED_BY: c.MANAGER,
        c.LABEL_OWNER: owner_name,
    }


def owner_selector(owner_name: str) -> dict[str, str]:
    """Labels that select every child of one LLMTelemetry."""
    return {c.LABEL_MANAGED_BY: c.MANAGER, c.LABEL_OWNER: owner_name}


#: The longest LLMTelemetry name: its children carry it in label values (``app.kubernetes.io/instance``, the owner
#: label, Prometheus's ``job``), which hold at most 63 characters. The CRD admits no longer name.
MAX_OWNER_NAME = 63


def check_owner(owner: Mapping[str, Any]) -> None:
    """Raise :class:`SpecError` for an LLMTelemetry whose children could not be written: a name longer than a label
    value (one stored before the CRD said so), or no uid to own them by."""
    check_owner_name(owner.get("metadata", {}).get("name") or "")
    build_owner_reference(owner)


def check_owner_name(name: str) -> None:
    if len(name) > MAX_OWNER_NAME:
        raise SpecError(
            "metadata.name", f"has {len(name)} characters; at most {MAX_OWNER_NAME} fit the labels its children carry"
        )


def build_owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    meta = owner.get("metadata", {})
    if not meta.get("uid"):
        raise SpecError("metadata.uid", "the LLMTelemetry has no uid; children could not be owned by it")
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    owner: Mapping[str, Any], name: str, component: str, labels: Mapping[str, str] | None = None
) -> dict[str, Any]:
    meta = owner["metadata"]
    own = build_labels(meta["name"], component)
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": meta["namespace"],
        "labels": {**(labels or {}), **own},
        "ownerReferences": [build_owner_reference(owner)],
    }
    extra = sorted(set(labels or ()) - set(own))
    if extra:
        metadata["annotations"] = {c.ANNOTATION_LABELS: ",".join(extra)}
    return metadata


# --- injection --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Injection:
    """What goes into each selected container of one workload's pod template."""

    env: tuple[dict[str, Any], ...]
    port: dict[str, Any]
    volume: dict[str, Any] | None = None
    volume_mount: dict[str, Any] | None = None
    containers: tuple[str, ...] = ()
    #: Extra input to the config hash (e.g. inline prices, which reach the pods through a mounted file).
    extra_hash_input: str = ""
    digest: str = field(init=False, default="")

    def __post_init__(self) -> None:
        volume = self.volume
        if volume is not None and "configMap" in volume:
            # Hashed without the defaultMode the API server would fill in anyway: adding it changed nothing in the
            # pods, so it changes no hash (which would roll every workload with prices out on an upgrade).
            volume = {**volume, "configMap": {k: v for k, v in volume["configMap"].items() if k != "defaultMode"}}
        material = json.dumps([self.env, self.port, volume, self.volume_mount, self.extra_hash_input], sort_keys=True)
        object.__setattr__(self, "digest", hashlib.sha256(material.encode()).hexdigest()[:16])


def otel_service_name(workload: Mapping[str, Any]) -> str:
    """``app.kubernetes.io/name`` of the pods (or the workload), else the workload's name."""
    template_labels = workload.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
    labels = workload.get("metadata", {}).get("labels") or {}
    return str(template_labels.get(c.LABEL_NAME) or labels.get(c.LABEL_NAME) or workload["metadata"]["name"])


def traces_endpoint(spec: TelemetrySpec, config: OperatorConfig) -> str:
    """Where the workloads' traces go: ``spec.tracing.endpoint``, else the operator's default (for ``grpc``, on its
    gRPC port: :func:`~llm_telemetry_operator.config.grpc_default`)."""
    if spec.tracing.endpoint:
        return spec.tracing.endpoint
    return grpc_default(config.traces_endpoint) if spec.tracing.protocol == "grpc" else config.traces_endpoint


def build_env(
    spec: TelemetrySpec,
    config: OperatorConfig,
    workload: Mapping[str, Any],
    owner_name: str,
    without: frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """The environment the middleware and the OpenTelemetry SDK read, in dependency order.

    ``without``: exporters (``traces``, ``logs``) not to inject although enabled, because their collector's
    Service does not exist (see :mod:`llm_telemetry_operator.collectors`).
    """

    def field_ref(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    def value(name: str, val: str | int | float) -> dict[str, Any]:
        # Taken literally: Kubernetes expands $(NAME) in a value from the container's variables declared before it,
        # and $$ is its escape. An endpoint with $(OPENAI_API_KEY) in it would send the app's key to that endpoint.
        return {"name": name, "value": str(val).replace("$", "$$")}

    def expanded(name: str, val: str) -> dict[str, Any]:
        return {"name": name, "value": val}  # (refers to the pod's own variables, set just before it)

    kind = str(workload.get("kind") or "Deployment")
    workload_name = workload["metadata"]["name"]
    attributes = [
        f"k8s.namespace.name=$({ENV_POD_NAMESPACE})",
        f"{WORKLOAD_ATTRIBUTE.get(kind, 'k8s.deployment.name')}={workload_name}",
        f"k8s.pod.name=$({ENV_POD_NAME})",
        f"k8s.pod.uid=$({ENV_POD_UID})",
    ]
    env = [
        field_ref(ENV_POD_NAMESPACE, "metadata.namespace"),
        field_ref(ENV_POD_NAME, "metadata.name"),
        field_ref(ENV_POD_UID, "metadata.uid"),
        value("OTEL_SERVICE_NAME", otel_service_name(workload)),
        expanded("OTEL_RESOURCE_ATTRIBUTES", ",".join(attributes)),
        value(mw.LLM_TELEMETRY_METRICS_PORT, spec.metrics.port),
        value(mw.LLM_TELEMETRY_METRICS_HOST, mw.DEFAULT_METRICS_HOST),
        value(mw.LLM_TELEMETRY_METRICS_EXPORTER, "prometheus"),
        value(mw.LLM_TELEMETRY_MAX_LABEL_VALUES, spec.max_label_values),
        value(mw.LLM_TELEMETRY_REQUEST_LOGS, "true" if spec.logs.enabled else "false"),
    ]
    if spec.attribution_headers:
        headers = ",".join(f"{h}={label}" for h, label in sorted(spec.attribution_headers.items()))
        env.append(value(mw.LLM_TELEMETRY_ATTRIBUTION_HEADERS, headers))
    if spec.pricing.inline or spec.pricing.config_map:
        env.append(value(mw.LLM_TELEMETRY_PRICING, f"{c.PRICING_MOUNT_PATH}/{pricing_file(spec)}"))
    # Each signal routed to a collector gets its own endpoint, protocol and headers, and nothing generic: the app's
    # signals the resource does not route (its own metrics, its logs when none are shipped over OTLP, one whose own
    # endpoint is empty in the pod, an empty ConfigMap key) would follow OTEL_EXPORTER_OTLP_ENDPOINT to the collector,
    # with the app's OTEL_EXPORTER_OTLP_HEADERS.
    if spec.tracing.enabled and "traces" not in without:
        endpoint = traces_endpoint(spec, config)
        env += [
            value("OTEL_TRACES_EXPORTER", "otlp"),
            # Taken as is: over HTTP the full URL; over gRPC the collector's, its scheme saying whether to use TLS.
            value(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                endpoint if spec.tracing.protocol == "grpc" else f"{endpoint}/v1/traces",
            ),
            value("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", spec.tracing.protocol),
            # No headers: without headers of its own, the SDK sends a signal those of OTEL_EXPORTER_OTLP_HEADERS, the
            # app's credential for a backend of its own.
            value("OTEL_EXPORTER_OTLP_TRACES_HEADERS", NO_HEADERS),
            value("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            value("OTEL_TRACES_SAMPLER_ARG", f"{spec.tracing.sampling_ratio:g}"),
        ]
    else:
        env.append(value("OTEL_TRACES_EXPORTER", "none"))
    if spec.logs.enabled and spec.logs.mode == "otlp" and "logs" not in without:
        base = (spec.logs.endpoint or config.logs_endpoint).rstrip("/")
        tenant = spec.logs.tenant if spec.logs.tenant is not None else config.logs_tenant
        env += [
            value("OTEL_LOGS_EXPORTER", "otlp"),
            # Loki only ingests OTLP over HTTP, at <base>/v1/logs, whatever protocol the traces use.
            value("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT", f"{base}/v1/logs"),
            value("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "http/protobuf"),
            # A multi-tenant Loki (its Helm chart's default) answers 401 to a push that names no tenant. Without one,
            # no headers, as for the traces.
            value("OTEL_EXPORTER_OTLP_LOGS_HEADERS", f"X-Scope-OrgID={tenant}" if tenant else NO_HEADERS),
        ]
    else:
        env.append(value("OTEL_LOGS_EXPORTER", "none"))
    return env


def pricing_file(spec: TelemetrySpec) -> str:
    """The name the pricing table is mounted under: the middleware reads it as JSON when it ends in ``.json``, as YAML
    otherwise, which is how the operator checks a ConfigMap's key by the key's own name (so both read it alike)."""
    json_key = spec.pricing.config_map and not spec.pricing.inline and spec.pricing.config_map_key.endswith(".json")
    return c.PRICING_FILE_JSON if json_key else c.PRICING_FILE


def build_injection(
    spec: TelemetrySpec,
    config: OperatorConfig,
    workload: Mapping[str, Any],
    owner_name: str,
    without: frozenset[str] = frozenset(),
) -> Injection:
    """Everything to inject into one workload for one LLMTelemetry (``without``: see :func:`build_env`)."""
    volume = mount = None
    extra = ""
    if spec.pricing.inline or spec.pricing.config_map:
        cm_name = pricing_configmap_name(owner_name) if spec.pricing.inline else spec.pricing.config_map
        key = c.PRICING_FILE if spec.pricing.inline else spec.pricing.config_map_key
        volume = {
            "name": c.PRICING_VOLUME,
            # defaultMode as the API server fills it in (0644): the workload as stored then equals the one built, and
            # a later pass finds nothing to patch.
            "configMap": {"name": cm_name, "items": [{"key": key, "path": pricing_file(spec)}], "defaultMode": 0o644},
        }
        mount = {"name": c.PRICING_VOLUME, "mountPath": c.PRICING_MOUNT_PATH, "readOnly": True}
        if spec.pricing.inline:
            extra = build_pricing_document(spec)
    return Injection(
        env=tuple(build_env(spec, config, workload, owner_name, without)),
        port={"name": c.METRICS_PORT_NAME, "containerPort": spec.metrics.port, "protocol": "TCP"},
        volume=volume,
        volume_mount=mount,
        containers=spec.containers,
        extra_hash_input=extra,
    )


def injected_record(workload: Mapping[str, Any]) -> dict[str, Any] | None:
    """The operator's record of what it injected into ``workload``, or None."""
    raw = (workload.get("metadata", {}).get("annotations") or {}).get(c.ANNOTATION_INJECTED)
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if _well_formed(record) else None


def _well_formed(record: Any) -> bool:
    """Whether an injection record has the shape this operator writes: anyone who can annotate a workload can
    write one, and a record of another shape must read as none, not fail every pass (and the deletion)."""
    if not isinstance(record, dict) or not isinstance(record.get("owner", ""), (str, type(None))):
        return False
    if not isinstance(record.get("volume", False), bool) or not isinstance(record.get("containers", {}), dict):
        return False
    if not isinstance(record.get("user_label", False), bool):
        return False
    for done in (record.get("containers") or {}).values():
        if not isinstance(done, dict) or not isinstance(done.get("env", {}), dict):
            return False
        if not all(isinstance(v, str) for v in (done.get("env") or {}).values()):
            return False
        if not isinstance(done.get("port", False), bool) or not isinstance(done.get("mount", False), bool):
            return False
    return True


def _env_key(entry: Mapping[str, Any]) -> str:
    """A short fingerprint of an env entry's value, kept in the record to tell our values from the user's."""
    text = json.dumps({k: v for k, v in entry.items() if k != "name"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _as_injected(entry: Mapping[str, Any], ours: Mapping[Any, Any]) -> bool:
    """Whether an env entry is still as the record ``ours`` (name to :func:`_env_key`) says it was injected; once the
    user changes its value it is theirs."""
    return bool(ours.get(entry.get("name")) == _env_key(entry))


#: A reference to another variable in an env value, as the kubelet expands it (``$(NAME)``; ``$$(NAME)`` is literal).
_ENV_REFERENCE = re.compile(r"(?<!\$)\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def _chosen(containers: list[Any], injection: Injection) -> list[Any]:
    """The containers the injection goes into: those ``spec.containers`` names, else the first."""
    return (
        [ct for ct in containers if ct.get("name") in injection.containers] if injection.containers else containers[:1]
    )


#: The values of LLM_TELEMETRY_PRICING an injection makes, whichever file the pricing key is mounted as.
_PRICING_PATHS: Final = frozenset(f"{c.PRICING_MOUNT_PATH}/{name}" for name in (c.PRICING_FILE, c.PRICING_FILE_JSON))


def _made_pricing(entry: Mapping[str, Any], made: Mapping[str, Any]) -> bool:
    """Whether ``entry`` is the pricing variable an injection made for another file name than this one's (an
    earlier version mounted every key as pricing.yaml): the injection's too, to be replaced with the volume."""
    return (
        entry.get("name") == mw.LLM_TELEMETRY_PRICING
        and mw.LLM_TELEMETRY_PRICING in made
        and set(entry) == {"name", "value"}
        and entry.get("value") in _PRICING_PATHS
    )


def _reclaimed(template: Mapping[str, Any], injection: Injection) -> dict[str, Any] | None:
    """The record of an injection whose record annotation was removed (by hand, or by a tool that rewrites the
    workload's metadata), rebuilt from the pod template, or None. Only a template with the injection's config hash
    annotation (which no one else writes) was injected; in it, what equals what the injection makes is taken to be
    the injection's, so that it is replaced and removed as such rather than kept as the user's own (a variable or
    port the user declared by hand exactly as the injection makes it is taken for the injection's too)."""
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    if c.ANNOTATION_CONFIG_HASH not in annotations:
        return None
    made = {entry["name"]: entry for entry in injection.env}
    containers: dict[str, Any] = {}
    present = (template.get("spec") or {}).get("containers") or []
    for container in _chosen(present, injection):  # only where the injection goes: a sidecar's own settings are its own
        env = {
            entry["name"]: _env_key(entry)
            for entry in container.get("env") or []
            if isinstance(entry, Mapping) and (made.get(entry.get("name")) == entry or _made_pricing(entry, made))
        }
        port = any(
            {k: v for k, v in p.items() if k != "hostPort"} == injection.port for p in container.get("ports") or []
        )
        mount = injection.volume_mount is not None and injection.volume_mount in (container.get("volumeMounts") or [])
        if env or port or mount:
            containers[container.get("name")] = {"env": env, "port": port, "mount": mount}
    volume = injection.volume is not None and injection.volume in ((template.get("spec") or {}).get("volumes") or [])
    return {"containers": containers, "volume": volume} if containers or volume else None


def _renamed(template: Mapping[str, Any], record: dict[str, Any] | None) -> dict[str, Any] | None:
    """``record`` with each container it names that the pod template no longer has found under its new name: a
    container renamed since the injection keeps the injected variables, and they are still ours, to replace or
    remove. The new name is the one container the record does not name yet that holds at least one of those
    variables as injected; without exactly one, the entry is dropped (the container is gone)."""
    if not record:
        return record
    recorded = record.get("containers") or {}
    present = [ct for ct in (template.get("spec") or {}).get("containers") or [] if isinstance(ct, Mapping)]
    names = {ct.get("name") for ct in present}
    if all(name in names for name in recorded):
        return record
    containers = {name: done for name, done in recorded.items() if name in names}
    for name, done in recorded.items():
        if name in names:
            continue
        ours = done.get("env") or {}
        holders = [
            ct
            for ct in present
            if ct.get("name") not in containers
            and any(isinstance(e, Mapping) and _as_injected(e, ours) for e in ct.get("env") or [])
        ]
        if len(holders) == 1:
            containers[holders[0].get("name")] = done
    return {**record, "containers": containers}


def _strip(
    template: dict[str, Any], record: Mapping[str, Any] | None, keep_referred: bool = True, service: str = ""
) -> None:
    """Remove from ``template`` (in place) what ``record`` says was injected and is still as injected. ``service``:
    the workload's metrics Service, whose name the label :data:`c.LABEL_METRICS_SERVICE` the injection put on the
    pods holds; a value of the label the injection did not put there is the user's, and stays (see :func:`_apply`)."""
    if not record:
        return
    containers = record.get("containers") or {}
    for container in template.get("spec", {}).get("containers") or []:
        done = containers.get(container.get("name"))
        if not done:
            continue
        ours = done.get("env") or {}
        # A value the user changed since we injected it is theirs now: keep it, with the injected variables it
        # refers to ($(K8S_POD_NAME) in an OTEL_RESOURCE_ATTRIBUTES the user extended): without them the pods would
        # get the reference as literal text. Only those declared before it: the kubelet expands no other, so a
        # reference the user had before the injection (which added the variable after it) keeps nothing.
        entries = container.get("env") or []
        kept = {i for i, e in enumerate(entries) if not _as_injected(e, ours)}
        while keep_referred:
            more = {
                j
                for i in kept
                for name in _ENV_REFERENCE.findall(str(entries[i].get("value") or ""))
                for j in range(i)
                if j not in kept and entries[j].get("name") == name
            }
            if not more:
                break
            kept |= more
        env = [e for i, e in enumerate(entries) if i in kept]
        if env:
            container["env"] = env
        else:
            container.pop("env", None)
        if done.get("port"):
            ports = [p for p in container.get("ports") or [] if p.get("name") != c.METRICS_PORT_NAME]
            if ports:
                container["ports"] = ports
            else:
                container.pop("ports", None)
        if done.get("mount"):
            mounts = [m for m in container.get("volumeMounts") or [] if m.get("name") != c.PRICING_VOLUME]
            if mounts:
                container["volumeMounts"] = mounts
            else:
                container.pop("volumeMounts", None)
    pod_spec = template.get("spec", {})
    if record.get("volume"):
        volumes = [v for v in pod_spec.get("volumes") or [] if v.get("name") != c.PRICING_VOLUME]
        if volumes:
            pod_spec["volumes"] = volumes
        else:
            pod_spec.pop("volumes", None)
    metadata = template.get("metadata") or {}
    (metadata.get("annotations") or {}).pop(c.ANNOTATION_CONFIG_HASH, None)
    labels = metadata.get("labels") or {}
    if labels.get(c.LABEL_METRICS_SERVICE) == service and not record.get("user_label"):
        labels.pop(c.LABEL_METRICS_SERVICE)


class InjectionConflict(ValueError):
    """The workload has something of its own where the injection must go (a volume or a volume mount under the
    pricing volume's name): injecting would leave the prices unmounted and the middleware unable to start."""


#: The variables that route a signal (``TRACES``, ``LOGS``) to the collector the resource names: injected together,
#: or not at all into a container that routes the signal itself (:func:`_routed_here`).
_ROUTE: Final = {
    f"OTEL_EXPORTER_OTLP_{signal}_{part}": signal
    for signal in ("TRACES", "LOGS")
    for part in ("ENDPOINT", "PROTOCOL", "HEADERS")
}
#: Each signal's exporter. Switched off (``none``: the signal disabled, or its collector missing), it stays unset in a
#: container that routes the signal itself or sets the generic endpoint: it would switch off the app's own pipeline,
#: which the OpenTelemetry SDK (and the middleware) turn on from an endpoint alone.
_EXPORTER: Final = {"OTEL_TRACES_EXPORTER": "TRACES", "OTEL_LOGS_EXPORTER": "LOGS"}
#: The endpoint of every signal without one of its own, never injected (see :func:`build_env`).
_GENERIC_ENDPOINT: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"


def _routed_here(env: list[Any]) -> set[str]:
    """The signals a container routes itself in its ``env``: those whose own endpoint or headers it declares, whatever
    the value (the operator cannot read a ``valueFrom``, nor see the endpoint that headers of the container's own are
    for, through ``envFrom`` or the SDK's default, which an endpoint injected beside them would replace, taking them
    to the collector), but headers of ``,`` (none, as the injection writes them); and the traces of one that sets the
    generic endpoint (the logs do not follow it: their injected endpoint is their own, which the SDK prefers)."""
    return set(_own_routes(env))


def _own_routes(env: list[Any]) -> dict[str, list[str]]:
    """Each signal a container routes itself (see :func:`_routed_here`), with the names of the variables of its
    ``env`` by which it does (names only: a value may be a secret URL or key)."""
    declared = {e.get("name"): e for e in env if isinstance(e, Mapping)}
    routes: dict[str, list[str]] = {}
    for signal in ("TRACES", "LOGS"):
        endpoint, headers = f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal}_HEADERS"
        names = [endpoint] if endpoint in declared else []
        if declared.get(headers) and declared[headers].get("value") != NO_HEADERS:
            names.append(headers)
        if signal == "TRACES" and _generic_endpoint(env):
            names.append(_GENERIC_ENDPOINT)
        if names:
            routes[signal] = names
    return routes


def _generic_endpoint(env: list[Any]) -> bool:
    """Whether a container's ``env`` sets the generic OTLP endpoint (an empty one is unset to the SDK)."""
    return any(isinstance(e, Mapping) and e.get("name") == _GENERIC_ENDPOINT and not _blank(e) for e in env)


def _blank(entry: Any) -> bool:
    """Whether an env entry sets nothing: no value (the API server stores an empty one as none) and no valueFrom."""
    return isinstance(entry, Mapping) and not entry.get("value") and entry.get("valueFrom") is None


def _leftovers(workload: Mapping[str, Any]) -> frozenset[tuple[Any, Any]]:
    """The (container, variable) pairs of the pod template's env entries that no field manager but the operator's
    owns (``metadata.managedFields``): what a server-side apply leaves of an override it dropped. None without
    managedFields (an API server that keeps none, or a client that stripped them). A variable the manifest of the
    last client-side ``kubectl apply`` declares is the user's, whoever the API server counts as its owner (an
    apply that empties a value changes no field it could be counted for)."""
    metadata = workload.get("metadata") or {}
    managed = metadata.get("managedFields")
    if not isinstance(managed, list):
        return frozenset()
    ours: set[tuple[Any, Any]] = set()
    theirs: set[tuple[Any, Any]] = _last_applied_env((metadata.get("annotations") or {}).get(_LAST_APPLIED))
    for entry in managed:
        if not isinstance(entry, Mapping):
            continue
        fields: Any = entry.get("fieldsV1")
        for step in ("f:spec", "f:template", "f:spec", "f:containers"):
            fields = fields.get(step) if isinstance(fields, Mapping) else None
        if not isinstance(fields, Mapping):
            continue
        owned = ours if entry.get("manager") == c.OPERATOR_NAME else theirs
        for container_key, container_fields in fields.items():
            container = _keyed_name(container_key)
            env = container_fields.get("f:env") if isinstance(container_fields, Mapping) else None
            for env_key in env if isinstance(env, Mapping) else ():
                owned.add((container, _keyed_name(env_key)))
    return frozenset(ours - theirs)


#: The manifest a client-side ``kubectl apply`` last sent, kept by kubectl on the object.
_LAST_APPLIED: Final = "kubectl.kubernetes.io/last-applied-configuration"


def _last_applied_env(text: Any) -> set[tuple[Any, Any]]:
    """The (container, variable) pairs a last-applied configuration declares in the pod template."""
    try:
        applied = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return set()
    pairs: set[tuple[Any, Any]] = set()
    for step in ("spec", "template", "spec"):
        applied = applied.get(step) if isinstance(applied, dict) else None
    containers = applied.get("containers") if isinstance(applied, dict) else None
    for container in containers if isinstance(containers, list) else ():
        if isinstance(container, dict) and isinstance(container.get("env"), list):
            pairs.update((container.get("name"), e.get("name")) for e in container["env"] if isinstance(e, dict))
    return pairs


def _keyed_name(key: Any) -> Any:
    """The name in a managedFields list-item key (``k:{"name":"app"}``), or None."""
    if not isinstance(key, str) or not key.startswith("k:"):
        return None
    try:
        item = json.loads(key[2:])
    except ValueError:
        return None
    return item.get("name") if isinstance(item, dict) else None


def _injected_volume(volume: Mapping[str, Any]) -> bool:
    """Whether a volume named as the pricing volume is shaped as an injection makes it (a ConfigMap's one key as the
    pricing file): one whose record was lost (removed by hand, and the spec changed before a pass could rebuild it)."""
    config_map = volume.get("configMap")
    items = config_map.get("items") if isinstance(config_map, Mapping) else None
    return (
        set(volume) == {"name", "configMap"}
        and isinstance(items, list)
        and len(items) == 1
        and isinstance(items[0], Mapping)
        and items[0].get("path") in (c.PRICING_FILE, c.PRICING_FILE_JSON)
    )


def _injected_mount(mount: Mapping[str, Any]) -> bool:
    """Whether a mount named as the pricing volume is the one an injection makes (at the pricing mount path)."""
    return mount.get("mountPath") == c.PRICING_MOUNT_PATH


def _apply(
    template: dict[str, Any],
    injection: Injection,
    leftovers: frozenset[tuple[Any, Any]] = frozenset(),
    service: str | None = None,
) -> dict[str, Any]:
    """Add ``injection`` to a stripped ``template`` (in place); return the new record. ``leftovers``: the (container,
    variable) pairs of :func:`_leftovers`. ``service``: the workload's metrics Service, named in the pods' label it
    selects them by (None: no label, see :func:`build_workload_patch`).

    A value of that label the stripped template still has is the user's (a manifest copied from an injected
    workload's live YAML): it is neither replaced, which made each re-apply of the manifest and the next pass set it
    back and forth, rolling the pods twice, nor removed with the injection. The record says so (``user_label``)."""
    record: dict[str, Any] = {"containers": {}, "volume": False}
    containers = template.setdefault("spec", {}).setdefault("containers", [])
    chosen = _chosen(containers, injection)
    port = dict(injection.port)
    host_network = template["spec"].get("hostNetwork") is True
    declared = False
    if host_network:
        # Every port of a hostNetwork pod is a host port, its hostPort filled in by the API server (in templates up to
        # Kubernetes 1.27; written here, a later pass finds the template as it built it); and one host port is
        # declared once per pod, so only the first chosen container declares it (the others' listeners find it
        # taken, as they would in any pod).
        port["hostPort"] = port["containerPort"]
        declared = any(
            (p.get("containerPort") == port["containerPort"] and (p.get("protocol") or "TCP") == "TCP")
            or p.get("name") == c.METRICS_PORT_NAME
            for ct in containers
            for p in ct.get("ports") or []
        )
    for container in chosen:
        done: dict[str, Any] = {"env": {}, "port": False, "mount": False}
        env = container.setdefault("env", [])
        env[:] = _without_leftovers(container, injection, leftovers)
        taken = {e.get("name") for e in env}
        routed = _routed_here(env)
        # (Read before the loop: the injection never writes the generic endpoint, so what it appends cannot change it.)
        generic = _generic_endpoint(env)
        for entry in injection.env:
            name = entry["name"]
            if name in taken or _ROUTE.get(name) in routed:  # the user's own variables win
                continue
            if name in _EXPORTER and entry.get("value") == "none" and (_EXPORTER[name] in routed or generic):
                continue
            env.append(copy.deepcopy(entry))
            done["env"][entry["name"]] = _env_key(entry)
        ports = container.setdefault("ports", [])
        # (A UDP or SCTP port of that number, a statsd listener say, is another port: ours is declared beside it,
        # or the Service, which targets ours by name, would find nothing to scrape in these pods.)
        if not any(
            (p.get("containerPort") == injection.port["containerPort"] and (p.get("protocol") or "TCP") == "TCP")
            or p.get("name") == c.METRICS_PORT_NAME
            for p in ports
        ) and not (host_network and declared):
            ports.append(dict(port))
            done["port"] = True
            declared = True
        if not ports:
            container.pop("ports")
        if injection.volume_mount is not None:
            mounts = container.setdefault("volumeMounts", [])
            # One as the injection makes it is an older injection's whose record was lost: replaced.
            mounts[:] = [m for m in mounts if not (m.get("name") == c.PRICING_VOLUME and _injected_mount(m))]
            if any(m.get("name") == c.PRICING_VOLUME for m in mounts):
                # (What the stripped template still has is the user's own.)
                raise InjectionConflict(
                    f"container {container['name']} mounts a volume named {c.PRICING_VOLUME} of its own, where the"
                    f" prices (spec.pricing) must be mounted: rename it"
                )
            mounts.append(dict(injection.volume_mount))
            done["mount"] = True
        record["containers"][container["name"]] = done
    if injection.volume is not None:
        volumes = template["spec"].setdefault("volumes", [])
        volumes[:] = [v for v in volumes if not (v.get("name") == c.PRICING_VOLUME and _injected_volume(v))]
        if any(v.get("name") == c.PRICING_VOLUME for v in volumes):
            raise InjectionConflict(
                f"the pod template has a volume named {c.PRICING_VOLUME} of its own, where the prices (spec.pricing)"
                f" must be: rename it"
            )
        volumes.append(copy.deepcopy(injection.volume))
        record["volume"] = True
    template.setdefault("metadata", {}).setdefault("annotations", {})[c.ANNOTATION_CONFIG_HASH] = injection.digest
    if c.LABEL_METRICS_SERVICE in (template["metadata"].get("labels") or {}):
        record["user_label"] = True
    elif service is not None:
        template["metadata"].setdefault("labels", {})[c.LABEL_METRICS_SERVICE] = service
    return record


def _without_leftovers(
    container: Mapping[str, Any], injection: Injection, leftovers: frozenset[tuple[Any, Any]]
) -> list[Any]:
    """A stripped container's ``env`` without the leftovers of overrides (``leftovers``: see :func:`_leftovers`).

    A server-side apply that overrode an injected variable and then dropped the override gives up the value it took
    over, not the entry the operator's patch wrote: an entry with no value, which no one but the operator owns any
    more, is left. The OpenTelemetry SDK and the middleware read it as unset, so it goes, and the injected one is
    added as for a variable never declared (at the end, after the variables its value may refer to). An empty entry
    someone else declares (a chart's `value: ""`) is theirs, as any value."""
    env = list(container.get("env") or [])
    names = {entry["name"] for entry in injection.env} & {e.get("name") for e in env}
    gone = {name for name in names if (container.get("name"), name) in leftovers}
    return [e for e in env if not (e.get("name") in gone and _blank(e))]


def own_routes(workload: Mapping[str, Any], injection: Injection) -> dict[str, dict[str, list[str]]]:
    """Of the containers ``injection`` goes into in ``workload``, each that routes a signal the injection routes
    (``TRACES``, ``LOGS``) itself, and so gets none of that signal's endpoint, protocol and headers (see
    :func:`_apply`): by container name, each such signal with the names of the variables by which the container
    routes it. Read from the pod template as an injection finds it (without what an earlier one made, nor the
    leftovers of an override), so the same for a workload injected or not yet. Names only, never a value (it may be
    a secret URL or key). Only the variables that route a signal are looked at, and they do not name the workload:
    one injection, built for any workload of the resource, serves for all of them."""
    current = (workload.get("spec") or {}).get("template") or {}
    record = injected_record(workload)
    if record is None:
        record = _reclaimed(current, injection)
    made = (_renamed(current, record) or {}).get("containers") or {}
    routed = {_ROUTE[e["name"]] for e in injection.env if str(e["name"]).endswith("_ENDPOINT") and e["name"] in _ROUTE}
    found: dict[str, dict[str, list[str]]] = {}
    leftovers: frozenset[tuple[Any, Any]] | None = None
    for container in _chosen((current.get("spec") or {}).get("containers") or [], injection):
        ours = (made.get(container.get("name")) or {}).get("env") or {}
        env = [
            e
            for e in container.get("env") or []
            if isinstance(e, Mapping) and e.get("name") in _ROUTING and not _as_injected(e, ours)
        ]
        if any(_blank(e) for e in env):
            leftovers = _leftovers(workload) if leftovers is None else leftovers
            env = _without_leftovers({**container, "env": env}, injection, leftovers)
        mine = {signal: names for signal, names in _own_routes(env).items() if signal in routed}
        if mine:
            found[str(container.get("name"))] = mine
    return found


#: The variables by which a container routes a signal itself (see :func:`_own_routes`).
_ROUTING: Final = frozenset({*_ROUTE, _GENERIC_ENDPOINT})


def _keep_env_order(template: dict[str, Any], current: Mapping[str, Any]) -> None:
    """Give each container's env (in place) the order it has in ``current`` when it holds the same names.

    Stripped and added again, our variables come last; a variable added after them since (server-side apply,
    ``helm upgrade`` and ``kubectl set env`` append) would then move ahead of them: another pod template, a second
    rollout for the same settings. With the same names the order can stay as it is; a new variable of ours keeps
    the order built (the downward-API variables before ``OTEL_RESOURCE_ATTRIBUTES``, which refers to them)."""
    before: dict[Any, list[Any]] = {
        ct.get("name"): [e.get("name") for e in ct.get("env") or []]
        for ct in (current.get("spec") or {}).get("containers") or []
    }
    for container in (template.get("spec") or {}).get("containers") or []:
        env = container.get("env")
        names = before.get(container.get("name"))
        if not env or not names or sorted(map(str, names)) != sorted(str(e.get("name")) for e in env):
            continue
        # A name given twice (Kubernetes admits it, with a warning; the last one wins) keeps each of its places: by
        # first place alone, the second one moved ahead of the variables between, and another value won.
        position = {key: i for i, key in enumerate(_occurrences(names))}
        order = dict(zip(map(id, env), _occurrences([e.get("name") for e in env]), strict=True))
        built = list(env)
        env.sort(key=lambda e: position[order[id(e)]])
        if not _references_resolve(env) and _references_resolve(built):
            env[:] = built  # the kubelet expands $(NAME) only from the variables before it: keep them before


def _references_resolve(env: list[Any]) -> bool:
    """Whether every ``$(NAME)`` reference in an env list to a variable of the same list comes after it."""
    declared = {e.get("name") for e in env if isinstance(e, Mapping)}
    seen: set[Any] = set()
    for entry in env:
        if not isinstance(entry, Mapping):
            continue
        if any(name in declared and name not in seen for name in _ENV_REFERENCE.findall(str(entry.get("value") or ""))):
            return False
        seen.add(entry.get("name"))
    return True


def _occurrences(names: list[Any]) -> list[tuple[Any, int]]:
    """Each name with how many times it came before: ``[A, B, A]`` -> ``[(A, 0), (B, 0), (A, 1)]``."""
    seen: dict[Any, int] = {}
    keys = []
    for name in names:
        keys.append((name, seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    return keys


def unscrapeable_settings(workload: Mapping[str, Any], spec: TelemetrySpec) -> list[str]:
    """The variables a chosen container sets itself (the user's win over the injection) that keep the metrics Service
    from reaching the middleware's listener: another port than ``spec.metrics.port``, a loopback host, no
    Prometheus exporter, or the middleware turned off. Values from ``valueFrom`` are not known here, nor judged.
    A variable the record lists is still the user's once its value differs from the one injected (as in
    :func:`_strip`): a pass reads the workload before its own patch rewrites the record."""
    template = (workload.get("spec") or {}).get("template") or {}
    record = _renamed(template, injected_record(workload)) or {}
    injected = record.get("containers")
    if not isinstance(injected, Mapping):
        injected = {}
    pod = template.get("spec") or {}
    containers = [ct for ct in pod.get("containers") or [] if isinstance(ct, Mapping)]
    chosen = [ct for ct in containers if ct.get("name") in spec.containers] if spec.containers else containers[:1]
    found = []
    for container in chosen:
        mine = injected.get(container.get("name")) or {}
        ours = mine.get("env") or {}
        if not mine.get("port"):
            # A port the user named for the middleware's listener is theirs and is kept (none is added beside it),
            # and the Service targets it by name: on another number than spec.metrics.port nothing answers there.
            found += [
                f"container {container.get('name')} declares port {c.METRICS_PORT_NAME} as {port.get('containerPort')}"
                for port in container.get("ports") or []
                if isinstance(port, Mapping)
                and port.get("name") == c.METRICS_PORT_NAME
                and port.get("containerPort") != spec.metrics.port
            ]
        for entry in container.get("env") or []:
            name, value = entry.get("name"), entry.get("value")
            if _as_injected(entry, ours) or not isinstance(value, str) or _blank(entry):
                continue  # (an empty variable is unset to the middleware: its default, as if not declared)
            text = value.strip().lower()
            if (
                (name == mw.LLM_TELEMETRY_METRICS_PORT and _as_int(text) != spec.metrics.port)
                or (name == mw.LLM_TELEMETRY_METRICS_HOST and _loopback(text))
                or (name == mw.LLM_TELEMETRY_METRICS_EXPORTER and "prometheus" not in text.split(","))
                or (name == mw.LLM_TELEMETRY_ENABLED and text in ("0", "false", "no", "off"))
                or (name == mw.OTEL_SDK_DISABLED and text == "true")  # (every signal off, the listener too)
            ):
                found.append(f"container {container.get('name')} sets {name}={value}")
    return found


def _as_int(text: str) -> int | None:
    """``text`` as the middleware reads an integer variable (``09464``, ``+9464`` and ``9_464`` are 9464), or None."""
    try:
        return int(text)
    except ValueError:
        return None


def _loopback(host: str) -> bool:
    """Whether a listener bound to ``host`` answers only inside the pod: a loopback address in any spelling the
    socket layer takes (``127.0.0.2``, ``127.1``, ``::ffff:127.0.0.1``, ``[::1]``), or ``localhost``."""
    host = host.strip().strip("[]").rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback or _mapped_loopback(host)
    except ValueError:
        pass
    try:
        return socket.inet_aton(host)[0] == 127  # the old IPv4 forms: 127.1, 0x7f.1
    except OSError:
        return False


def _mapped_loopback(host: str) -> bool:
    mapped = getattr(ipaddress.ip_address(host), "ipv4_mapped", None)
    return mapped is not None and mapped.is_loopback


def port_conflicts(workload: Mapping[str, Any], spec: TelemetrySpec) -> list[str]:
    """The containers of a workload's pods that declare ``spec.metrics.port`` for something else than the
    middleware's listener (any port there not named ``llm-metrics``). A pod's containers share one network: the app
    itself or a sidecar on that port, and the middleware's listener and it cannot both bind it (the first to start
    wins; when that is the middleware, the app cannot start). Sidecars started as init containers count too, and a
    port named ``llm-metrics`` in a container the resource does not inject, unless an injection declared it."""
    template = (workload.get("spec") or {}).get("template") or {}
    injected = (_renamed(template, injected_record(workload)) or {}).get("containers")
    if not isinstance(injected, Mapping):
        injected = {}
    pod = template.get("spec") or {}
    containers = [ct for ct in pod.get("containers") or [] if isinstance(ct, Mapping)]
    chosen = [ct for ct in containers if ct.get("name") in spec.containers] if spec.containers else containers[:1]
    containers += [
        ct for ct in pod.get("initContainers") or [] if isinstance(ct, Mapping) and ct.get("restartPolicy") == "Always"
    ]
    found = []
    for container in containers:
        for port in container.get("ports") or []:
            if not isinstance(port, Mapping) or port.get("containerPort") != spec.metrics.port:
                continue
            if (port.get("protocol") or "TCP") != "TCP":
                continue
            if port.get("name") == c.METRICS_PORT_NAME and (
                any(container is ct for ct in chosen) or (injected.get(container.get("name")) or {}).get("port")
            ):
                continue  # the middleware's listener: declared by hand where it is injected, or by an injection
            named = f" ({port['name']})" if port.get("name") else ""
            found.append(f"container {container.get('name')} declares port {spec.metrics.port}{named}")
    return found


def build_workload_patch(
    workload: Mapping[str, Any],
    injection: Injection | None,
    owner_name: str,
    *,
    take_over: bool = False,
    label: bool = True,
) -> dict[str, Any] | None:
    """The merge patch that brings ``workload`` to ``injection`` (None: remove ours), or None if already there.

    A workload injected by another LLMTelemetry is left alone (None), unless ``take_over``: the caller decided
    that this one wins the workload (see ``reconcile``), and the other's injection is replaced by ours.
    ``label``: whether its pods get the label :data:`c.LABEL_METRICS_SERVICE` naming its metrics Service; not when
    another workload served has a Service of that name (``reconcile``'s ServiceNameClash), whose Service would
    then list these pods too.
    Lists (containers, volumes) are sent whole because a merge patch replaces lists.
    """
    record = injected_record(workload)
    if record is not None and record.get("owner") not in (None, owner_name) and not (take_over and injection):
        return None  # another LLMTelemetry's injection: only the winner of a conflict replaces it
    current = workload.get("spec", {}).get("template", {})
    if record is None and injection is not None:
        record = _reclaimed(current, injection)
    record = _renamed(current, record)
    template = copy.deepcopy(current)
    service = service_name(workload["metadata"]["name"], str(workload.get("kind") or "Deployment"))
    _strip(template, record, keep_referred=injection is None, service=service)
    new_record: dict[str, Any] | None = None
    if injection is not None:
        made = _apply(template, injection, _leftovers(workload), service if label else None)
        new_record = {"owner": owner_name, **made}
        _keep_env_order(template, current)
    record_text = None if new_record is None else json.dumps(new_record, sort_keys=True)
    if template == current and record_text == (workload.get("metadata", {}).get("annotations") or {}).get(
        c.ANNOTATION_INJECTED
    ):
        return None
    metadata_patch: dict[str, Any] = {}
    for part in ("annotations", "labels"):
        old = current.get("metadata", {}).get(part) or {}
        new = template.get("metadata", {}).get(part) or {}
        changed: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
        changed.update({k: None for k in old if k not in new})
        if changed:
            metadata_patch[part] = changed
    pod_spec = template.get("spec", {})
    spec_patch: dict[str, Any] = {"containers": pod_spec.get("containers", [])}
    if pod_spec.get("volumes") != current.get("spec", {}).get("volumes"):
        spec_patch["volumes"] = pod_spec.get("volumes")  # None removes the key
    patch: dict[str, Any] = {
        "metadata": {"annotations": {c.ANNOTATION_INJECTED: record_text}},
        "spec": {"template": {"spec": spec_patch}},
    }
    if metadata_patch:
        patch["spec"]["template"]["metadata"] = metadata_patch
    resource_version = workload.get("metadata", {}).get("resourceVersion")
    if resource_version:
        # Optimistic concurrency: a 409 tells us someone else wrote in between, and we re-read and retry.
        patch["metadata"]["resourceVersion"] = resource_version
    return patch


def guarded_patch(workload: Mapping[str, Any], patch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``patch`` (from :func:`build_workload_patch`, for ``workload`` as read) as a JSON patch (RFC 6902) whose
    first operations ``test`` what the pass decided from, in place of the ``resourceVersion`` precondition: the uid,
    ``metadata.generation`` (raised by the API server on every change of spec, so the pod template and its lists
    are the ones read), the labels, the injection record and ``metadata.deletionTimestamp``. A write that changes
    none of them (the workload controller's status and revision annotation) no longer fails the patch; any other
    does, as before, answered 422 (see ``kube.KubeClient.patch``).

    The API server takes a ``test`` of null as met by a member absent from an object (a member under an absent
    object fails it, so a workload without annotations has ``/metadata/annotations`` tested). A template with an
    empty env entry keeps the ``resourceVersion`` test: whether such an entry stays depends on ``managedFields``
    and kubectl's last-applied annotation (see :func:`_leftovers`), which nothing else here pins."""
    meta = workload.get("metadata") or {}
    annotations = meta.get("annotations")
    record_path = "/metadata/annotations" + ("/" + _pointer(c.ANNOTATION_INJECTED) if annotations else "")
    operations = [
        _test(path, value)
        for path, value in (
            ("/metadata/uid", meta.get("uid")),
            ("/metadata/generation", meta.get("generation")),
            ("/metadata/labels", meta.get("labels") or None),
            (record_path, annotations.get(c.ANNOTATION_INJECTED) if annotations else None),
            ("/metadata/deletionTimestamp", meta.get("deletionTimestamp")),
        )
    ]
    containers = ((workload.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []
    if meta.get("resourceVersion") and any(_blank(e) for ct in containers for e in ct.get("env") or []):
        operations.append(_test("/metadata/resourceVersion", meta["resourceVersion"]))
    change = {**patch, "metadata": {k: v for k, v in (patch.get("metadata") or {}).items() if k != "resourceVersion"}}
    return operations + _operations("", workload, change)


def _test(path: str, value: Any) -> dict[str, Any]:
    return {"op": "test", "path": path, "value": value}


def _pointer(key: str) -> str:
    """``key`` as one step of a JSON pointer (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _operations(path: str, current: Mapping[str, Any], change: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch operations that do what the merge patch ``change`` does to ``current`` (found at ``path``)."""
    operations: list[dict[str, Any]] = []
    for key, value in change.items():
        where = f"{path}/{_pointer(key)}"
        if value is None:
            if key in current:
                operations.append({"op": "remove", "path": where})
        elif isinstance(value, Mapping) and isinstance(current.get(key), Mapping):
            operations += _operations(where, current[key], value)
        elif not isinstance(value, Mapping) or _pruned(value) or key in current:
            # (``add`` replaces a member that exists.)
            operations.append({"op": "add", "path": where, "value": _pruned(value)})
    return operations


def _pruned(value: Any) -> Any:
    """A merge patch's value as it is stored where nothing was: without its null (removing) members."""
    if not isinstance(value, Mapping):
        return value
    return {k: _pruned(v) for k, v in value.items() if v is not None}


# --- children ---------------------------------------------------------------------------------


def workload_pod_selector(workload: Mapping[str, Any]) -> dict[str, str]:
    """Labels the workload's selector requires of its pods by equality (for the ``SelectorsOverlap`` check, see
    ``reconcile._overlapping``): its ``matchLabels``, what its ``matchExpressions`` say by equality (``In`` one
    value), and for a ``NotIn`` key the value its pod template has (``track NotIn (canary)`` beside a template
    ``track: stable`` requires ``track: stable``, which the canary's pods lack; a key ``In`` several values or
    ``Exists`` is left out: its value may change from one rollout to the next); with no ``matchLabels``, its pod
    template's labels (less the one the injection adds, which no other workload's pods have)."""
    spec = workload.get("spec") or {}
    selector = spec.get("selector") or {}
    template = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    labels = dict(selector.get("matchLabels") or {})
    if not labels:
        return {k: v for k, v in template.items() if k != c.LABEL_METRICS_SERVICE}
    for requirement in selector.get("matchExpressions") or []:
        if not isinstance(requirement, Mapping):
            continue
        key, operator, values = requirement.get("key"), requirement.get("operator"), requirement.get("values")
        if not isinstance(key, str) or key in labels:
            continue
        if operator == "In" and isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
            labels[key] = values[0]
        elif operator == "NotIn" and isinstance(template.get(key), str):
            labels[key] = template[key]
    return labels


def carries_service_label(workload: Mapping[str, Any]) -> bool:
    """Whether the workload's pod template, as read, carries the label its metrics Service selects by."""
    template = ((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}
    name = service_name(str(workload["metadata"]["name"]), str(workload.get("kind") or "Deployment"))
    return bool((template.get("labels") or {}).get(c.LABEL_METRICS_SERVICE) == name)


def user_service_label(workload: Mapping[str, Any]) -> str | None:
    """The value of :data:`c.LABEL_METRICS_SERVICE` on the workload's pod template when it is not its metrics
    Service's name, or None: the injection writes only that name, so another is the user's own (see :func:`_apply`)."""
    template = ((workload.get("spec") or {}).get("template") or {}).get("metadata") or {}
    labels = template.get("labels") or {}
    if c.LABEL_METRICS_SERVICE not in labels:
        return None
    value = labels[c.LABEL_METRICS_SERVICE]
    name = service_name(str(workload["metadata"]["name"]), str(workload.get("kind") or "Deployment"))
    return None if value == name else str(value)


def build_metrics_service(
    owner: Mapping[str, Any], spec: TelemetrySpec, workload: Mapping[str, Any], labelled: bool = True
) -> dict[str, Any]:
    """A headless Service on the metrics port selecting one workload's pods, for the ServiceMonitor to find.

    Headless (``clusterIP: None``): Prometheus scrapes the pods the Service's endpoints list, never its cluster
    IP, so a cluster IP per target would only use up the cluster's Service range (one per workload; a /24 range
    holds 254). ``clusterIP`` cannot be changed on an existing Service: one made with an IP by an earlier version
    is replaced (see ``reconcile._apply``).

    It selects the label the injection puts on the workload's pod template (:data:`c.LABEL_METRICS_SERVICE`, the
    Service's own name) alone, not the workload's pod selector: that one also matches the pods of a canary labelled
    as the workload's pods plus a label of its own (``app: chat, track: canary`` beside ``app: chat``), which declare
    the metrics port too once another LLMTelemetry injects them, and they would be scraped twice, under two jobs.
    Only this workload's pods carry that label with this value. (Pods injected by an earlier version, without it,
    are not scraped from the pass that adds it until the rollout it starts replaces them.) Not ``labelled``: the
    workload's pods do not carry it and are not about to (its template lacks it, held back for its prices; its
    controller rolls no pod by itself, paused or OnDelete): its pod selector, as earlier versions did, so that the
    pods it runs are still scraped (see :func:`workload_pod_selector`).

    The target port is the injected port's name, which the ServiceMonitor scrapes by.
    """
    workload_name = workload["metadata"]["name"]
    name = service_name(workload_name, str(workload.get("kind") or "Deployment"))
    metadata = _metadata(owner, name, "metrics")
    # A label value holds 63 characters; the name it falls back to (the workload's) may hold 253.
    metadata["labels"][c.LABEL_NAME] = otel_service_name(workload)[:63].rstrip("-_.")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            "selector": {c.LABEL_METRICS_SERVICE: name} if labelled else workload_pod_selector(workload),
            "ports": [
                {
                    "name": c.METRICS_PORT_NAME,
                    "port": spec.metrics.port,
                    "targetPort": c.METRICS_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_service_monitor(owner: Mapping[str, Any], spec: TelemetrySpec, config: OperatorConfig) -> dict[str, Any]:
    """A ServiceMonitor scraping every metrics Service of this LLMTelemetry; its ``job`` is the resource name."""
    meta = owner["metadata"]
    labels = {**config.servicemonitor_labels, **spec.metrics.labels}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(owner, service_monitor_name(meta["name"]), "scrape", labels),
        "spec": {
            # job="<LLMTelemetry name>" whatever the Services are called, so rules and dashboards can select it.
            "jobLabel": c.LABEL_OWNER,
            "selector": {"matchLabels": {**owner_selector(meta["name"]), c.LABEL_COMPONENT: "metrics"}},
            "namespaceSelector": {"matchNames": [meta["namespace"]]},
            "endpoints": [
                {"port": c.METRICS_PORT_NAME, "path": "/metrics", "scheme": "http", "interval": spec.metrics.interval}
            ],
        },
    }


def rule_selector(owner: Mapping[str, Any]) -> str:
    """PromQL matchers selecting this LLMTelemetry's series: its namespace, the job its ServiceMonitor sets (the
    resource's name), and the endpoint (the Prometheus Operator labels a target with its ServiceMonitor endpoint's
    port name). The job alone is not enough: a Service the app has anyway, scraped by a ServiceMonitor of the
    team's, is often named as the LLMTelemetry is, and its targets' ``up`` would then read as ours."""
    meta = owner["metadata"]
    return f'namespace="{meta["namespace"]}",job="{meta["name"]}",endpoint="{c.METRICS_PORT_NAME}"'


def build_prometheus_rule(owner: Mapping[str, Any], spec: TelemetrySpec, config: OperatorConfig) -> dict[str, Any]:
    """The project's alert set (``llm_telemetry.monitoring.rules``), scoped to this LLMTelemetry's series."""
    from llm_telemetry.monitoring.rules import build_prometheus_rule as build_rule

    meta = owner["metadata"]
    name = prometheus_rule_name(meta["name"])
    labels = {**config.servicemonitor_labels, **spec.metrics.labels}
    rule = build_rule(
        name,
        meta["namespace"],
        spec.alerts.thresholds,
        selector=rule_selector(owner),
        labels=labels,
        runbook_url=config.runbook_url,
    )
    rule["metadata"] = _metadata(owner, name, "alerts", {**labels, **(rule.get("metadata", {}).get("labels") or {})})
    return rule


#: Hex digits of the hash that ends a cut dashboard uid (64 bits: no two resources are found to share one by trying
#: names), and the readable part before it and its ``__``: together Grafana's 40 characters.
_UID_HASH = 16
_UID_READABLE = 40 - 2 - _UID_HASH


def dashboard_uid(owner: Mapping[str, Any]) -> str:
    """A Grafana uid unique per LLMTelemetry in the cluster: ``llmt_<namespace>_<name>``, a name's dots as
    underscores. Grafana takes at most 40 letters, digits, ``-`` and ``_``; neither a namespace nor a name holds
    ``_``, so no two resources share one (``-`` as the separator made ``team-a/chat`` and ``team/a-chat`` one
    dashboard).

    A longer one is cut to its first characters, then ``__`` and a hash of the whole namespace and name. An uncut uid
    never holds ``__`` (a namespace has no ``_``, and a name neither two dots in a row nor one at either end), so an
    uncut uid is never a cut one: the earlier form (cut at 31, ``_`` and 8 hex digits) was the uncut uid of a
    resource named to look like it (``customer-support-as.<those 8 digits>`` beside ``customer-support-assistant-prod``
    in a namespace of 6 characters, or in a namespace that is the first 26 characters of another's), and Grafana
    showed one dashboard for both. The readable part is for people; the hash alone tells resources apart."""
    meta = owner["metadata"]
    text = f"llmt_{meta['namespace']}_{meta['name'].replace('.', '_')}"
    if len(text) <= 40:
        return text
    digest = hashlib.sha256(f"{meta['namespace']}/{meta['name']}".encode()).hexdigest()[:_UID_HASH]
    return f"{text[:_UID_READABLE]}__{digest}"


#: Stand-ins for a dashboard's title, uid, namespace and job in :func:`_dashboard_template` (a NUL is never in any).
_TITLE_MARK, _UID_MARK = "\x00title\x00", "\x00uid\x00"
_NAMESPACE_MARK, _JOB_MARK = "\x00namespace\x00", "\x00job\x00"


@functools.lru_cache(maxsize=32)
def _dashboard_template(
    attribution: tuple[str, ...], logs_mode: str, jaeger_uid: str, loki_uid: str, thresholds: AlertThresholds | None
) -> str:
    """The dashboard's JSON for these attribution labels, logs mode, datasources and alert thresholds, with
    stand-ins for its title, uid, and the namespace and job it opens on.

    Every LLMTelemetry's dashboard is the same but for those strings, and building and encoding it (some 40 KB) was
    about a twentieth of the operator's CPU per new resource; so it is built once per set of labels and settings,
    and each resource's is this text with its own values put in.
    """
    from llm_telemetry.monitoring.dashboards import build_dashboard

    dashboard = build_dashboard(
        title=_TITLE_MARK,
        uid=_UID_MARK,
        attribution_labels=attribution,
        logs_mode=logs_mode,
        jaeger_uid=jaeger_uid,
        loki_uid=loki_uid,
        namespace=_NAMESPACE_MARK,
        job=_JOB_MARK,
        endpoint=c.METRICS_PORT_NAME,
        thresholds=thresholds,
    )
    return json.dumps(dashboard, sort_keys=True, separators=(",", ":"))


def dashboard_json(
    title: str,
    uid: str,
    attribution: tuple[str, ...],
    logs_mode: str,
    jaeger_uid: str,
    loki_uid: str,
    namespace: str,
    job: str,
    thresholds: AlertThresholds | None = None,
) -> str:
    """``json.dumps(build_dashboard(title=..., uid=..., ...), sort_keys=True, separators=(",", ":"))``, from the
    cached template (the same text)."""
    text = _dashboard_template(attribution, logs_mode, jaeger_uid, loki_uid, thresholds)
    for mark, value in ((_TITLE_MARK, title), (_UID_MARK, uid), (_NAMESPACE_MARK, namespace), (_JOB_MARK, job)):
        text = text.replace(json.dumps(mark), json.dumps(value))
    return text


def build_dashboard_configmap(owner: Mapping[str, Any], spec: TelemetrySpec, config: OperatorConfig) -> dict[str, Any]:
    """The project's Grafana dashboard in a ConfigMap Grafana's sidecar picks up, in ``spec.dashboard.folder``.

    It opens on this resource's service (its namespace, and the job its ServiceMonitor sets: the resource's name),
    as its title says; the variables still offer every other. Its error log panel queries Loki for the lines as
    ``spec.logs.mode`` sends them there (OTLP or stdout), and its error ratio and p95 panels turn red at the
    thresholds of ``spec.alerts``, as its alerts fire."""
    meta = owner["metadata"]
    attribution = tuple(sorted(set(spec.attribution_headers.values()))) or ("tenant",)
    title = f"LLM: {meta['namespace']}/{meta['name']}"
    text = dashboard_json(
        title,
        dashboard_uid(owner),
        attribution,
        spec.logs.mode,
        config.jaeger_datasource_uid,
        config.loki_datasource_uid,
        meta["namespace"],
        meta["name"],
        # Its Health row turns red where this resource's alerts fire.
        spec.alerts.thresholds,
    )
    key, val = config.dashboard_label
    metadata = _metadata(owner, dashboard_configmap_name(meta["name"]), "dashboard", {key: val})
    metadata.setdefault("annotations", {})[c.ANNOTATION_GRAFANA_FOLDER] = spec.dashboard.folder
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        # Grafana's sidecar writes each key as a file, in the folder the annotation names: keyed by the resource's
        # name, a namespace's dashboard overwrote another's of the same name. The uid is unique in the cluster.
        "data": {f"{dashboard_uid(owner)}.json": text},
    }


def build_pricing_document(spec: TelemetrySpec) -> str:
    """The inline pricing table as the YAML file the middleware reads (``LLM_TELEMETRY_PRICING``)."""
    return spec.pricing.document


def build_pricing_configmap(owner: Mapping[str, Any], spec: TelemetrySpec) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, pricing_configmap_name(meta["name"]), "pricing"),
        "data": {c.PRICING_FILE: build_pricing_document(spec)},
    }


# --- status -----------------------------------------------------------------------------------


#: The longest condition message written (that of Kubernetes' own ``metav1.Condition``). Messages quote the spec
#: (``spec.containers``, each name of which a NoContainer message lists again for every workload selected), which the
#: schema leaves unbounded: a status of a few such messages beside the spec passed etcd's 1.5 MiB for one object, every
#: status write failed (``etcdserver: request is too large``), and the resource showed only ApiError.
MAX_CONDITION_MESSAGE_CHARS = 32768


@dataclass(frozen=True)
class Condition:
    """One status condition before timestamps are attached."""

    type: str
    status: bool
    reason: str
    message: str


def build_status(
    conditions: Sequence[Condition],
    *,
    generation: int | None,
    targets: Sequence[str],
    previous: Mapping[str, Any] | None,
    now: str,
    phase: str,
) -> dict[str, Any]:
    """The ``status`` block; ``lastTransitionTime`` only moves when a condition's status flips."""
    old = {cond.get("type"): cond for cond in (previous or {}).get("conditions") or []}
    rendered = []
    for cond in conditions:
        status = "True" if cond.status else "False"
        before = old.get(cond.type)
        since = before.get("lastTransitionTime") if before and before.get("status") == status else None
        rendered.append(
            {
                "type": cond.type,
                "status": status,
                "reason": cond.reason,
                "message": cond.message
                if len(cond.message) <= MAX_CONDITION_MESSAGE_CHARS
                else cond.message[: MAX_CONDITION_MESSAGE_CHARS - 1] + "…",
                "lastTransitionTime": since or now,
                **({"observedGeneration": generation} if generation is not None else {}),
            }
        )
    return {
        **({"observedGeneration": generation} if generation is not None else {}),
        "phase": phase,
        "targets": list(targets),
        "targetCount": len(targets),
        "conditions": rendered,
    }


def contains(actual: Any, desired: Any) -> bool:
    """Whether ``actual`` already has everything in ``desired`` (server-side defaults and extra keys allowed)."""
    if isinstance(desired, Mapping):
        return isinstance(actual, Mapping) and all(contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)

"""kopf's retries of a refused call (a 403), which it logs at ERROR every 30 s for as long as the refusal lasts:
lowered once the operator has named the missing permission, and left as they are otherwise."""

from __future__ import annotations

import itertools
import logging

from hypothesis import given
from hypothesis import strategies as st

from llm_telemetry_operator import access
from llm_telemetry_operator.refusals import KnownRefusals, request_permission

API = "https://127.0.0.1:6443"
names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
groups = st.sampled_from(["", "apps", "llmtelemetry.dev", "kopf.dev", "monitoring.coreos.com"])
plurals = st.sampled_from(["llmtelemetries", "deployments", "events", "configmaps", "clusterkopfpeerings"])


def url(group: str, plural: str, namespace: str | None, name: str | None, sub: str | None = None) -> str:
    base = f"{API}/api/v1" if not group else f"{API}/apis/{group}/v1"
    where = f"/namespaces/{namespace}" if namespace else ""
    tail = f"/{name}" if name else ""
    return f"{base}{where}/{plural}{tail}{f'/{sub}' if sub else ''}"


@given(groups, plurals, st.none() | names, names, st.none() | st.sampled_from(["status", "scale"]))
def test_a_request_is_mapped_to_the_permission_it_needs(
    group: str, plural: str, namespace: str | None, name: str, sub: str | None
) -> None:
    resource = f"{plural}/{sub}" if sub else plural
    named = url(group, plural, namespace, name, sub)
    assert request_permission("PATCH", named) == (group, resource, "patch", namespace)
    assert request_permission("GET", named) == (group, resource, "get", namespace)
    assert request_permission("DELETE", url(group, plural, namespace, name)) == (group, plural, "delete", namespace)
    assert request_permission("POST", url(group, plural, namespace, None)) == (group, plural, "create", namespace)
    listed = url(group, plural, namespace, None)
    assert request_permission("GET", listed) == (group, plural, "list", namespace)
    watched = f"{listed}?watch=true&allowWatchBookmarks=true&resourceVersion=1&timeoutSeconds=60"
    assert request_permission("GET", watched) == (group, plural, "watch", namespace)


def test_the_namespaces_themselves_are_a_cluster_wide_resource() -> None:
    assert request_permission("GET", f"{API}/api/v1/namespaces") == ("", "namespaces", "list", None)
    assert request_permission("GET", f"{API}/api/v1/namespaces/team-a") == ("", "namespaces", "get", None)
    assert request_permission("GET", f"{API}/version") is None
    assert request_permission("GET", f"{API}/apis/llmtelemetry.dev/v1alpha1") is None


#: The authorizer's refusal, as the API server words it.
RBAC = (
    'llmtelemetries.llmtelemetry.dev "chat" is forbidden: User "system:serviceaccount:s:op" cannot patch resource '
    '"llmtelemetries" in API group "llmtelemetry.dev" in the namespace "team-a"'
)
#: 403s of admission steps, as the API server words them: no permission explains them.
ADMISSION = [
    'services "chat-llm-metrics" is forbidden: exceeded quota: q, requested: services=1, used: services=0, '
    "limited: services=0",
    "events is forbidden: unable to create new content in namespace team-a because it is being terminated",
    'admission webhook "deny.example.com" denied the request: frozen',
]


def retry(url: str, method: str = "PATCH", attempt: int = 1, refusal: str = RBAC) -> logging.LogRecord:
    """kopf's line for a refused attempt it retries (kopf/_cogs/clients/api.py), as its object logger makes it."""
    message = (
        f"Request attempt #{attempt} failed; will retry: {method} {url} -> APIForbiddenError({refusal!r}, "
        f"{{'kind': 'Status', 'message': {refusal!r}, 'reason': 'Forbidden', 'code': 403}}, status=403)"
    )
    return logging.LogRecord("kopf.objects", logging.ERROR, __file__, 1, message, None, None)


PATCH_LLMT = access.Grant("llmtelemetry.dev", "llmtelemetries", "patch")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@given(st.lists(st.floats(min_value=0.0, max_value=3600.0), min_size=1, max_size=40), names)
def test_a_known_refusal_is_a_warning_at_most_once_per_interval_and_never_an_error(
    gaps: list[float], namespace: str
) -> None:
    clock = Clock()
    unknown: list[str | None] = []
    log_filter = KnownRefusals(lambda: [PATCH_LLMT], unknown.append, repeat_seconds=600.0, clock=clock)
    logging.getLogger("kopf.objects").setLevel(logging.INFO)
    warned: list[float] = []
    for attempt, gap in enumerate(gaps, start=1):
        clock.now += gap
        record = retry(url("llmtelemetry.dev", "llmtelemetries", namespace, "chat"), attempt=attempt)
        kept = log_filter.filter(record)
        assert record.levelno < logging.ERROR
        if kept:
            assert record.levelno == logging.WARNING
            assert f"for want of {PATCH_LLMT.describe()}, already reported" in record.getMessage()
            warned.append(clock.now)
    assert warned[0] == gaps[0]  # the first one is said
    assert all(b - a >= 600.0 for a, b in itertools.pairwise(warned))
    # Each gap of 600 s or more after the last WARNING has its own.
    expected, last = 1, gaps[0]
    for t in [sum(gaps[: i + 1]) for i in range(1, len(gaps))]:
        if t - last >= 600.0:
            expected, last = expected + 1, t
    assert len(warned) == expected
    assert unknown == []


def test_a_refusal_not_known_stays_an_error_and_is_passed_on() -> None:
    unknown: list[str | None] = []
    log_filter = KnownRefusals(lambda: [PATCH_LLMT], unknown.append, clock=Clock())
    # Another verb, another resource, and a namespace's grant where the missing one is a namespace's too.
    for record in (
        retry(url("apps", "deployments", "team-a", "chat")),
        retry(url("llmtelemetry.dev", "llmtelemetries", "team-a", "chat", "status")),
        retry(url("", "events", "team-a", None), method="POST"),
    ):
        assert log_filter.filter(record) and record.levelno == logging.ERROR
    assert unknown == ["team-a"] * 3
    in_team_a = access.Grant("", "events", "create", namespace="team-a")
    log_filter = KnownRefusals(lambda: [in_team_a], unknown.append, clock=Clock())
    record = retry(url("", "events", "team-b", None), method="POST")
    assert log_filter.filter(record) and record.levelno == logging.ERROR
    record = retry(url("", "events", "team-a", None), method="POST")
    assert log_filter.filter(record) and record.levelno == logging.WARNING


def test_other_lines_pass_untouched() -> None:
    log_filter = KnownRefusals(lambda: [PATCH_LLMT], clock=Clock())
    escalated = retry(url("llmtelemetry.dev", "llmtelemetries", "team-a", "chat"))
    escalated.msg = escalated.msg.replace("will retry", "escalating")
    other = logging.LogRecord("kopf.objects", logging.ERROR, __file__, 1, "Handler 'x' failed", None, None)
    for record in (escalated, other):
        assert log_filter.filter(record) and record.levelno == logging.ERROR
    nothing_missing = KnownRefusals(lambda: None, clock=Clock())
    record = retry(url("llmtelemetry.dev", "llmtelemetries", "team-a", "chat"))
    assert nothing_missing.filter(record) and record.levelno == logging.ERROR


@given(st.sampled_from(ADMISSION), names, st.sampled_from(["PATCH", "POST"]))
def test_an_admission_refusal_stays_an_error_and_starts_no_check(refusal: str, namespace: str, method: str) -> None:
    """A 403 of an admission step (a quota exceeded, a namespace being terminated, a webhook's denial) is no
    permission's: kept as kopf logs it, even for a call whose permission was last found missing (a grant given back
    since, and the call now refused for another reason), and no check of the permissions is asked for."""
    unknown: list[str | None] = []
    known = [PATCH_LLMT, access.Grant("", "events", "create")]
    log_filter = KnownRefusals(lambda: known, unknown.append, clock=Clock())
    target = url("llmtelemetry.dev", "llmtelemetries", namespace, "chat" if method == "PATCH" else None)
    for attempt in (1, 2, 3):
        record = retry(target, method=method, attempt=attempt, refusal=refusal)
        assert log_filter.filter(record) and record.levelno == logging.ERROR
        assert "already reported" not in record.getMessage()
    assert unknown == []
    # The same call refused by the authorizer is the permission's.
    assert log_filter.filter(retry(target, method="PATCH")) and unknown == []

"""kopf's retries of a call the API server refuses (403) for want of a permission the operator has already named.

kopf retries a refused call for as long as the operator runs (its ``error_backoffs``, see handlers.OutageBackoffs),
and logs each attempt at ERROR: ``Request attempt #N failed; will retry: PATCH <url> -> APIForbiddenError(...)``,
every 30 s, forever, for each resource whose finalizer patch is refused, say. The operator's own check of its
permissions (see access.py) has by then said, once, at ERROR, which permission is missing and what breaks without it,
and told each resource it cannot serve (``Ready`` False, reason ``Forbidden``, and a Warning event). So such a retry
is logged at WARNING the first time for each permission, and again at most once every :data:`REPEAT_SECONDS`; the
others at DEBUG (shown with ``--verbose``). A refusal of anything the last check did not find missing stays an
ERROR: it is a new failure (and the caller may ask for a new check, see :class:`KnownRefusals`). So does a 403 that
is not the authorizer's: an admission step refuses with 403 too (a ResourceQuota exceeded, a namespace being
terminated, a webhook's denial), and no permission explains it, nor would a check of the permissions find it.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable

from llm_telemetry_operator import access

#: How often a retry refused for a permission already named is logged at WARNING, at most.
REPEAT_SECONDS: float = 600.0

#: kopf's line for a failed attempt that it will retry (kopf/_cogs/clients/api.py): the attempt, method and URL.
_RETRY = re.compile(
    r"Request attempt #?\d+(?:/\d+)? failed; will retry: (?P<method>[A-Z]+) (?P<url>\S+) -> APIForbiddenError\b"
)

#: How the API server's authorizer words a refusal (its forbidden message: ``User "<name>" cannot <verb> resource
#: "<resource>" in API group ...``, or ``cannot <verb> path "<path>"`` for a URL that is no resource's). An admission
#: step's 403 reads otherwise: ``exceeded quota: ...``, ``unable to create new content in namespace ... because it is
#: being terminated``, ``admission webhook "..." denied the request: ...``.
_AUTHORIZER = re.compile(r'\bcannot [a-z]+ (?:resource|path) "')

_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update"}


def request_permission(method: str, url: str) -> tuple[str, str, str, str | None] | None:
    """The permission a request to the API server needs, as ``(api_group, resource, verb, namespace)`` (the
    resource with ``/subresource``; namespace None for a cluster-scoped or all-namespaces request), or None for a URL
    that is not a resource's."""
    split = urllib.parse.urlsplit(url)
    parts = [urllib.parse.unquote(p) for p in split.path.strip("/").split("/") if p]
    if len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    elif len(parts) >= 2 and parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        return None
    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    resource = rest[0] if len(rest) < 3 else f"{rest[0]}/{rest[2]}"
    named = len(rest) >= 2
    if method == "GET":
        watching = urllib.parse.parse_qs(split.query).get("watch", [""])[-1].lower() in ("true", "1")
        verb = "watch" if watching else "get" if named else "list"
    elif method == "DELETE":
        verb = "delete" if named else "deletecollection"
    elif method in _VERBS:
        verb = _VERBS[method]
    else:
        return None
    return group, resource, verb, namespace


def authorization_refusal(text: str) -> bool:
    """Whether a refusal's text (the API server's message, or an error or log line holding it) is the authorizer's,
    which a missing permission explains; a 403 worded otherwise is an admission step's (see :data:`_AUTHORIZER`)."""
    return _AUTHORIZER.search(text) is not None


def _covering(
    lacking: Iterable[access.Grant], api_group: str, resource: str, verb: str, namespace: str | None
) -> access.Grant | None:
    """The missing permission that explains a refusal of ``verb`` on ``resource`` in ``namespace`` (a cluster-wide
    one covers every namespace), if any."""
    for grant in lacking:
        if (grant.api_group, grant.resource, grant.verb) == (api_group, resource, verb) and grant.namespace in (
            None,
            namespace,
        ):
            return grant
    return None


class KnownRefusals(logging.Filter):
    """Lowers kopf's ERROR line for a retried 403 of the authorizer's whose permission ``lacking()`` names (the last
    check's findings; None or empty: nothing known missing, every line stays as it is): WARNING once per permission
    and then at most once every ``repeat_seconds``, DEBUG otherwise (dropped unless the logger is enabled for DEBUG).
    A retried authorizer's 403 of a permission not named calls ``unknown()``, if given, and stays an ERROR; an
    admission step's 403 (a quota, a namespace being terminated, a webhook) stays an ERROR and calls nothing.

    Args:
        lacking: the permissions the operator was last found to lack.
        unknown: called with the request's namespace (None: cluster-wide) for a refusal the last check did not
            explain (e.g. to check again).
        repeat_seconds: the least time between two WARNING lines for one permission.
        clock: the time, in seconds (time.monotonic by default).
    """

    def __init__(
        self,
        lacking: Callable[[], Iterable[access.Grant] | None],
        unknown: Callable[[str | None], None] | None = None,
        repeat_seconds: float = REPEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._lacking = lacking
        self._unknown = unknown
        self._repeat = repeat_seconds
        self._clock = clock
        #: When each permission's retry was last logged at WARNING.
        self._said: dict[access.Grant, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.ERROR:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: not ours to judge
            return True
        found = _RETRY.search(message)
        if found is None or not authorization_refusal(message[found.end() :]):
            # Not a retried refusal, or one no permission explains (a quota, a namespace being terminated, a
            # webhook): it stays as kopf logs it, and a check of the permissions would find nothing.
            return True
        permission = request_permission(found["method"], found["url"])
        grant = None if permission is None else _covering(self._lacking() or (), *permission)
        if grant is None:
            if self._unknown is not None:
                self._unknown(permission[3] if permission else None)
            return True
        now = self._clock()
        last = self._said.get(grant)
        if last is None or now - last >= self._repeat:
            self._said[grant] = now
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg = (
                f"{message} (refused for want of {grant.describe()}, already reported at ERROR; kopf retries every "
                f"30 s until it is granted, each retry logged at DEBUG and at most once every {self._repeat / 60:g} "
                "minutes at WARNING)"
            )
            record.args = ()
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def install(log_filter: logging.Filter) -> None:
    """Put ``log_filter`` on every kopf logger there is (a logger's filters see only its own records, not those of
    the loggers below it, and kopf logs a retry on the caller's logger: a resource's, the watcher's, the
    peering's...), in place of one of its kind put there before (by an earlier run in the same process)."""
    names = ["kopf", *(name for name in list(logging.root.manager.loggerDict) if name.startswith("kopf."))]
    for name in names:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, type(log_filter))]:
            logger.removeFilter(old)
        logger.addFilter(log_filter)

"""Which LLMTelemetry of a namespace a workload's watch event may concern, without looking at every one of them.

Every change of every Deployment and StatefulSet reaches the operator as a watch event, and each must find the
LLMTelemetry whose outcome it may change: those whose selector selects the workload, the one its injection record
names, and those whose last pass served it (another may have taken it over since). Asking each LLMTelemetry of the
namespace made a namespace with a thousand of them cost a thousand selector checks per event, and the event
handling the largest share of the operator's CPU. :class:`OwnerIndex` keeps them by the ``matchLabels`` pair
their selector requires, so an event looks only at those a label of the workload can select (plus the few
selectors with no ``matchLabels``, which may select anything).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping

from llm_telemetry_operator.spec import TelemetrySpec

#: (namespace, name) of an LLMTelemetry.
Key = tuple[str, str]


class OwnerIndex:
    """The LLMTelemetry of each namespace in name order, indexed by selector and by the workloads they served.

    Example::

        index = OwnerIndex()
        index.put(("llm", "chat"), spec)               # spec.selector: matchLabels {app: chat}
        index.candidates("llm", {"app": "chat"})       # ["chat"]
        index.candidates("llm", {"app": "embed"})      # []
    """

    def __init__(self) -> None:
        self._names: dict[str, list[str]] = {}
        #: The matchLabels pair each indexed LLMTelemetry is filed under (None: no matchLabels, or no valid spec).
        self._filed: dict[Key, tuple[str, str] | None] = {}
        self._by_label: dict[str, dict[tuple[str, str], set[str]]] = {}
        self._unlabelled: dict[str, set[str]] = {}
        self._served: dict[tuple[str, str], set[str]] = {}
        self._serves: dict[Key, frozenset[str]] = {}
        #: The workloads (``Kind/name``) whose injection record names each LLMTelemetry, as their watch last showed
        #: them; and the reverse, by (namespace, workload).
        self._recorded: dict[Key, set[str]] = {}
        self._record_of: dict[tuple[str, str], str] = {}

    def put(self, key: Key, spec: TelemetrySpec | None) -> None:
        """Add an LLMTelemetry, or file it anew after its spec changed (None: the spec is invalid)."""
        namespace, name = key
        if key in self._filed:
            self._unfile(key)
        else:
            bisect.insort(self._names.setdefault(namespace, []), name)
        labels = spec.selector.match_labels if spec is not None else {}
        pair = min(labels.items()) if labels else None
        self._filed[key] = pair
        if pair is None:
            self._unlabelled.setdefault(namespace, set()).add(name)
        else:
            self._by_label.setdefault(namespace, {}).setdefault(pair, set()).add(name)

    def remove(self, key: Key) -> None:
        """Forget an LLMTelemetry (deleted)."""
        if key not in self._filed:
            return
        self._unfile(key)
        del self._filed[key]
        names = self._names[key[0]]
        del names[bisect.bisect_left(names, key[1])]
        if not names:  # the namespace's last one: nothing kept of a namespace (one per preview environment, say)
            del self._names[key[0]]
        self.serve(key, ())

    def names(self, namespace: str) -> list[str]:
        """The namespace's LLMTelemetry names, in name order."""
        return list(self._names.get(namespace, ()))

    def serve(self, key: Key, workloads: Iterable[str]) -> None:
        """Record the workloads (``Kind/name``) the last pass of ``key`` served."""
        namespace, name = key
        new = frozenset(workloads)
        old = self._serves.pop(key, frozenset())
        for workload in old - new:
            owners = self._served.get((namespace, workload))
            if owners is not None:
                owners.discard(name)
                if not owners:
                    del self._served[(namespace, workload)]
        for workload in new - old:
            self._served.setdefault((namespace, workload), set()).add(name)
        if new:
            self._serves[key] = new

    def record(self, namespace: str, workload: str, owner: str | None) -> None:
        """Note which LLMTelemetry the injection record of ``workload`` (``Kind/name``) names: None when it has none,
        or is gone. Kept whether or not that LLMTelemetry exists: the record is what says what to remove."""
        old = self._record_of.pop((namespace, workload), None)
        if old is not None:
            names = self._recorded[(namespace, old)]
            names.discard(workload)
            if not names:
                del self._recorded[(namespace, old)]
        if owner:
            self._record_of[(namespace, workload)] = owner
            self._recorded.setdefault((namespace, owner), set()).add(workload)

    def gone(self, key: Key, workload: str) -> None:
        """Forget that the injection record of ``workload`` names ``key``: a read found the workload gone (its
        deletion was missed, say while a watch was away), and no DELETED event will say so."""
        if self._record_of.get((key[0], workload)) == key[1]:
            self.record(key[0], workload, None)

    def recorded(self, key: Key) -> list[str]:
        """The workloads (``Kind/name``) whose injection record names the LLMTelemetry ``key``, in name order."""
        return sorted(self._recorded.get(key, ()))

    def candidates(self, namespace: str, labels: Mapping[str, str], workload: str = "", *also: str | None) -> list[str]:
        """In name order, every LLMTelemetry of the namespace that may select a workload with these labels or
        served ``workload`` (``Kind/name``) in its last pass, and the names in ``also``; a superset: callers
        still check each selector."""
        found = set(self._unlabelled.get(namespace, ()))
        by_label = self._by_label.get(namespace)
        if by_label:
            for pair in labels.items():
                found.update(by_label.get(pair, ()))
        if workload:
            found.update(self._served.get((namespace, workload), ()))
        found.update(name for name in also if name and (namespace, name) in self._filed)
        return sorted(found)

    def _unfile(self, key: Key) -> None:
        namespace, name = key
        pair = self._filed.get(key)
        if pair is None:
            unlabelled = self._unlabelled.get(namespace, set())
            unlabelled.discard(name)
            if not unlabelled:
                self._unlabelled.pop(namespace, None)
            return
        by_label = self._by_label[namespace]
        by_label[pair].discard(name)
        if not by_label[pair]:
            del by_label[pair]
            if not by_label:
                del self._by_label[namespace]
